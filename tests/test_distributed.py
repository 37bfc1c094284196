"""Distributed training as users run it: real processes (torchrun / accelerate launch), gloo on loopback, CPU.

Each claim of the engine is proven here on a tiny toy dataset: DDP equals one process with the same global batch,
two "nodes" train together, DeepSpeed ZeRO-2 keeps the per-group LRs, evaluation counts each image exactly once on
any number of processes, a killed run resumes to the same result, and SIGUSR1 checkpoints and asks for a requeue.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from launching import (
    REPO,
    TRAIN,
    accelerate_cmd,
    check,
    free_port,
    kill_tree,
    overrides,
    process_env,
    run,
    summary,
    torchrun_cmd,
    train_log,
    wait_for,
    weights,
)

pytestmark = pytest.mark.slow


def test_two_process_ddp_and_zero2_with_optimizer_offload_equal_one_process_with_the_same_global_batch(
    tiny_toy, tmp_path
):
    """ZeRO-2 with its optimiser offloaded to the CPU trained with Adam (Accelerate swapped DeepSpeedCPUAdam in for
    our SGD without a word): its weights now equal SGD's as DDP's do."""
    offload = tmp_path / "offload.json"
    offload.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    one, ddp, zero2 = tmp_path / "one", tmp_path / "ddp", tmp_path / "zero2_offload"
    check(run(torchrun_cmd(1, overrides(tiny_toy, one, "data.batch_size=16"))))
    check(run(torchrun_cmd(2, overrides(tiny_toy, ddp, "data.batch_size=8"))))
    check(run(torchrun_cmd(2, overrides(tiny_toy, zero2, "data.batch_size=8", f"train.deepspeed={offload}")),
              timeout=600))
    w1 = weights(one)
    for two in (ddp, zero2):
        w2 = weights(two)
        assert w1.keys() == w2.keys()
        for key in w1:
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5, msg=f"{two.name}: {key} differs")
        assert summary(two)["world_size"] == 2 and summary(two)["global_batch"] == 16
        # The logged loss is the global batch's, the mean over the processes (it was rank 0's own half).
        losses = [[r["train/loss"] for r in train_log(run_dir)] for run_dir in (one, two)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4), two.name


def test_a_micro_batch_of_only_unreadable_images_on_one_rank_neither_hangs_nor_stops_ddp(tiny_toy, tmp_path):
    """Batches of one image: the rank that meets the truncated one steps on a stand-in, the other on an image,
    and their gradient all-reduces still pair up."""
    toy = Path(shutil.copytree(tiny_toy, tmp_path / "toy"))
    image = sorted((toy / "train2014").glob("*.jpg"))[0]
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    run_dir = tmp_path / "run"
    check(run(torchrun_cmd(2, overrides(toy, run_dir, "data.batch_size=1", "data.max_bad_fraction=0.5",
                                        "train.dist_timeout_s=60")), timeout=240))
    assert summary(run_dir)["bad_samples"] == 1


def test_backbone_and_head_learning_rates_follow_lrp_under_ddp(tiny_toy, tmp_path):
    run_dir = tmp_path / "lrp"
    check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, "optim.lr=0.2", "optim.lrp=0.1"))))
    first = train_log(run_dir)[0]
    assert first["train/lr_head"] == pytest.approx(0.2)
    assert first["train/lr_backbone"] == pytest.approx(0.02)


def test_two_nodes_on_loopback_train_together_and_the_runs_messages_are_printed_once_not_per_node(tiny_toy, tmp_path):
    """A SLURM job's nodes write into one log: the metrics tables and the best mAP come from global rank 0 alone
    (Accelerate's own print speaks once per node)."""
    run_dir = tmp_path / "nodes"
    port = free_port()
    procs = []
    for machine_rank in (0, 1):
        cmd = accelerate_cmd(
            2, overrides(tiny_toy, run_dir), "--multi_gpu", "--num_machines", "2", "--machine_rank",
            str(machine_rank), "--main_process_ip", "127.0.0.1", port=port,
        )
        # accelerate_cmd says one machine; the flags given later on the command line win.
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    assert summary(run_dir)["world_size"] == 2 and summary(run_dir)["system"]["num_nodes"] == 2
    assert "best mAP" in outputs[0] and "mAP" in outputs[0] and "LR per group" in outputs[0]
    assert "best mAP" not in outputs[1] and "LR per group" not in outputs[1] and "OF1" not in outputs[1]


def test_two_nodes_started_with_different_configs_both_stop_at_once_naming_the_key(tiny_toy, tmp_path):
    """A node given another optim.lr trained other weights, silently; another data.batch_size hung until
    train.dist_timeout_s (600 s by default) with a bare gloo timeout."""
    run_dir, port, procs = tmp_path / "nodes", free_port(), []
    for machine_rank, extra in ((0, "data.batch_size=8"), (1, "data.batch_size=4")):
        cmd = accelerate_cmd(
            2, overrides(tiny_toy, run_dir, extra, "train.dist_timeout_s=120"), "--multi_gpu", "--num_machines", "2",
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", port=port,
        )
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=100)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode != 0
        assert ("the ranks of this run were started with different configs (data.batch_size: rank 0 8, rank 1 4)"
                in out), out[-3000:]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("launcher", ["accelerate", "accelerate_config_file", "torchrun"])
