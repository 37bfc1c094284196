"""Checkpoints that are never half-written, resume that finds the last complete one, and a run-directory lock.

Layout of ``<run_dir>/checkpoints/``:

- ``step-00001234/``: full training state through Accelerate's ``save_state`` (model, optimizer, grad scaler, the
  registered LR scheduler, EMA and :class:`TrainState`, RNG states of every rank; DeepSpeed's sharded states too).
  Written into ``.tmp-step-00001234/`` by all ranks and renamed by the main process once every rank is done, so a
  directory named ``step-*`` is complete by construction (and counts only with its ``train_state.json``, written
  last). "Newest" means last saved (``saved_at`` in that file), not highest step: a run resumed from an older
  checkpoint continues its own line. The newest ``train.keep_checkpoints`` are kept; one rotated out is renamed
  out of the listing before it is deleted, so a kill mid-delete leaves nothing that looks complete. Saving a step
  that exists (the epoch's end after a preemption at its last batch) moves the old one aside before the new one
  is renamed in and deletes it after: a kill between the two renames leaves the old one, which still counts. A
  save that fails (a full disk) removes its temporary directory, leaves the older checkpoints as they were and
  raises :class:`CheckpointError` naming the one a resume will use.
- ``best.pt`` / ``last.pt``: portable files (plain ``torch.load``) with the model and EMA weights, the config and the
  label names, for ``mlgcn evaluate``/``predict`` without Accelerate; replaced atomically (tmp + ``os.replace``).
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors import SafetensorError

from mlgcn_dist.config import ConfigError, OptimConfig, shaping_keys_that_differ
from mlgcn_dist.data.records import label_space_difference
from mlgcn_dist.errors import one_line
from mlgcn_dist.files import fsync_directory, fsync_tree, replaced_atomically, write_text_atomic

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_REPLACED = ".replaced-"  # a step-* directory moved aside while a save of the same step is renamed in
_DELETING = ".deleting-"  # a step-* directory rotated out, being deleted


@dataclass
class TrainState:
    """Where training stands; saved inside every checkpoint so resume continues at the right batch."""

    epoch: int = 0  # epoch in progress (or next to start when step_in_epoch == 0)
    step_in_epoch: int = 0  # micro-batches already trained in ``epoch`` (grad_accum per optimiser step)
    global_step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    best_source: str = ""
    # Throughput over the whole run, resumes included: every rank's images (resumes on other process counts too).
    trained_images: int = 0
    train_seconds: float = 0.0
    # False for a checkpoint saved before trained_images counted every rank's images (it held rank 0's).
    images_of_all_ranks: bool = True
    bad_samples: int = 0  # training images skipped as unreadable, all ranks, resumes included
    # The epoch's layout when saved: a resume with another one rescales the schedule (Trainer).
    steps_per_epoch: int = 0  # optimiser steps
    micro_batches: int = 0
    data_order: str = ""  # what a shard epoch's sample order depends on besides (seed, epoch): see Trainer

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.images_of_all_ranks = False  # unless the checkpoint says so: an older one counted rank 0's images
        for key, value in state.items():
            setattr(self, key, value)

    def count_images_of_all_ranks(self, world_size: int) -> None:
        """Bring an older checkpoint's ``trained_images`` (rank 0's alone) to every rank's, taking this session's
        ``world_size`` for its run's process count: exact when the run that saved it had as many processes (what
        the throughput of such a resume assumed before)."""
        if not self.images_of_all_ranks:
            self.trained_images *= world_size
            self.images_of_all_ranks = True


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (typically a full disk); the message names what is still intact."""


def _write_error(target: Path, err: Exception, intact: str) -> CheckpointError:
    try:
        free = f"{shutil.disk_usage(target.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return CheckpointError(f"could not write {target} ({type(err).__name__}: {err}; {free}); {intact}")


