"""Distributed plumbing in one process: the collectives the training loop relies on (BatchNorm statistics averaged,
a stop agreed on, objects gathered), on a real one-rank gloo group and on a faked second rank where only two ranks
can show the difference."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from accelerate.utils import InitProcessGroupKwargs
from torch import nn

from mlgcn_dist import distributed
from mlgcn_dist.config import ConfigError, flatten_config, load_config
from mlgcn_dist.distributed import any_rank, average_running_stats, check_same_config, gather_objects

CPU = torch.device("cpu")
ZERO2 = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / "zero2.json"


# ---------------------------------------------------------------------------------------- collectives


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank (this process), destroyed afterwards."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class FakeSecondRank:
    """torch.distributed as seen from rank 0 of two, the other rank's tensors given: all_reduce applies the op
    to this rank's tensor and the other's (``others`` maps a tensor's id to the other rank's copy)."""

    def __init__(self, monkeypatch, others: dict[int, torch.Tensor]) -> None:
        self.others, self.ops = others, []
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM, group=None) -> None:
        other = self.others[id(tensor)] if id(tensor) in self.others else self.others["*"]
        combine = {dist.ReduceOp.SUM: torch.add, dist.ReduceOp.MAX: torch.maximum, dist.ReduceOp.MIN: torch.minimum}
        tensor.copy_(combine[op](tensor, other))


def bn_model(mean: list[float], var: list[float]) -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model[1].running_mean.copy_(torch.tensor(mean))
    model[1].running_var.copy_(torch.tensor(var))
    model.register_buffer("adjacency", torch.eye(3))  # equal on every rank: must not be all-reduced
    return model


def test_batchnorm_running_mean_and_variance_become_the_mean_over_the_ranks(monkeypatch):
    mine, theirs = bn_model([1.0, 2.0, 3.0], [1.0, 1.0, 1.0]), bn_model([3.0, 4.0, 5.0], [3.0, 5.0, 7.0])
    FakeSecondRank(monkeypatch, {id(mine[1].running_mean): theirs[1].running_mean,
                                 id(mine[1].running_var): theirs[1].running_var})
    average_running_stats(mine)  # the fake raises KeyError on a tensor it was not given (the adjacency)
    assert mine[1].running_mean.tolist() == [2.0, 3.0, 4.0]
    assert mine[1].running_var.tolist() == [2.0, 3.0, 4.0]
    assert torch.equal(mine.adjacency, torch.eye(3)) and int(mine[1].num_batches_tracked) == 0


@pytest.mark.parametrize(("mine", "theirs"), [(False, True), (True, False), (False, False), (True, True)])
def test_any_rank_is_true_on_every_rank_when_one_rank_flags(monkeypatch, mine, theirs):
    FakeSecondRank(monkeypatch, {"*": torch.tensor([1.0 if theirs else 0.0])})
    assert any_rank(mine, CPU) is (mine or theirs)


@pytest.mark.usefixtures("one_rank_group")
def test_on_a_one_rank_group_the_collectives_give_back_this_ranks_values():
    model = bn_model([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    average_running_stats(model)
    assert model[1].running_mean.tolist() == [1.0, 2.0, 3.0] and model[1].running_var.tolist() == [4.0, 5.0, 6.0]
    assert any_rank(True, CPU) is True and any_rank(False, CPU) is False
    assert gather_objects({"bad": 3}) == [{"bad": 3}]


def test_without_a_process_group_the_collectives_are_local():
    assert not dist.is_initialized()
    model = bn_model([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    average_running_stats(model)
    assert model[1].running_mean.tolist() == [1.0, 2.0, 3.0]
    assert any_rank(True, CPU) is True and gather_objects(7) == [7]


def test_the_start_line_gives_the_global_batch_and_each_processs_intra_op_threads():
    """How many threads each process's CPU ops wake is printed with the global batch: `accelerate launch` gives a
    GPU process one, a bare `python launch/train.py` one per core (README Performance, run G)."""
    from dataclasses import replace

    from mlgcn_dist.distributed import Topology, topology

    topo = Topology(world_size=8, rank=0, local_rank=0, device="cuda:0", distributed_type="MULTI_GPU",
                    per_device_batch=64, grad_accum=1, intra_op_threads=1)
    assert topo.describe() == ("MULTI_GPU on cuda:0: world size 8; global batch = 64 per device x 1 accumulation x "
                               "8 processes = 512; 1 intra-op thread per process")
    assert replace(topo, intra_op_threads=16).describe().endswith("; 16 intra-op threads per process")

    class OneProcess:  # the Accelerator's fields topology reads
        num_processes, process_index, local_process_index, device = 1, 0, 0, CPU

        class distributed_type:  # noqa: N801 (an enum member's shape)
            value = "NO"

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(before + 1)
        assert topology(OneProcess(), load_config(None, [])).intra_op_threads == before + 1
    finally:
        torch.set_num_threads(before)


def test_the_topology_takes_the_global_rank_and_the_rank_on_this_node_from_the_accelerator():
    class SecondProcessOfTheSecondNode:  # the Accelerator's fields topology reads: two nodes of two processes
        num_processes, process_index, local_process_index, device = 4, 3, 1, CPU

        class distributed_type:  # noqa: N801 (an enum member's shape)
            value = "MULTI_CPU"

    topo = distributed.topology(SecondProcessOfTheSecondNode(), load_config(None, []))
    assert (topo.world_size, topo.rank, topo.local_rank) == (4, 3, 1)


def test_the_ema_models_running_statistics_are_averaged_with_the_models(monkeypatch):
    model, ema = bn_model([1.0, 1.0, 1.0], [1.0, 1.0, 1.0]), bn_model([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])
    FakeSecondRank(monkeypatch, {"*": torch.tensor([4.0, 4.0, 4.0])})  # the other rank's, for every statistic
    average_running_stats(model, ema)
    assert model[1].running_mean.tolist() == model[1].running_var.tolist() == [2.5, 2.5, 2.5]
    assert ema[1].running_mean.tolist() == ema[1].running_var.tolist() == [3.0, 3.0, 3.0]


# ------------------------------------------------------------------------------------------ the Accelerator


def test_a_gpu_is_trained_on_where_there_is_one_unless_train_device_is_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.accelerator_available() == "cuda"
    assert distributed.training_device(load_config(None, [])) == "cuda"
    assert distributed.training_device(load_config(None, ["train.device=cpu"])) == "cpu"


def accelerator_kwargs(monkeypatch, world_size: int, device: str, *overrides: str) -> dict:
    """The keywords build_accelerator gives Accelerate in one process of a launch of ``world_size`` (torchrun's and
    accelerate launch's WORLD_SIZE) training on ``device``."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setattr(distributed, "training_device", lambda cfg: device)
    monkeypatch.setattr(distributed, "Accelerator", lambda **kwargs: kwargs)
    return distributed.build_accelerator(load_config(None, ["train.precision=fp32", *overrides]))


@pytest.mark.parametrize(("device", "backend"), [("cpu", "gloo"), ("cuda", "nccl")])
def test_the_processes_of_a_launch_form_one_group_on_the_devices_backend_that_waits_train_dist_timeout_s(
    monkeypatch, device, backend
):
    kwargs = accelerator_kwargs(monkeypatch, 2, device, "train.dist_timeout_s=90")
    (group,) = [h for h in kwargs["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
    assert (group.backend, group.timeout) == (backend, timedelta(seconds=90))
    assert kwargs["cpu"] is (device == "cpu")  # without CUDA, what makes the processes one group


def test_a_deepspeed_run_gets_the_global_batch_of_every_process_of_the_launch(monkeypatch):
    kwargs = accelerator_kwargs(monkeypatch, 2, "cpu", f"train.deepspeed={ZERO2}", "data.batch_size=8",
                                "train.grad_accum=2")
    assert kwargs["deepspeed_plugin"].deepspeed_config["train_batch_size"] == 8 * 2 * 2
    (group,) = [h for h in kwargs["kwargs_handlers"] if isinstance(h, InitProcessGroupKwargs)]
    assert group.backend == "gloo"  # Accelerate leaves a DeepSpeed run's backend unset without CUDA


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_train_compile_false_wins_over_a_launchers_dynamo_backend(monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # `accelerate launch --dynamo_backend inductor`
    accelerator = distributed.build_accelerator(load_config(None, ["train.precision=fp32", "train.device=cpu"]))
    assert accelerator.state.dynamo_plugin.backend.value == "NO"


def test_cuda_graphs_are_replayed_only_by_a_model_compiled_in_reduce_overhead_mode():
    assert distributed.uses_cuda_graphs(True, "reduce-overhead")
    assert not distributed.uses_cuda_graphs(False, "reduce-overhead")
    assert not distributed.uses_cuda_graphs(True, "default")


# ------------------------------------------------------------------------------------------ same config


def test_ranks_started_with_different_configs_are_refused_naming_the_keys_and_each_ranks_value(monkeypatch):
    mine = load_config(None, ["optim.lr=0.1"])
    theirs = flatten_config(load_config(None, ["optim.lr=0.01", "data.batch_size=4"]).to_dict())
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj, theirs])
    with pytest.raises(ConfigError, match=r"started with different configs \(data.batch_size: rank 0 16, rank 1 4; "
                                          r"optim.lr: rank 0 0.1, rank 1 0.01\): start every node with the same"):
        check_same_config(mine)


def test_node_local_keys_and_logging_may_differ_between_ranks(monkeypatch):
    local = ["data.root=/scratch/node1/coco", "data.shards=/scratch/node1/shards", "data.workers=2",
             "data.prefetch_factor=4", "data.pin_memory=false", "data.decode=gpu", "data.device_prefetch=0",
             "data.augment_process=true",
             "data.worker_timeout_s=60", "data.worker_start=spawn", "graph.stats=/scratch/node1/stats.pkl",
             "graph.embeddings=/local/glove.pkl", "model.pretrained=/local/resnet101.pth",
             "train.deepspeed=/local/zero2.json", "train.side_stream=true", "log.wandb=disabled"]
    theirs = flatten_config(load_config(None, local).to_dict())
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj, theirs])
    check_same_config(load_config(None, []))


def test_a_config_that_differs_on_any_rank_is_refused_not_only_on_the_one_after_this(monkeypatch):
    mine = load_config(None, ["optim.lr=0.1"])
    theirs = flatten_config(load_config(None, ["optim.lr=0.01"]).to_dict())
    monkeypatch.setattr(distributed, "gather_objects", lambda obj: [obj, obj, theirs])
    with pytest.raises(ConfigError, match=r"\(optim.lr: rank 0 0.1, rank 1 0.1, rank 2 0.01\)"):
        check_same_config(mine)
