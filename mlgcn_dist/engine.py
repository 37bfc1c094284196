"""The training and evaluation loop on Accelerate: one readable loop, the components composed around it.

Data flows one way: shards/folder -> loader -> device batch -> model -> loss/optimiser -> AP meter (gathered
across ranks) -> tracking and checkpoints. The same code runs on one CPU process, one GPU, many GPUs and nodes,
and under DeepSpeed ZeRO; ``distributed.build_accelerator`` decides which.
"""

from __future__ import annotations

import faulthandler
import itertools
import os
import random
import signal
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from mlgcn_dist import distributed
from mlgcn_dist.checkpoint import (
    INTERRUPTED_EXIT_CODE,
    REQUEUE_EXIT_CODE,
    CheckpointManager,
    PreemptionHandler,
    RunLock,
    TrainState,
    check_resume_ema,
    check_resume_labels,
    check_resume_launcher,
    check_resume_model,
    check_resume_precision,
    complete_checkpoints,
    mark_requeue,
    optim_as_resumed,
    resolve_resume,
    saved_precision,
)
from mlgcn_dist.config import Config, ConfigError
from mlgcn_dist.data.augment_process import AugmentProcess
from mlgcn_dist.data.loader import (
    DatasetInfo,
    build_eval_loader,
    build_train_loader,
    dataset_info,
    device_augment_rng,
)
from mlgcn_dist.data.prefetch import device_batches
from mlgcn_dist.data.records import LabelSpace
from mlgcn_dist.data.transforms import DeviceAugment, GpuAugment, to_device
from mlgcn_dist.data.workers import worker_start_line
from mlgcn_dist.ema import ModelEMA
from mlgcn_dist.files import write_text_atomic
from mlgcn_dist.graph import build_graph_inputs
from mlgcn_dist.losses import build_loss
from mlgcn_dist.metrics import AveragePrecisionMeter, gather_meter
from mlgcn_dist.models import build_model
from mlgcn_dist.optim import build_optimizer, build_scheduler, group_lrs, scaled_lr
from mlgcn_dist.streams import running_on, side_stream
from mlgcn_dist.threads import use_launcher_threads
from mlgcn_dist.timing import ThroughputMeter, timed_next
from mlgcn_dist.tracking import Tracker

METRIC_KEYS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the batch's image ids and the last good checkpoint."""


def resolve_decode(cfg: Config, device: torch.device) -> str:
    if cfg.data.decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return cfg.data.decode