def atomic_torch_save(obj: object, path: Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename: readers see the old or the new file."""
    try:
        with replaced_atomically(path, "wb") as fh:
            torch.save(obj, fh)
    except Exception as err:
        raise _write_error(path, err, f"the previous {path.name}, if any, is intact") from err


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete full-state checkpoints, oldest saved first (temporary and half-deleted directories are never
    listed). A step moved aside for a re-save of it counts while the new one is not yet renamed in."""
    if not ckpt_dir.is_dir():
        return []
    found: dict[str, Path] = {}
    for path in ckpt_dir.iterdir():
        name = path.name.removeprefix(_REPLACED)
        if _STEP_DIR.match(name) and (path / "train_state.json").is_file() and (name == path.name or name not in found):
            found[name] = path
    return sorted(found.values(), key=lambda p: (_saved_at(p), p.name.removeprefix(_REPLACED)))


def _train_state(path: Path) -> dict | str:
    """A complete checkpoint's train_state.json, or what is wrong with it (it is written atomically: damaged
    afterwards)."""
    try:
        record = json.loads((path / "train_state.json").read_text())
    except (OSError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return record if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"


def _saved_record(path: Path) -> dict:
    """The train_state.json of a checkpoint :func:`resolve_resume` accepted ({} if damaged since)."""
    record = _train_state(path)
    return record if isinstance(record, dict) else {}


def _saved_at(path: Path) -> float:
    """When a checkpoint was saved (0 for one saved before that was recorded, or damaged: then by step)."""
    try:
        return float(_saved_record(path).get("saved_at", 0.0))
    except (ValueError, TypeError):
        return 0.0


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """``auto``: the newest complete checkpoint of the run directory, if any; ``none``: start afresh; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir / "checkpoints")
        problems = {p: _damage(p) for p in found}
        if any(problems.values()):
            # Which checkpoint is newest is in train_state.json: falling back to another could skip the newest.
            damaged = [f"{p / 'train_state.json'} ({problem})" for p, problem in problems.items() if problem]
            intact = [p for p, problem in problems.items() if not problem]
            hint = f" or set train.resume={intact[-1]} (the newest intact one)" if intact else ""
            raise ConfigError(f"train.resume=auto: damaged checkpoint state {'; '.join(damaged)}: move that "
                              f"checkpoint out of {run_dir / 'checkpoints'}{hint}")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(f"train.resume={resume}: not a complete checkpoint directory (no train_state.json)")
    if problem := _damage(path):
        raise ConfigError(f"train.resume={resume}: damaged checkpoint state {path / 'train_state.json'} ({problem})")
    return path


def _damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's train_state.json, or None."""
    record = _train_state(path)
    return record if isinstance(record, str) else None


def check_resume_labels(path: Path, label_names: list[str]) -> None:
    """A checkpoint trained on another label space cannot continue on this dataset: say so before any weights load
    (a shape mismatch deep inside ``load_state`` would not name the cause)."""
    saved = _saved_record(path).get("label_names")
    if saved is not None and (difference := label_space_difference(saved, label_names)):
        raise ConfigError(
            f"train.resume: checkpoint {path} was trained on {difference}; resume on the dataset it was trained on, "
            "or start afresh with train.resume=none and another train.output_dir"
        )


def _saved_config(path: Path, section: str) -> dict:
    """A section of the config a checkpoint recorded ({} without that record)."""
    config = _saved_record(path).get("config") or {}
    return config.get(section) or {}


def _saved_train_config(path: Path) -> dict:
    return _saved_config(path, "train")


def check_resume_model(path: Path, model: dict) -> None:
    """A checkpoint of another architecture cannot be resumed: name the keys that differ, before any weights load
    (``load_state`` would list every mismatched tensor instead)."""
    saved = _saved_config(path, "model")
    changed = shaping_keys_that_differ(model, saved)
    if changed:
        raise ConfigError(
            f"train.resume: checkpoint {path} is of another model: {', '.join(changed)}; resume with the model it "
            "was trained with, or start afresh with train.resume=none and another train.output_dir"
        )


# Where Accelerate puts the state of a DeepSpeed engine (DeepSpeed's checkpoint tag), and a DDP model's weights.
_DEEPSPEED_STATE = "pytorch_model"
_DDP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def check_resume_launcher(path: Path, deepspeed: bool, world_size: int) -> None:
    """DeepSpeed and DDP save the training state in different files: resuming one's checkpoint under the other
    fails deep inside with an unrelated error (a bare AssertionError, a missing pytorch_model.bin), so say so first;
    likewise for a DDP checkpoint that lost its weights, and for a ZeRO checkpoint of another process count."""
    saved_by_deepspeed = (path / _DEEPSPEED_STATE).is_dir()
    if saved_by_deepspeed != deepspeed:
        saved, running = ("DeepSpeed", "DDP") if saved_by_deepspeed else ("DDP", "DeepSpeed")
        raise ConfigError(
            f"train.resume: checkpoint {path} was saved by a {saved} run and this run uses {running}: resume it "
            f"under {saved} (the launcher config and train.deepspeed it was trained with), or start afresh with "
            "train.resume=none and another train.output_dir (its best.pt and last.pt evaluate either way)"
        )
    if deepspeed:
        # One optimiser-state partition per data-parallel rank; DeepSpeed cannot partition them anew for another
        # count (without its elastic or universal checkpoints) and says so only after the model and data are set up.
        # In bf16 the files are named bf16_zero_pp_rank_*.
        saved_ranks = len(list((path / _DEEPSPEED_STATE).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))
        if saved_ranks and saved_ranks != world_size:
            raise ConfigError(
                f"train.resume: checkpoint {path} was saved by DeepSpeed ZeRO on {saved_ranks} processes and this "
                f"run has {world_size}: DeepSpeed cannot partition its optimiser state anew for another process "
                f"count. Resume on {saved_ranks} processes, or start afresh with train.resume=none and another "
                "train.output_dir (its best.pt and last.pt evaluate on any count)"
            )
    elif not any((path / name).is_file() for name in _DDP_WEIGHTS):
        raise ConfigError(f"train.resume: checkpoint {path} has lost its weights ({' or '.join(_DDP_WEIGHTS)}): "
                          f"{_OLDER_ONE}")


_OLDER_ONE = "resume from an older checkpoint with train.resume=<its path>, or start afresh with train.resume=none"


# What a resumed run takes from its checkpoint whatever this session's config says: the scheduler's base learning
# rates (set by lr, lrp, lr_scaling and base_batch_size at the fresh start) and the optimiser's param groups
# (momentum, weight decay).
RESUMED_OPTIM_KEYS = ("lr", "lrp", "lr_scaling", "base_batch_size", "momentum", "weight_decay")


def optim_as_resumed(path: Path | None, optim: OptimConfig) -> tuple[OptimConfig, list[str]]:
    """``optim`` with the :data:`RESUMED_OPTIM_KEYS` the checkpoint recorded, so that the run's config.yaml,
    summary and W&B config say what it trains with, and the keys asked for otherwise (``optim.lr=0.5 (checkpoint:
    0.1)``)."""
    saved = _saved_config(path, "optim") if path is not None else {}
    kept = {key: saved[key] for key in RESUMED_OPTIM_KEYS if key in saved}
    ignored = [f"optim.{key}={getattr(optim, key)} (checkpoint: {value})" for key, value in kept.items()
               if getattr(optim, key) != value]
    return replace(optim, **kept), ignored


def saved_precision(path: Path | None) -> str | None:
    """The precision a checkpoint was trained in (its saved config); None without a checkpoint or that record."""
    if path is None:
        return None
    precision = _saved_train_config(path).get("precision")
    return precision if precision in ("fp32", "bf16", "fp16") else None


def check_resume_ema(path: Path, ema_decay: float) -> None:
    """An EMA model is part of the saved state: a resume must keep it on or off as the checkpoint has it (the
    load would otherwise fail counting Accelerate's custom objects, naming neither the key nor a fix)."""
    saved = _saved_train_config(path).get("ema_decay")
    if isinstance(saved, (int, float)) and (saved > 0) != (ema_decay > 0):
        state = "with an EMA model" if saved > 0 else "without an EMA model"
        raise ConfigError(
            f"train.ema_decay={ema_decay:g}: checkpoint {path} was trained {state} (train.ema_decay={saved:g}); "
            "resume with an EMA decay that is "
            f"{'above 0' if saved > 0 else '0'} (another value above 0 only changes the decay), or start afresh "
            "with train.resume=none"
        )


def check_resume_precision(path: Path, saved: str | None, precision: str) -> None:
    """fp16 resumes only from fp16: the checkpoint at ``path``, trained in ``saved`` (:func:`saved_precision`), of
    another precision holds no loss-scaler state, which ``load_state`` would fail to find (the other switches
    load, and change the run's numerics as asked)."""
    if precision == "fp16" and saved not in (None, "fp16"):
        raise ConfigError(
            f"train.precision=fp16: checkpoint {path} was trained in {saved} and holds no loss-scaler state; "
            f"resume with train.precision={saved} (or auto, which keeps it), or start afresh with train.resume=none"
        )


class CheckpointManager:
    def __init__(self, accelerator: Accelerator, run_dir: Path, keep: int):
        self.accelerator = accelerator
        self.dir = run_dir / "checkpoints"
        self.keep = max(keep, 1)

    def save(self, state: TrainState, config: dict, label_names: list[str]) -> Path:
        """Full state from every rank into a temporary directory, renamed when all ranks are done."""
        acc = self.accelerator
        final = self.dir / f"step-{state.global_step:08d}"
        tmp = self.dir / f".tmp-{final.name}"
        try:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # left over from a run killed while saving
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            acc.save_state(str(tmp))
            acc.wait_for_everyone()  # every rank's shard and RNG state is on disk before the directory is published
            if acc.is_main_process:
                # Accelerate and DeepSpeed write without fsync: after a power loss the directory could otherwise
                # count as complete (train_state.json is fsynced) with its weights or optimiser state lost.
                fsync_tree(tmp)
                # train_state.json is the last file written: its presence inside a step-* directory is what
                # `resolve_resume` and humans check.
                record = {"state": state.state_dict(), "config": config, "label_names": list(label_names),
                          "saved_at": time.time()}
                write_text_atomic(tmp / "train_state.json", json.dumps(record))
                aside = final.with_name(_REPLACED + final.name)
                if final.exists():
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(final, aside)  # still counted (complete_checkpoints) until the new one is in
                os.replace(tmp, final)
                fsync_directory(self.dir)
                shutil.rmtree(aside, ignore_errors=True)
                self._rotate()
        except Exception as err:
            # Typically a full disk, which surfaces as OSError, torch's RuntimeError or a SafetensorError: free the
            # space the partial checkpoint holds and name the one a resume will use.
            shutil.rmtree(tmp, ignore_errors=True)
            found = complete_checkpoints(self.dir)
            newest = f"the newest complete checkpoint {found[-1]}" if found else "no complete checkpoint"
            raise _write_error(final, err, f"{newest} is intact (train.resume=auto uses it)") from err
        acc.wait_for_everyone()
        return final

    def _rotate(self) -> None:
        """Delete all but the newest ``keep``, each renamed out of the listing first, and what a kill left behind
        (a half-deleted directory, a step moved aside whose re-save is in)."""
        for old in complete_checkpoints(self.dir)[: -self.keep]:
            doomed = old.with_name(_DELETING + old.name)
            shutil.rmtree(doomed, ignore_errors=True)  # what an earlier delete left (NFS .nfs* files)
            try:
                os.replace(old, doomed)
            except OSError:  # the new checkpoint is in: an old one that will not go is deleted in place, or stays
                shutil.rmtree(old, ignore_errors=True)
        replaced = [p for p in self.dir.glob(_REPLACED + "*") if (self.dir / p.name.removeprefix(_REPLACED)).exists()]
        for leftover in [*self.dir.glob(_DELETING + "*"), *replaced]:
            shutil.rmtree(leftover, ignore_errors=True)

    def load(self, path: Path) -> None:
        try:
            self.accelerator.load_state(str(path))
        except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, SafetensorError) as err:
            # What a file cut short or garbled raises (torch.load: RuntimeError from its zip reader).
            raise ConfigError(f"train.resume: checkpoint {path} could not be loaded ({one_line(err)}); if it is "
                              f"damaged, {_OLDER_ONE}") from err
        # load_state restores Accelerate's micro-batch counter, which places each optimiser step (every
        # grad_accum-th micro-batch). A checkpoint is taken only between optimiser steps, so the next micro-batch
        # begins an accumulation, whatever train.grad_accum the run that saved it had.
        self.accelerator.step = 0

    def save_portable(self, name: str, payload: dict) -> Path:
        """Write ``name`` (the main process; the others write nothing) and return its path."""
        if self.accelerator.is_main_process:
            atomic_torch_save(payload, self.dir / name)
        return self.dir / name


class RunLock:
    """An exclusive lock on the run directory: a second run pointed at it refuses instead of overwriting it.

    ``flock`` is released by the kernel when the holder dies, so a killed run never leaves a stale lock behind.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._fh = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RuntimeError(
                f"run directory {self.path.parent} is in use by {holder}; choose another train.output_dir "
                "or wait for that run to end"
            ) from None
        fh.truncate(0)
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


# Exit status of a run that stopped to be requeued (SLURM preemption or time limit): BSD's EX_TEMPFAIL.
# Launchers (torchrun, accelerate) report any worker failure as 1, so the run also leaves a REQUEUE marker file.
REQUEUE_EXIT_CODE = 75
# Exit status of a run stopped by Ctrl-C, with a checkpoint and no REQUEUE marker: the shell's 128 + SIGINT.
INTERRUPTED_EXIT_CODE = 128 + signal.SIGINT
# What SLURM sends before preemption or the time limit (SIGUSR1 with --signal, SIGTERM otherwise and on scancel).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# What stops a run with a checkpoint: those, and Ctrl-C (:class:`PreemptionHandler`); its data workers ignore them.
SAVING_STOP_SIGNALS = (*STOP_SIGNALS, signal.SIGINT)


class PreemptionHandler:
    """Turns SIGTERM/SIGUSR1 (what SLURM sends before preemption or the time limit) into a flag.

    The training loop polls :meth:`stop_reason` at step boundaries, all ranks agree on it, save, and exit with
    :data:`REQUEUE_EXIT_CODE`; nothing is done inside the signal handler itself. A worker started by torchrun or
    ``accelerate launch`` (their elastic agent sets TORCHELASTIC_RUN_ID) stops the same way when that launcher dies
    (kill -9, the OOM killer): orphaned, it would otherwise train on unattended and keep the run directory locked.
    """

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, object] = {}
        self._launcher: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        # The first signal says why: a SIGTERM after a Ctrl-C (a launcher or scheduler ending the run) keeps it
        # a Ctrl-C, which asks for no requeue.
        if self.requested is None:
            self.requested = signum

    def _interrupt(self, signum: int, frame: object) -> None:
        """Ctrl-C stops the run as a preemption does, with a checkpoint; pressed again, at once, without one."""
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signum
        # os.write, not print: a handler that runs inside another print would hit "reentrant call".
        os.write(2, b"\nCtrl-C: the run stops at its next logging step, with a checkpoint; Ctrl-C again stops it "
                    b"now, without one\n")

    def install(self) -> PreemptionHandler:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        self._launcher = os.getppid() if "TORCHELASTIC_RUN_ID" in os.environ else None
        return self

    def interrupted(self) -> bool:
        """Whether the stop was asked for by Ctrl-C: the run stops with a checkpoint, not to be requeued."""
        return self.requested == signal.SIGINT

    def stop_reason(self) -> str | None:
        """Why training should stop at this step boundary (a signal, the launcher's death), or None."""
        if self.requested is not None:
            return f"signal {signal.Signals(self.requested).name}"
        if self._launcher is not None and os.getppid() != self._launcher:
            return f"the launcher (pid {self._launcher}) is gone"
        return None

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def mark_requeue(run_dir: Path, reason: str) -> None:
    write_text_atomic(run_dir / "REQUEUE", reason + "\n")