def test_deepspeed_zero2_through_accelerate_keeps_per_group_learning_rates(launcher, tiny_toy, tmp_path):
    """ZeRO-2 via `accelerate launch --use_deepspeed`, via the README's `accelerate launch --config_file
    configs/accelerate/deepspeed_zero2.yaml` (its DeepSpeed JSON named there, not by train.deepspeed), and via
    torchrun + our DeepSpeed JSON: same engine."""
    run_dir = tmp_path / "zero2"
    zero2 = () if launcher == "accelerate_config_file" else (f"train.deepspeed={REPO / 'configs/deepspeed/zero2.json'}",)
    args = overrides(tiny_toy, run_dir, "optim.lr=0.2", "optim.lrp=0.1", *zero2)
    if launcher == "accelerate":
        cmd = accelerate_cmd(2, args, "--use_deepspeed", "--zero_stage", "2")
    elif launcher == "accelerate_config_file":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs/accelerate/deepspeed_zero2.yaml"), "--num_processes", "2",
               "--main_process_port", str(free_port()), TRAIN, *args]
    else:
        cmd = torchrun_cmd(2, args)
    proc = check(run(cmd, timeout=600))
    assert "DEEPSPEED on cpu: world size 2" in proc.stdout + proc.stderr
    first = train_log(run_dir)[0]
    assert first["train/lr_head"] == pytest.approx(0.2)
    assert first["train/lr_backbone"] == pytest.approx(0.02)
    assert summary(run_dir)["world_size"] == 2


@pytest.mark.parametrize("head", ["gcn", "hgat"])
def test_deepspeed_in_bf16_feeds_its_bf16_model_bf16_images_in_training_and_evaluation(head, tiny_toy, tmp_path):
    """DeepSpeed runs the model in bf16 outright, without autocast: fp32 images failed the first convolution, and
    the GCN's fp32 graph buffers its first matmul."""
    run_dir = tmp_path / "zero2_bf16"
    args = overrides(tiny_toy, run_dir, f"train.deepspeed={REPO / 'configs/deepspeed/zero2.json'}",
                     "train.precision=bf16", "train.ema_decay=0.9", f"model.head={head}")
    check(run(torchrun_cmd(2, args), timeout=600))
    assert summary(run_dir)["final"]["model"]["mAP"] > 0 and summary(run_dir)["final"]["ema"]["mAP"] > 0