def build_model_for(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """The configured model with its label graph inputs built from the training split's statistics."""
    adj, embeddings = build_graph_inputs(cfg.graph, info.label_names, info.nums, info.adj)
    groups = LabelSpace(info.label_names, info.supercategories).groups()
    return build_model(cfg.model, info.num_classes, adj=adj, embeddings=embeddings, groups=groups)


def bare_model(accelerator: Accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The module itself, out of its DDP/DeepSpeed and torch.compile wrappers; the prepared model is left as it is.

    ``keep_torch_compile=False``, not Accelerate's default: to keep the compiled wrapper, Accelerate puts the bare
    module in place of the DDP one inside it (``_orig_mod``), and the prepared model then hides its DDP wrapper:
    ``accumulate`` finds no ``no_sync`` (DDP all-reduces every micro-batch of an accumulation) and the weights'
    names gain an ``_orig_mod.`` prefix."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    accelerator: Accelerator,
    decode: str,
    augment: DeviceAugment | None,
) -> tuple[dict, AveragePrecisionMeter]:
    """Metrics over the validation split, each image counted exactly once across all ranks.

    An image that cannot be read or decoded is not scored, and never silently: ``results["num_bad"]`` counts such
    images and ``results["bad_ids"]`` names them (printed here, kept in metrics.jsonl and the run summary).

    The unwrapped model is used: evaluation batches are uneven across ranks, and a DDP forward could start a
    collective (buffer broadcast) that a rank with fewer batches never joins.
    """
    model.eval()
    dtype = distributed.input_dtype(model)
    meter = AveragePrecisionMeter()
    loader = build_eval_loader(
        cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes, decode=decode
    )
    num_bad, bad_ids = 0, []
    convert = _converter(cfg, accelerator.device, augment, lambda index: random.Random(0))  # eval draws nothing
    with device_batches(loader, convert, accelerator.device, cfg.data.device_prefetch) as pairs:
        for batch, (images, targets, image_ids) in pairs:
            num_bad += batch["n_bad"]  # after to_device: it adds the JPEGs the device could not decode
            bad_ids += batch.get("bad_ids", []) + _dropped_ids(batch, image_ids)
            if len(image_ids) == 0:  # every image of the batch unreadable: counted above, nothing to score
                continue
            with accelerator.autocast():
                logits = model(images.to(dtype))
            meter.add(logits.float().cpu(), targets.cpu(), image_ids.cpu())
    merged, duplicates = gather_meter(meter)
    results = merged.compute()
    results["top3"] = merged.compute(top_k=3)
    results["duplicates"] = duplicates
    per_rank = distributed.gather_objects((num_bad, bad_ids))
    results["num_bad"] = sum(n for n, _ in per_rank)
    results["bad_ids"] = sorted(i for _, ids in per_rank for i in ids)
    if results["num_images"] == 0:
        raise RuntimeError(f"evaluation scored no image of split {cfg.data.val_split!r}: all {results['num_bad']} "
                           "were unreadable (a NaN mAP would follow)")
    if results["num_bad"]:
        distributed.say(accelerator, f"evaluation skipped {results['num_bad']} image(s) that could not be read or "
                        f"decoded; image ids: {results['bad_ids']}")
    return results, merged


def _device_augments(
    cfg: Config, decode: str, device: torch.device
) -> tuple[AugmentProcess | None, DeviceAugment | None, DeviceAugment | None]:
    """The GPU path's augments for training and evaluation (None with CPU decode), in this process or, with
    data.augment_process, in a process of their own (returned too: the trainer closes it)."""
    if decode != "gpu":
        return None, None, None
    if not cfg.data.augment_process:
        return None, GpuAugment(cfg.data.image_size, train=True), GpuAugment(cfg.data.image_size, train=False)
    try:
        process = AugmentProcess(device, cfg.data.image_size, cfg.train.channels_last, cfg.data.worker_timeout_s)
    except ValueError as err:
        raise ConfigError(f"data.augment_process=true: {err}") from err
    return process, process.augment(train=True), process.augment(train=False)


def _converter(
    cfg: Config,
    device: torch.device,
    augment: DeviceAugment | None,
    batch_rng: Callable[[int], random.Random],
    first: int = 0,
):
    """The batch -> device tensors step (``to_device``) with this run's settings, for ``device_batches``.

    The device augmentation of the epoch's batch ``i`` draws from ``batch_rng(i)``, counting from ``first``
    (a resume's place in the epoch): a resumed epoch augments its remaining batches as an uninterrupted one
    would. ``device_batches`` converts strictly in order, on one thread.
    """
    index = itertools.count(first)
    return lambda batch: to_device(batch, device, augment, batch_rng(next(index)), cfg.train.channels_last)


def _dropped_ids(batch: dict, kept_ids: torch.Tensor) -> list[int]:
    """Ids of the batch's images that ``to_device`` dropped (JPEGs the device could not decode)."""
    if len(kept_ids) == len(batch["image_id"]):
        return []
    kept = set(kept_ids.tolist())
    return [i for i in batch["image_id"].tolist() if i not in kept]


def frequency_baseline_map(meter: AveragePrecisionMeter) -> float:
    """mAP of ranking images at random: each class's AP is its positive rate (the label-frequency baseline)."""
    targets = meter.state()["targets"].float()
    counted = (targets >= 0).sum(0).clamp(min=1)
    rate = (targets == 1).sum(0) / counted
    present = (targets == 1).any(0)
    return float(rate[present].mean() * 100) if bool(present.any()) else float("nan")


def format_metrics_table(results: dict[str, dict]) -> str:
    """One row per evaluated model (model, ema), columns mAP ... CF1, then the same at top-3."""
    header = f"{'':8s}" + "".join(f"{k:>8s}" for k in METRIC_KEYS) + "   | top-3: " + " ".join(
        f"{k:>6s}" for k in METRIC_KEYS[1:]
    )
    rows = [header]
    for name, res in results.items():
        top3 = res["top3"]
        rows.append(
            f"{name:8s}" + "".join(f"{res[k]:8.2f}" for k in METRIC_KEYS) + "   |        "
            + " ".join(f"{top3[k]:6.2f}" for k in METRIC_KEYS[1:])
        )
    return "\n".join(rows)


def _configure_determinism(cfg: Config, rank: int) -> None:
    # Different seeds per rank so augmentation differs across ranks; the data order itself is seeded by
    # (seed, epoch) inside the loader and does not depend on these RNGs.
    set_seed(cfg.train.seed + rank)
    if cfg.train.deterministic:
        # cuBLAS picks among reduction orders unless its workspace is fixed; read at the first matmul, so setting it
        # here (before the model runs) is in time. warn_only: an op without a deterministic CUDA kernel (torch lists
        # them) warns, naming itself, instead of stopping the run.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _system_info(accelerator: Accelerator) -> dict:
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {
        "device": name,
        "world_size": accelerator.num_processes,
        # torchrun (inside accelerate launch too) gives each process its node's process count.
        "num_nodes": accelerator.num_processes // int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)),
        "torch": torch.__version__,
        "distributed_type": str(accelerator.distributed_type.value),
    }


def train(cfg: Config) -> dict:
    """Train and evaluate as configured; returns the run summary. Raises SystemExit(75) after a preemption save."""
    # First of all: a preemption signal that arrives while the model is still being built must not be lost.
    preemption = PreemptionHandler().install()
    # Where is a run that hangs (a collective that never completes)? `kill -USR2 <pid>`, or `scancel --signal=USR2
    # <job>`, prints every thread's Python stack of the process, from the C signal handler: a main thread stuck in
    # C would never run a Python one. Its data workers print theirs from Python (mlgcn_dist/stacks.py says why).
    faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)  # sys.stderr may be no file
    lock = RunLock(cfg.run_dir)  # taken by the main process as the Trainer starts; released however the run ends
    trainer = None
    try:
        trainer = Trainer(cfg, preemption, lock)
        return trainer.fit()
    finally:
        if trainer is not None and trainer.augment_process is not None:
            trainer.augment_process.close()
        lock.release()
        preemption.uninstall()
        faulthandler.unregister(signal.SIGUSR2)


