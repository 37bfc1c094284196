"""Starting real training processes from tests: torchrun / accelerate launch on loopback, CPU, gloo."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
TRAIN = str(REPO / "launch" / "train.py")


def losses_changed_at_the_third_call(monkeypatch, change: Callable) -> None:
    """The engine's loss function, with ``change(value, logits)`` in place of the third micro-batch's loss (in a
    training process started by a test too: pass it ``pytest.MonkeyPatch()``)."""
    from mlgcn_dist import engine

    real_build_loss = engine.build_loss

    def build_loss(cfg):
        criterion, calls = real_build_loss(cfg), []

        def loss(logits, targets):
            calls.append(1)
            value = criterion(logits, targets)
            return change(value, logits) if len(calls) == 3 else value

        return loss

    monkeypatch.setattr(engine, "build_loss", build_loss)


def another_ranks_training_counts(monkeypatch, theirs: Callable[[tuple[int, int]], tuple[int, int]]) -> None:
    """The engine's gather of each rank's training counts (images trained, images skipped) answers as if a second
    rank counted ``theirs(mine)``; every other gather stays this process's alone."""
    from mlgcn_dist import distributed

    def gather_objects(mine):
        training_counts = isinstance(mine, tuple) and all(isinstance(n, int) for n in mine)
        return [mine, theirs(mine)] if training_counts else [mine]

    monkeypatch.setattr(distributed, "gather_objects", gather_objects)


def nan_gradient_with_a_finite_loss(value: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """The loss unchanged (plus 0) with a NaN gradient: sqrt'(0) is inf, times the zero gradient of logits - logits."""
    return value + torch.sqrt((logits - logits.detach()).abs().sum())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",  # two processes on two cores: one thread each, no oversubscription
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions")),
    )
    env.update(extra)
    return env


def torchrun_cmd(nproc: int, script_args: list[str], port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(port or free_port()), TRAIN, *script_args]


def accelerate_cmd(nproc: int, script_args: list[str], *flags: str, port: int | None = None) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(nproc), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port or free_port()),
            *flags, TRAIN, *script_args]


def run(cmd: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=process_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)
    return proc


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def train_log(run_dir: Path) -> list[dict]:
    path = run_dir / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def overrides(toy: Path, run_dir: Path, *extra: str) -> list[str]:
    """A deterministic, BatchNorm-free tiny model: per-sample computation independent of the batch split; on
    the CPU in fp32 (gloo), also on a machine with GPUs."""
    return [
        "--config", str(REPO / "configs/toy.yaml"),
        f"data.root={toy}", "data.image_size=32", "data.workers=0", "data.batch_size=8",
        "model.backbone=cifar_plainnet", "model.gcn_hidden=32",
        "train.epochs=1", "train.log_every=1", "train.resume=none", f"train.output_dir={run_dir}",
        "train.deterministic=true", "train.ema_decay=0", "optim.warmup_epochs=0", "log.wandb=disabled",
        "train.device=cpu", "train.precision=fp32",
        *extra,
    ]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def wait_for(predicate: Callable[[], bool], timeout: float, proc: subprocess.Popen, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            out = proc.stdout.read()[-4000:] if proc.stdout else ""
            raise AssertionError(f"run ended (exit {proc.returncode}) before the condition:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (torchrun starts its workers in their own process groups); nothing to do
    for a launcher that already ended."""
    if proc.poll() is not None:
        return
    victims = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for victim in victims:
        victim.kill()
    psutil.wait_procs(victims, timeout=30)
    proc.wait(timeout=30)