# launch/train.py with the third micro-batch's loss finite and its gradient NaN.
NAN_GRADIENT_AT_THE_THIRD_CALL = f"""
import sys
import pytest
sys.path.insert(0, {str(Path(__file__).parent)!r})
from launching import losses_changed_at_the_third_call, nan_gradient_with_a_finite_loss
from mlgcn_dist.cli import main
losses_changed_at_the_third_call(pytest.MonkeyPatch(), nan_gradient_with_a_finite_loss)
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_a_non_finite_gradient_under_a_finite_loss_stops_a_zero2_run_as_it_stops_ddp(tiny_toy, tmp_path):
    """ZeRO skips a step whose gradient norm is not finite: the run went on skipping (one NaN gradient every step
    "finished" with no update applied and exit 0), where DDP stops at the non-finite weights."""
    script, run_dir = tmp_path / "nan_gradient_train.py", tmp_path / "run"
    script.write_text(NAN_GRADIENT_AT_THE_THIRD_CALL)
    args = overrides(tiny_toy, run_dir, f"train.deepspeed={REPO / 'configs/deepspeed/zero2.json'}")
    proc = run([*torchrun_cmd(2, args)[:-len(args) - 1], str(script), *args], timeout=600)
    assert proc.returncode != 0
    assert "NonFiniteLossError: non-finite gradient at step 3 (epoch 0) with a finite loss: DeepSpeed skipped " \
           "the update; last good checkpoint: none" in proc.stderr, proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step-*"))


def test_a_deepspeed_resume_on_another_process_count_is_one_message_naming_both_counts_before_training(
    tiny_toy, tmp_path
):
    """ZeRO partitions the optimiser state per process and cannot partition it anew: DeepSpeed said so with a
    ZeRORuntimeException once the model and data were set up, in every rank's traceback."""
    run_dir, zero2 = tmp_path / "zero2", f"train.deepspeed={REPO / 'configs/deepspeed/zero2.json'}"
    check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, zero2, "data.steps_per_epoch=2"))))
    (step,) = sorted((run_dir / "checkpoints").glob("step-*"))
    proc = run(torchrun_cmd(1, overrides(tiny_toy, run_dir, zero2, "data.steps_per_epoch=2", "train.epochs=2",
                                         "train.resume=auto")))
    assert proc.returncode != 0
    assert (f"train.resume: checkpoint {step} was saved by DeepSpeed ZeRO on 2 processes and this run has 1"
            in proc.stderr), proc.stderr[-3000:]
    assert "ZeRORuntimeException" not in proc.stderr and "epoch 1" not in proc.stderr


def test_evaluation_is_identical_on_one_two_and_three_processes_and_counts_each_image_once(tiny_toy, tmp_path):
    run_dir = tmp_path / "trained"
    check(run(torchrun_cmd(1, overrides(tiny_toy, run_dir))))
    results = {}
    for nproc in (1, 2, 3):
        out = tmp_path / f"metrics{nproc}.json"
        cmd = [*torchrun_cmd(nproc, [])[:-1], "-m", "mlgcn_dist.cli", "evaluate", "--checkpoint", str(run_dir),
               "--metrics-out", str(out), "--scores-out", str(tmp_path / f"scores{nproc}.jsonl")]
        check(run(cmd))
        results[nproc] = json.loads(out.read_text())
        ids = [json.loads(line)["image_id"] for line in (tmp_path / f"scores{nproc}.jsonl").read_text().splitlines()]
        assert len(ids) == len(set(ids)) == results[nproc]["num_images"]
    n_val = results[1]["num_images"]
    assert n_val > 30  # the toy val split minus its images without annotations
    for nproc in (2, 3):
        assert results[nproc]["num_images"] == n_val and results[nproc]["duplicates"] == 0
        for key in ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1"):
            assert results[nproc][key] == pytest.approx(results[1][key], abs=1e-9), key