class Trainer:
    """The components of one run, composed: data, model, optimiser, checkpoints, tracking (set up in that order)."""

    def __init__(self, cfg: Config, preemption: PreemptionHandler, lock: RunLock):
        # The checkpoint to resume first: a run resumed with precision auto goes on in the precision it started with.
        last_ckpt = resolve_resume(cfg.train.resume, cfg.run_dir)
        resumed_precision = saved_precision(last_ckpt)
        cfg = distributed.resolve_precision(cfg, distributed.training_device(cfg), resumed_precision)
        cfg.optim, ignored_optim = optim_as_resumed(last_ckpt, cfg.optim)  # cfg is resolve_precision's copy
        self.cfg, self.preemption = cfg, preemption
        self.accelerator = acc = distributed.build_accelerator(cfg)
        use_launcher_threads(acc.device.type, os.environ)  # the start line (topology) names them
        distributed.check_same_config(cfg)
        self.topo = distributed.topology(acc, cfg)
        self.run_dir = cfg.run_dir
        self.last_ckpt = last_ckpt
        if acc.is_main_process:
            lock.acquire()
            self._announce_start()
        _configure_determinism(cfg, acc.process_index)

        self.info = dataset_info(cfg.data)
        if self.info.num_val == 0:
            raise ConfigError(f"data.val_split={cfg.data.val_split!r} holds no image: evaluation would score nothing "
                              "(mAP NaN, no best.pt); point it at a split with images")
        # Checked before the model is built: a resume the checkpoint cannot serve, an epoch too short for one step.
        if last_ckpt is not None:
            self._check_resume(resumed_precision)
        loader_len = self._checked_epoch_length()
        model = self._build_model()
        self.ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

        self.steps_per_epoch = loader_len // cfg.train.grad_accum
        # Every optimiser step sees exactly grad_accum micro-batches; a remainder would leak into the next epoch.
        self.micro_batches = self.steps_per_epoch * cfg.train.grad_accum
        lr = scaled_lr(cfg.optim, self.topo.global_batch)
        optimizer = build_optimizer(model, cfg.optim, lr, deepspeed=distributed.is_deepspeed(acc),
                                    fp16=cfg.train.precision == "fp16")
        self.scheduler = build_scheduler(optimizer, cfg.optim, self.steps_per_epoch, cfg.train.epochs)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        self.input_dtype = distributed.input_dtype(self.model)
        if self.ema is not None:
            # Each rank initialised its own weights (seeds differ per rank); DDP and DeepSpeed have just given every
            # rank rank 0's, in place. The EMA, copied before, starts from those too: with its warm-up decay the
            # start still weighs a few percent after the first steps, and ranks must evaluate the same EMA.
            self.ema.module.load_state_dict(model.state_dict())
        self.state = TrainState()
        acc.register_for_checkpointing(self.scheduler, self.state)
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        self.criterion = build_loss(cfg.optim)
        self.ckpt = CheckpointManager(acc, self.run_dir, cfg.train.keep_checkpoints)
        if self.last_ckpt is not None:
            self.ckpt.load(self.last_ckpt)
        # The run directory's files describe this session only once it is set up: a resume that fails above
        # leaves them to the run that wrote them.
        if acc.is_main_process:
            write_text_atomic(self.run_dir / "config.yaml", cfg.to_yaml())
        self.tracker = Tracker(cfg, self.run_dir, is_main=acc.is_main_process, world_size=self.topo.world_size,
                               system=_system_info(acc), label_names=self.info.label_names,
                               resumed=self.last_ckpt is not None)
        if self.last_ckpt is not None:
            self._keep_the_schedule_on_its_epochs()
            self._announce_resume(ignored_optim)
        self._warn_of_a_reordered_epoch(loader_len)
        self.state.steps_per_epoch, self.state.micro_batches = self.steps_per_epoch, self.micro_batches
        distributed.say(acc, f"LR per group: {group_lrs(self.optimizer)} (configured: head lr {lr:g} "
                        f"[{cfg.optim.lr_scaling} rule], backbone lr x lrp {cfg.optim.lrp:g})")
        if line := worker_start_line(cfg.data.workers, cfg.data.worker_start):
            distributed.say(acc, line)
        self.decode = resolve_decode(cfg, acc.device)
        self.augment_process, self.train_augment, self.eval_augment = _device_augments(cfg, self.decode, acc.device)
        self.train_stream = side_stream(acc.device, cfg.train.side_stream)
        self.results: dict[str, dict] = {}
        self.bad_samples = self.seen_samples = self.nonfinite_steps = 0  # this rank's, this session's
        # All ranks', up to the checkpoint resumed from; this session's are summed onto them (_count_across_ranks).
        self.state.count_images_of_all_ranks(self.topo.world_size)
        self._bad_before, self._images_before = self.state.bad_samples, self.state.trained_images
        self.throughput: list[float] = []

    def _announce_start(self) -> None:
        """The main process clears a requeue marker of the session before and prints what this run is."""
        acc, cfg = self.accelerator, self.cfg
        (self.run_dir / "REQUEUE").unlink(missing_ok=True)
        distributed.say(acc, cfg.to_yaml())
        distributed.say(acc, self.topo.describe())
        if self.last_ckpt is None and complete_checkpoints(self.run_dir / "checkpoints"):
            distributed.say(acc, f"train.resume={cfg.train.resume}: starting afresh in {self.run_dir}, whose "
                            "checkpoints of an earlier run this run's saves replace (train.resume=auto would "
                            "continue it)")

    def _check_resume(self, resumed_precision: str | None) -> None:
        """Refuse, before any weights are built, a resume onto another label space or network, into fp16 from
        another precision, with the EMA model switched on or off, or across launchers and partition counts."""
        ckpt, cfg = self.last_ckpt, self.cfg
        check_resume_labels(ckpt, self.info.label_names)
        check_resume_precision(ckpt, resumed_precision, cfg.train.precision)
        check_resume_ema(ckpt, cfg.train.ema_decay)
        check_resume_model(ckpt, cfg.to_dict()["model"])
        check_resume_launcher(ckpt, distributed.is_deepspeed(self.accelerator), self.topo.world_size)

    def _checked_epoch_length(self) -> int:
        """Micro-batches per epoch on this process; at least one optimiser step's worth."""
        loader_len = len(self._train_loader(epoch=0, decode="cpu"))
        if loader_len < self.cfg.train.grad_accum:
            raise ConfigError(
                f"an epoch holds {loader_len} micro-batch(es) per process, fewer than train.grad_accum="
                f"{self.cfg.train.grad_accum}: no optimiser step could complete; lower train.grad_accum or "
                "data.batch_size, or raise data.steps_per_epoch"
            )
        return loader_len

    def _build_model(self) -> torch.nn.Module:
        """The configured network on this process's device, in its memory format, BatchNorm synced if asked."""
        acc, cfg = self.accelerator, self.cfg
        model = build_model_for(cfg, self.info)
        if cfg.train.sync_bn and acc.num_processes > 1:
            if acc.device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                distributed.say(acc, f"train.sync_bn ignored on {acc.device.type}: SyncBatchNorm runs on CUDA only "
                                "(the running statistics are still averaged over the processes before each "
                                "evaluation)")
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model.to(acc.device)

    def _announce_resume(self, ignored_optim: list[str]) -> None:
        state = self.state
        distributed.say(self.accelerator, f"resumed from {self.last_ckpt}: epoch {state.epoch}, batch "
                        f"{state.step_in_epoch}, step {state.global_step}; the checkpoint's base learning rates, "
                        "momentum and weight decay go on (optim.lr, lrp, lr_scaling, base_batch_size, momentum and "
                        "weight_decay apply to a fresh start), on this run's schedule (optim.schedule, epoch_step, "
                        "warmup_epochs)")
        if ignored_optim:
            distributed.say(self.accelerator, f"train.resume: ignored {', '.join(ignored_optim)}; config.yaml "
                            "records the checkpoint's values")

    def _train_loader(self, epoch: int, decode: str):
        return build_train_loader(self.cfg.data, rank=self.topo.rank, world_size=self.topo.world_size, epoch=epoch,
                                  seed=self.cfg.train.seed, decode=decode)

    def fit(self) -> dict:
        state, cfg = self.state, self.cfg
        if self.augment_process is not None:  # its start-up (imports, CUDA context) overlaps the loader's
            self.augment_process.start()
            distributed.say(self.accelerator, f"GPU decode and augment in a process of their own (pid "
                            f"{self.augment_process.pid}; data.augment_process)")
        while state.epoch < cfg.train.epochs and not self._steps_spent():
            if self._train_epoch():
                self._preempted()
            epoch = state.epoch
            # train.max_steps may stop inside an epoch: the checkpoint then keeps the place, and a resume with a
            # larger budget finishes the epoch instead of starting the next.
            if state.step_in_epoch >= self.micro_batches or not self._steps_spent():
                state.epoch, state.step_in_epoch = epoch + 1, 0
            finished = state.epoch >= cfg.train.epochs or self._steps_spent()
            self._sync_buffers()
            if state.epoch % cfg.train.eval_every == 0 or finished:
                self._evaluate_and_keep_best(epoch)
            self._save()
            if finished:
                break
        if not self.results:  # resumed from a checkpoint of a finished run: report its metrics all the same
            self.results = _evaluate_all(cfg, self.accelerator, self.model, self.ema, self.decode, self.eval_augment)
            self.tracker.log_eval(state.epoch - (state.step_in_epoch == 0), state.global_step, self.results)
            distributed.say(self.accelerator, format_metrics_table(self.results))
        return self._finish()

    def _keep_the_schedule_on_its_epochs(self) -> None:
        """After a resume with another number of optimiser steps per epoch (another world size, batch or
        accumulation), the schedule's step count and the place in the epoch are rescaled to the same fraction of
        an epoch: warmup, decays and the epoch's end stay where the epochs put them."""
        state, saved_steps, saved_micro = self.state, self.state.steps_per_epoch, self.state.micro_batches
        if not saved_steps or (saved_steps, saved_micro) == (self.steps_per_epoch, self.micro_batches):
            # The same layout (or one not recorded). The schedule's function is this run's (a LambdaLR saves none),
            # but the optimiser holds the rate the checkpoint's schedule set for the next step: set it anew.
            self.scheduler.last_epoch -= 1
            self.scheduler.step()
            return
        epochs_done = self.scheduler.last_epoch / saved_steps
        self.scheduler.last_epoch = round(epochs_done * self.steps_per_epoch) - 1
        self.scheduler.step()  # each group's rate at that step
        accum = self.cfg.train.grad_accum
        state.step_in_epoch = min(round(state.step_in_epoch / saved_micro * self.micro_batches) // accum * accum,
                                  self.micro_batches)
        distributed.say(self.accelerator, f"resumed with {self.steps_per_epoch} optimiser steps of {accum} "
                        f"micro-batches per epoch (the checkpoint's run: {saved_steps} of "
                        f"{saved_micro // saved_steps}): the schedule goes on at epoch {epochs_done:.2f}")

    def _warn_of_a_reordered_epoch(self, loader_len: int) -> None:
        """Record what a shard epoch's order depends on; say so when a resume inside an epoch changed it.

        From shards, each (rank, worker) reads its own span of the epoch's sample sequence, so the order depends on
        the number of processes, workers and batches: a resume in the middle of an epoch with another layout skips
        the batches already trained in the new order, which are not the same images. The rest of that epoch then
        trains some images a second time and as many not at all; the epochs after it are whole. (The folder format
        draws one permutation of the epoch, whatever the layout.)"""
        cfg, state = self.cfg, self.state
        order = (f"{self.topo.world_size} processes x {cfg.data.workers} data workers, {loader_len} batches of "
                 f"{cfg.data.batch_size}, shuffle buffer {cfg.data.shuffle_buffer}")
        if cfg.data.format == "wds" and state.step_in_epoch and state.data_order and state.data_order != order:
            distributed.say(
                self.accelerator,
                f"warning: resumed inside epoch {state.epoch} with another shard order ({order}; the checkpoint's: "
                f"{state.data_order}): the rest of epoch {state.epoch} is drawn in the new order, so some of its "
                "images train a second time and as many not at all; later epochs are whole. To keep the epoch "
                "exact, resume with the checkpoint's processes, data.workers and data.batch_size."
            )
        state.data_order = order

    def _save(self) -> None:
        """A full-state checkpoint (every rank), with the run's counts of trained and skipped images brought up
        to date."""
        self._count_across_ranks()
        self.last_ckpt = self.ckpt.save(self.state, self.cfg.to_dict(), self.info.label_names)

    def _count_across_ranks(self) -> None:
        """The run's trained and skipped images: every rank's counts of this session summed onto the counts the
        run resumed with (a collective; the training loop counts on the host, each rank its own)."""
        per_rank = distributed.gather_objects((self.seen_samples, self.bad_samples))
        self.state.trained_images = self._images_before + sum(seen for seen, _ in per_rank)
        self.state.bad_samples = self._bad_before + sum(bad for _, bad in per_rank)

    def _steps_spent(self) -> bool:
        """Whether ``train.max_steps`` (0: no limit) optimiser steps are done."""
        return 0 < self.cfg.train.max_steps <= self.state.global_step

    def _train_epoch(self) -> bool:
        """One epoch (or its remainder after a resume); True when a preemption signal asks to stop."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        self.model.train()
        started = time.perf_counter()  # the loader's start-up included: a long run pays it every epoch
        loader = self._train_loader(state.epoch, self.decode)
        bar = tqdm(total=self.micro_batches, initial=state.step_in_epoch, disable=not acc.is_main_process,
                   desc=f"epoch {state.epoch}", dynamic_ncols=True)
        batches = iter(loader)
        if state.step_in_epoch:  # the order is fixed by (seed, epoch): skip what was already trained
            for _ in range(state.step_in_epoch):
                next(batches)
            started = time.perf_counter()  # making the skipped batches is the resume's cost, not training's
        seed, epoch, rank = cfg.train.seed, state.epoch, self.topo.rank
        convert = _converter(cfg, acc.device, self.train_augment,
                             lambda index: device_augment_rng(seed, epoch, rank, index), first=state.step_in_epoch)
        # The stream first: the prefetch's consumer is the stream current where the batches are taken.
        with running_on(self.train_stream), device_batches(batches, convert, acc.device,
                                                           cfg.data.device_prefetch) as pairs:
            stopped = self._train_batches(pairs, bar)
        state.train_seconds += time.perf_counter() - started
        return stopped

    def _train_batches(self, pairs, bar: tqdm) -> bool:
        """The training steps of one epoch over ``(batch, device tensors)`` pairs; True on a preemption stop."""
        acc, cfg, state = self.accelerator, self.cfg, self.state
        window = ThroughputMeter(acc.device)
        image_ids = None
        loss_sum = torch.zeros((), device=acc.device)
        nonfinite = torch.zeros((), dtype=torch.long, device=acc.device)
        summed = 0  # micro-batches in loss_sum: a window that began in this epoch may be shorter than log_every
        skipped = 0  # optimiser steps the fp16 loss scaler skipped since the last log (a host flag Accelerate reads)
        pending = 0  # micro-batches since the last log, stand-ins too: the same on every rank (a log reduces)
        used_lrs = group_lrs(self.optimizer)
        try:
            while state.step_in_epoch < self.micro_batches:
                try:
                    (batch, (images, targets, image_ids)), waited = timed_next(pairs, window.stall)
                except StopIteration:
                    break
                window.data_wait += waited
                self.bad_samples += int(batch.get("n_bad", 0))  # read after to_device: it adds device-side drops
                self.seen_samples += len(image_ids)  # the images trained: the run's count sums the ranks'
                if len(image_ids):
                    loss = self._train_step(images, targets)
                    # Summed on the device: no host sync in the hot loop, only at logging intervals.
                    finite = torch.isfinite(loss)
                    loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
                    nonfinite += (~finite).long()
                    summed += 1
                else:  # every image of the micro-batch unreadable (counted above)
                    self._stand_in_step()
                state.step_in_epoch += 1
                pending += 1
                window.images += len(image_ids)
                bar.update(1)
                if not acc.sync_gradients:
                    continue
                used_lrs = group_lrs(self.optimizer)  # what is logged: the scheduler now sets the next step's
                if acc.optimizer_step_was_skipped:  # fp16: the loss or the gradients overflowed, no update
                    self._check_step_not_skipped()
                    skipped += 1
                else:
                    self.scheduler.step()
                state.global_step += 1
                if self.ema is not None:
                    self.ema.update(bare_model(acc, self.model))
                if state.global_step % cfg.train.log_every == 0:
                    self._log_window(bar, window, loss_sum, summed, nonfinite, image_ids, used_lrs)
                    loss_sum.zero_()
                    nonfinite.zero_()
                    self.nonfinite_steps += skipped
                    summed = pending = skipped = 0
                    if distributed.any_rank(self.preemption.stop_reason() is not None, acc.device):
                        return True
                if self._steps_spent():
                    break
            if pending and state.global_step % cfg.train.log_every:
                # The epoch's last, shorter window: an epoch of fewer than log_every steps still logs its loss. It
                # checks its losses too: a NaN there must not reach the checkpoint saved next.
                self._log_window(bar, window, loss_sum, summed, nonfinite, image_ids, used_lrs)
                nonfinite.zero_()
        finally:
            bar.close()
        # Micro-batches after the last window that completed no optimiser step (a loader that ran short): a NaN
        # there must not reach the checkpoint saved next either.
        self._check_finite(int(nonfinite), image_ids)
        self.nonfinite_steps += skipped
        self._check_weights_finite()
        _check_bad_fraction(cfg, self.bad_samples, self.seen_samples)
        return False

    def _stand_in_step(self) -> None:
        """The training step of a micro-batch whose every image was unreadable. It still runs on every rank, with
        every collective the others make (DDP's gradient all-reduce, SyncBatchNorm's), or they would wait forever:
        on two stand-in images, its loss weighted 0 (no gradient, not logged), in train mode with every BatchNorm's
        momentum 0 for the step (its running statistics keep their values)."""
        cfg, device = self.cfg, self.accelerator.device
        images = torch.zeros(2, 3, cfg.data.image_size, cfg.data.image_size, device=device)
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.zeros(2, self.info.num_classes, dtype=torch.int8, device=device)
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            self._train_step(images, targets, weight=0.0)
        finally:
            for m, momentum in zip(norms, momenta):
                m.momentum = momentum

    def _train_step(self, images: torch.Tensor, targets: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        acc, cfg = self.accelerator, self.cfg
        if distributed.uses_cuda_graphs(cfg.train.compile, cfg.train.compile_mode):
            # The previous step's graph outputs are dead: their static buffers may be overwritten by this replay.
            torch.compiler.cudagraph_mark_step_begin()
        with acc.accumulate(self.model):
            with acc.autocast():
                logits = self.model(images.to(self.input_dtype))
            loss = self.criterion(logits.float(), targets) * weight
            acc.backward(loss)
            # DeepSpeed clips inside its step (gradient_clipping in its config, filled from optim.clip_grad).
            if acc.sync_gradients and cfg.optim.clip_grad > 0 and not distributed.is_deepspeed(acc):
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _log_window(
        self, bar, window: ThroughputMeter, loss_sum, summed: int, nonfinite, image_ids, lrs: dict[str, float]
    ) -> None:
        """Log the mean loss of the ``summed`` micro-batches since the last log (the non-finite ones left out) and
        the learning rates of the last step."""
        state = self.state
        # Over every rank: the loss of the global batches, not rank 0's (one reduction per logging window).
        totals = torch.stack([loss_sum.float(), nonfinite.float(), torch.tensor(float(summed), device=loss_sum.device)])
        loss_total, bad_total, summed_total = self.accelerator.reduce(totals, reduction="sum").tolist()
        self._check_finite(int(bad_total), image_ids)  # every rank stops together
        if not summed_total:  # only stand-in steps (every image unreadable): no loss to log
            return
        mean_loss = loss_total / max(summed_total - bad_total, 1)
        img_s, wait_frac, stall_frac = window.window()
        world = self.topo.world_size
        self.throughput.append(img_s * world)
        bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s * world:.1f}", wait=f"{wait_frac:.0%}")
        self.tracker.log_step(state.global_step, {
            "train/loss": mean_loss,
            "train/img_per_s": img_s * world,
            "train/img_per_s_per_process": img_s,
            "train/data_wait_frac": wait_frac,
            **({} if stall_frac is None else {"train/data_stall_frac": stall_frac}),
            "train/epoch": state.epoch + state.step_in_epoch / self.micro_batches,
            **{f"train/lr_{name}": value for name, value in lrs.items()},
        })

    def _check_finite(self, bad_steps: int, image_ids: torch.Tensor | None) -> None:
        """Stop at a NaN/inf loss (fp32/bf16), naming where; in fp16 the grad scaler skips those steps (counted by
        the caller)."""
        cfg, state = self.cfg, self.state
        if bad_steps and cfg.train.precision != "fp16":
            raise NonFiniteLossError(
                f"non-finite loss in {bad_steps} micro-batch(es) up to step {state.global_step} (epoch "
                f"{state.epoch}); image ids of the last batch {image_ids.tolist() if image_ids is not None else []}; "
                f"last good checkpoint: {self.last_ckpt or 'none'}"
            )

    def _check_step_not_skipped(self) -> None:
        """Outside fp16 a step is skipped only by DeepSpeed ZeRO, for a gradient norm that is not finite: where DDP
        would stop at the non-finite weights, ZeRO would go on skipping (a run of skipped steps "finished"). Every
        rank reads the same all-reduced norm, so every rank stops here."""
        if self.cfg.train.precision != "fp16":
            state = self.state
            raise NonFiniteLossError(
                f"non-finite gradient at step {state.global_step + 1} (epoch {state.epoch}) with a finite loss: "
                f"DeepSpeed skipped the update; last good checkpoint: {self.last_ckpt or 'none'}"
            )

    def _check_weights_finite(self) -> None:
        """Stop before evaluating or saving weights a non-finite gradient reached with a finite loss (a backward
        overflow: the loss check cannot see it; clipping spreads it into every weight). One host read per epoch
        and per preemption; every rank holds the same weights, so every rank stops."""
        params = list(bare_model(self.accelerator, self.model).parameters())
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            state = self.state
            raise NonFiniteLossError(
                f"non-finite weights after step {state.global_step} (epoch {state.epoch}) with finite losses: a "
                f"gradient overflowed in the backward pass; last good checkpoint: {self.last_ckpt or 'none'}"
            )

    def _sync_buffers(self) -> None:
        """The same normalisation statistics on every rank, the EMA's too, before an evaluation or a save."""
        models = [bare_model(self.accelerator, self.model)] + ([self.ema.module] if self.ema is not None else [])
        distributed.average_running_stats(*models)

    def _evaluate_and_keep_best(self, epoch: int) -> None:
        acc, state = self.accelerator, self.state
        self.results = _evaluate_all(self.cfg, acc, self.model, self.ema, self.decode, self.eval_augment)
        best_name, best_value = max(((n, r["mAP"]) for n, r in self.results.items()), key=lambda x: x[1])
        improved = best_value > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.best_source = best_value, epoch, best_name
        self.tracker.log_eval(epoch, state.global_step, self.results)
        distributed.say(acc, format_metrics_table(self.results))
        payload = _portable_payload(self.cfg, acc, self.model, self.ema, self.info, state, epoch, self.results)
        if improved:
            best = self.ckpt.save_portable("best.pt", payload)
            self.tracker.log_checkpoint(best, epoch, is_best=True)  # log.log_artifact; the main process's alone
        self.ckpt.save_portable("last.pt", payload)

    def _preempted(self) -> None:
        """Save and exit: to be requeued after a preemption's signal (REQUEUE marker, exit 75); after a Ctrl-C
        (rank 0's, the terminal's process group gets it), only to be resumed by hand (exit 130)."""
        acc, state = self.accelerator, self.state
        self._check_weights_finite()
        self._sync_buffers()
        self._save()
        interrupted = self.preemption.interrupted()
        if acc.is_main_process and not interrupted:
            mark_requeue(self.run_dir, f"preempted at step {state.global_step}; checkpoint {self.last_ckpt}")
        acc.wait_for_everyone()  # no rank exits before the marker the SLURM script reads exists
        reason = self.preemption.stop_reason() or "stop requested by another process"
        if interrupted:
            code, then = INTERRUPTED_EXIT_CODE, "train.resume=auto continues the run"
        else:
            code, then = REQUEUE_EXIT_CODE, "to be requeued"
        distributed.say(acc, f"{reason}: saved {self.last_ckpt}; exit {code} {then}")
        end = {"stopped": "Ctrl-C"} if interrupted else {"preempted": True}
        self.tracker.finish({**end, "global_step": state.global_step, **self._throughput()})
        self._release()
        raise SystemExit(code)

    def _throughput(self) -> dict:
        """img_per_s: every image trained (since the run began, resumes included) over the epochs' wall time,
        each epoch's loader start-up included; img_per_s_window_median: the steady rate of this session's logging
        windows."""
        state = self.state
        return {
            "img_per_s": state.trained_images / state.train_seconds if state.train_seconds else None,
            "img_per_s_window_median": float(np.median(self.throughput)) if self.throughput else None,
        }

    def _finish(self) -> dict:
        acc, state, results = self.accelerator, self.state, self.results
        self._count_across_ranks()
        summary = {
            "finished": True,  # what `mlgcn compare` reads as the run's status (a preempted run says "preempted")
            "best_mAP": state.best_metric,
            "best_epoch": state.best_epoch,
            "best_source": state.best_source,
            "final": {name: {k: res[k] for k in METRIC_KEYS} for name, res in results.items()},
            **self._throughput(),
            "world_size": self.topo.world_size,
            "global_batch": self.topo.global_batch,
            "global_step": state.global_step,
            "bad_samples": state.bad_samples,
            "eval_bad_ids": results["model"]["bad_ids"],
            "nonfinite_steps_skipped": self.nonfinite_steps,
            "frequency_baseline_mAP": results["model"]["frequency_baseline_mAP"],
            "num_val_images": results["model"]["num_images"],
        }
        self.tracker.finish(summary)
        distributed.say(
            acc,
            f"best mAP {state.best_metric:.2f} ({state.best_source}, epoch {state.best_epoch}); "
            f"label-frequency baseline mAP {summary['frequency_baseline_mAP']:.2f}"
        )
        self._release()
        return summary

    def _release(self) -> None:
        """Free the model and tear the process group down while the interpreter is fully alive.

        The DDP model's reducer holds the process group, so it goes first; otherwise end_training leaves the group
        to interpreter finalisation, where a gloo worker thread releasing its last collective's tensors aborts the
        process ("terminate called without an active exception"): seen in about 1 of 20 resumed two-process runs
        on CPU, none in 80 with this order.
        """
        self.model = self.optimizer = self.scheduler = self.ema = None
        self.accelerator.free_memory()
        self.accelerator.end_training()


