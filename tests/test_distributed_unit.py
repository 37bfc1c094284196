"""Distributed plumbing in one process: the DeepSpeed JSON derived from our config, and the collectives the training
loop relies on (BatchNorm statistics averaged, a stop agreed on, objects gathered), on a real one-rank gloo group
and on a faked second rank where only two ranks can show the difference."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mlgcn_dist.config import ConfigError, load_config
from mlgcn_dist.distributed import any_rank, average_running_stats, deepspeed_config, gather_objects

CPU = torch.device("cpu")


def ds_json(tmp_path: Path, **blocks) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **blocks}))
    return path


@pytest.fixture
def no_launcher_env(monkeypatch):
    """No `accelerate launch` DeepSpeed settings leak in from the environment."""
    for key in ("ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------ DeepSpeed JSON


@pytest.mark.usefixtures("no_launcher_env")
@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_deepspeed_json_takes_batch_sizes_clipping_and_precision_from_our_config_over_its_own(tmp_path, precision):
    path = ds_json(tmp_path, gradient_clipping=1.0, train_batch_size=1, gradient_accumulation_steps=1,
                   bf16={"enabled": precision != "bf16"})
    cfg = load_config(None, [f"train.deepspeed={path}", "data.batch_size=8", "train.grad_accum=3",
                             "optim.clip_grad=5.0", f"train.precision={precision}"])
    ds = deepspeed_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 8 * 3 * 4  # the global batch: per device x accumulation x processes
    assert ds["gradient_clipping"] == 5.0
    assert ds["bf16"]["enabled"] is (precision == "bf16") and ds["fp16"]["enabled"] is (precision == "fp16")
    assert ds["zero_optimization"] == {"stage": 2}  # DeepSpeed's own business is kept as written


def test_under_accelerate_launch_without_train_deepspeed_the_launchers_json_is_read(tmp_path, no_launcher_env):
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_json(tmp_path, wall_clock_breakdown=True)))
    ds = deepspeed_config(load_config(None, ["data.batch_size=4"]), world_size=2)
    assert ds["wall_clock_breakdown"] is True and ds["train_batch_size"] == 8


def test_under_accelerate_launch_without_any_json_the_launchers_zero_stage_is_used(no_launcher_env):
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "1")
    assert deepspeed_config(load_config(None, []), world_size=1)["zero_optimization"] == {"stage": 1}


@pytest.mark.parametrize("stage", [3, "3", None, True])
def test_a_deepspeed_json_asking_for_zero3_or_no_stage_number_is_refused_naming_the_file(tmp_path, stage,
                                                                                          no_launcher_env):
    path = ds_json(tmp_path, zero_optimization={"stage": stage})
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: zero_optimization.stage must be 0, 1 or 2"):
        deepspeed_config(load_config(None, [f"train.deepspeed={path}"]), world_size=2)


def test_accelerate_launch_asking_for_zero3_is_refused(no_launcher_env):
    no_launcher_env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(ConfigError, match="<accelerate launcher>: zero_optimization.stage must be 0, 1 or 2, got 3"):
        deepspeed_config(load_config(None, []), world_size=1)


@pytest.mark.usefixtures("no_launcher_env")
def test_a_deepspeed_json_without_zero_optimization_or_with_a_stage_as_text_is_read_as_deepspeed_reads_it(tmp_path):
    path = tmp_path / "no_zero.json"
    path.write_text(json.dumps({"wall_clock_breakdown": False}))
    assert "zero_optimization" not in deepspeed_config(load_config(None, [f"train.deepspeed={path}"]), world_size=1)
    path = ds_json(tmp_path, zero_optimization={"stage": "2"})
    assert deepspeed_config(load_config(None, [f"train.deepspeed={path}"]), world_size=1)["zero_optimization"]


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