def test_the_map_measured_while_training_on_two_processes_is_the_saved_checkpoints_for_model_and_ema(
    tiny_toy, tmp_path
):
    """With BatchNorm, each rank's last forward passes move its own running statistics: averaged over the ranks
    before evaluation, every rank scores its share with the model that is saved. The EMA starts from the weights
    DDP gives every rank (rank 0's), not from each rank's own initialisation: after 4 updates that would still
    weigh 4.5% of it (the decay warms up from 2/11), and each rank would score its share with another EMA."""
    run_dir = tmp_path / "bn"
    check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, "model.backbone=cifar_resnet_tiny", "train.ema_decay=0.9",
                                        "data.batch_size=4", "data.steps_per_epoch=2", "train.epochs=2"))))
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    for weights_name in ("model", "ema"):
        out = tmp_path / f"{weights_name}.json"
        check(run([sys.executable, "-m", "mlgcn_dist.cli", "evaluate", "--checkpoint",
                   str(run_dir / "checkpoints/last.pt"), "--weights", weights_name, "--metrics-out", str(out)]))
        assert json.loads(out.read_text())["mAP"] == pytest.approx(logged[weights_name]["mAP"], abs=1e-6), weights_name


def test_kill_9_mid_run_then_resume_auto_ends_equal_to_an_uninterrupted_run(tiny_toy, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    extra = ("train.epochs=3", "data.steps_per_epoch=15")  # long enough epochs for the kill to land mid-run
    check(run(torchrun_cmd(2, overrides(tiny_toy, straight, *extra))))

    cmd = torchrun_cmd(2, overrides(tiny_toy, killed, *extra))
    proc = subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    ckpts = killed / "checkpoints"
    wait_for(lambda: any(p.name.startswith("step-") for p in ckpts.glob("step-*")), 240, proc)
    kill_tree(proc)

    resumed = check(run(torchrun_cmd(2, overrides(tiny_toy, killed, *extra, "train.resume=auto"))))
    match = re.search(r"resumed from \S+: epoch (\d+)", resumed.stdout + resumed.stderr)
    assert match and int(match.group(1)) < 3, "the kill should land before the run finished"
    a, b = summary(straight), summary(killed)
    assert b["global_step"] == a["global_step"]
    assert b["final"]["model"]["mAP"] == pytest.approx(a["final"]["model"]["mAP"], abs=1e-6)
    for key, value in weights(straight).items():
        torch.testing.assert_close(weights(killed)[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("augment", [(), ("data.decode=gpu", "data.augment_process=true")],
                         ids=["loader", "augment-process"])
def test_sigusr1_checkpoints_marks_requeue_and_exits_with_the_requeue_code(augment, tiny_toy, tmp_path):
    """Every process of the job gets the signal, each rank's augment process too (data.augment_process), which
    goes on serving its trainer until it has saved, and ends with it."""
    run_dir = tmp_path / "preempted"
    cmd = torchrun_cmd(2, overrides(tiny_toy, run_dir, "train.epochs=200", "train.max_steps=0", *augment))
    proc = subprocess.Popen(cmd, cwd=REPO, env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "train_log.jsonl").exists(), 180, proc)
        signalled = psutil.Process(proc.pid).children(recursive=True)
        spawned = sum("spawn_main" in " ".join(child.cmdline()) for child in signalled)  # augment processes
        for child in signalled:
            child.send_signal(signal.SIGUSR1)  # what SLURM's --signal delivers to the job's tasks
        out, _ = proc.communicate(timeout=120)
        left = [child.pid for child in signalled if child.is_running() and child.status() != psutil.STATUS_ZOMBIE]
    finally:
        kill_tree(proc)
    assert "exitcode: 75" in out or "exitcode  : 75" in out or proc.returncode == 75, out[-4000:]
    assert (run_dir / "REQUEUE").is_file()
    assert list((run_dir / "checkpoints").glob("step-*"))
    assert not left
    assert spawned == (2 if augment else 0)  # one a rank, signalled too
    if augment:
        assert out.count("GPU decode and augment in a process of their own") == 1  # said once, by rank 0
    # ... and the requeued job picks it up
    resumed = check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, "train.epochs=1", "train.resume=auto",
                                                  *augment))))
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert not (run_dir / "REQUEUE").exists()