def _evaluate_all(cfg, accelerator, model, ema, decode, augment) -> dict[str, dict]:
    # The bare module, eagerly, as the EMA is: not the compiled DDP forward (evaluation batches are uneven across
    # ranks, and a DDP forward may start a collective a rank with fewer never joins), and no second compiled graph
    # (eval-mode BatchNorm, the last batch's shape) built on every rank for a pass a fraction of an epoch long.
    models = {"model": bare_model(accelerator, model)}
    if ema is not None:
        models["ema"] = ema.module
    results = {}
    for name, module in models.items():
        res, merged = evaluate(module, cfg, accelerator, decode, augment)
        res["frequency_baseline_mAP"] = frequency_baseline_map(merged)
        results[name] = res
    model.train()
    return results


def _portable_payload(
    cfg, accelerator, model, ema, info: DatasetInfo, state: TrainState, epoch: int, results
) -> dict:
    """best.pt / last.pt: the weights, what rebuilds the model, and the evaluation of ``epoch`` (the one in
    progress when train.max_steps stopped inside it)."""
    return {
        "model": _model_state_dict(accelerator, model),
        "ema": ema.module.state_dict() if ema is not None else None,
        "config": cfg.to_dict(),
        "label_names": info.label_names,
        "supercategories": info.supercategories,
        # Plain lists and floats, no numpy: `mlgcn evaluate`/`predict` load these files with weights_only=True.
        "nums": info.nums.tolist(),
        "adj": info.adj.tolist(),
        "epoch": epoch,
        "global_step": state.global_step,
        "metrics": {n: {k: float(r[k]) for k in METRIC_KEYS} for n, r in results.items()},
    }


def _model_state_dict(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the bare module's names (no ``module.``/``_orig_mod.`` prefix), on every rank."""
    if distributed.is_deepspeed(accelerator):
        # ZeRO-1/2 keep the weights as views into flat buffers: get_state_dict clones them (torch.save of a view
        # writes its whole buffer). DeepSpeed compiles inside its engine, in place: no torch.compile wrapper, no
        # prefix. (ZeRO-3, whose weights get_state_dict would gather, is refused: deepspeed_config.)
        return accelerator.get_state_dict(model)
    return bare_model(accelerator, model).state_dict()


def _check_bad_fraction(cfg: Config, bad: int, seen: int) -> None:
    if bad and bad > cfg.data.max_bad_fraction * max(bad + seen, 1):
        raise RuntimeError(
            f"{bad} undecodable training samples out of {bad + seen} exceed data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}: check the shards (mlgcn pack lists skipped files in meta.json)"
        )