def eager_compile_kwargs(cfg) -> dict:
    """Accelerate's keywords for train.compile=true with dynamo's "eager" backend: the model is wrapped as for
    Inductor (torch.compile's OptimizedModule around the DDP one), without Inductor's C++ compile (half a minute
    for the toy model on this CPU)."""
    from accelerate.utils import TorchDynamoPlugin

    return {"dynamo_plugin": TorchDynamoPlugin(backend="eager")} if cfg.train.compile else {"dynamo_backend": "no"}


def train_counting_allreducing_micro_batches(args: list[str]) -> None:
    """`mlgcn train` compiled eagerly, printing how many of its micro-batches all-reduced their gradients (DDP's
    communication hook ran in their backward). Run in each process of a launch (see the test below)."""
    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from mlgcn_dist import distributed, engine
    from mlgcn_dist.cli import main

    distributed._compile_kwargs = eager_compile_kwargs
    reduced: list[bool] = []  # per micro-batch
    prepare, train_step = Accelerator.prepare, engine.Trainer._train_step

    def hook(process_group, bucket):
        reduced[-1] = True
        return allreduce_hook(process_group, bucket)

    def prepare_with_hook(self, *objects):
        prepared = prepare(self, *objects)
        prepared[0]._orig_mod.register_comm_hook(None, hook)  # the DDP module inside the compiled wrapper
        return prepared

    def counted_step(self, *step_args, **kwargs):
        reduced.append(False)
        return train_step(self, *step_args, **kwargs)

    Accelerator.prepare, engine.Trainer._train_step = prepare_with_hook, counted_step
    status = main(["train", *args])
    print(f"ALLREDUCED {sum(reduced)} OF {len(reduced)} MICRO-BATCHES", flush=True)
    sys.exit(status)


def test_a_compiled_ddp_run_all_reduces_once_per_accumulation_and_saves_the_bare_models_weight_names(tiny_toy,
                                                                                                   tmp_path):
    """Accelerate's unwrap_model keeps the compiled wrapper by default by putting the bare module in place of the
    DDP one inside it: the engine's first unwrap (the EMA's update) hid DDP's no_sync from `accumulate`, and every
    micro-batch all-reduced (3 of 4 here), while best.pt's names gained an `_orig_mod.` prefix."""
    script = tmp_path / "train_counting.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nimport test_distributed\n"
                      "test_distributed.train_counting_allreducing_micro_batches(sys.argv[1:])\n")
    run_dir = tmp_path / "compiled"
    args = overrides(tiny_toy, run_dir, "train.compile=true", "train.grad_accum=2", "train.epochs=2",
                     "train.ema_decay=0.9")
    cmd = [*torchrun_cmd(2, [])[:-1], str(script), *args]
    out = check(run(cmd)).stdout
    steps = summary(run_dir)["global_step"]
    assert steps >= 2
    assert re.findall(r"ALLREDUCED (\d+) OF (\d+)", out) == [(str(steps), str(2 * steps))] * 2
    names = list(torch.load(run_dir / "checkpoints/best.pt", map_location="cpu", weights_only=True)["model"])
    assert names and not [name for name in names if name.startswith(("_orig_mod.", "module."))]


def test_a_resume_on_fewer_processes_counts_every_images_of_both_sessions_in_the_runs_img_per_s(tiny_toy, tmp_path):
    """The run's img_per_s is its images over its time: it counted rank 0's images and multiplied them by the
    resumed session's process count, so a run trained on 2 processes and resumed on 1 lost half of its first
    session's images."""
    run_dir = tmp_path / "run"
    check(run(torchrun_cmd(2, overrides(tiny_toy, run_dir, "data.steps_per_epoch=2"))))
    check(run(torchrun_cmd(1, overrides(tiny_toy, run_dir, "data.steps_per_epoch=2", "train.epochs=2",
                                        "train.resume=auto"))))
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    state = json.loads((newest / "train_state.json").read_text())["state"]
    assert state["trained_images"] == 2 * 2 * 8 + 2 * 8  # 2 steps on 2 processes, then 2 on 1; batches of 8
    assert summary(run_dir)["img_per_s"] == pytest.approx(state["trained_images"] / state["train_seconds"])
