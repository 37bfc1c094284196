"""The training and evaluation loop on Accelerate: one readable loop, the components composed around it.

Data flows one way: shards/folder -> loader -> device batch -> model -> loss/optimiser -> AP meter (gathered
across ranks) -> tracking and checkpoints. The same code runs on one CPU process, one GPU, many GPUs and nodes,
and under DeepSpeed ZeRO; ``distributed.build_accelerator`` decides which.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm import tqdm

from mlgcn_dist import distributed
from mlgcn_dist.checkpoint import (
    REQUEUE_EXIT_CODE,
    CheckpointManager,
    PreemptionHandler,
    RunLock,
    TrainState,
    atomic_write_text,
    mark_requeue,
    resolve_resume,
)
from mlgcn_dist.config import Config
from mlgcn_dist.data.loader import DatasetInfo, build_eval_loader, build_train_loader, dataset_info
from mlgcn_dist.data.records import LabelSpace
from mlgcn_dist.data.transforms import GpuAugment, to_device
from mlgcn_dist.ema import ModelEMA
from mlgcn_dist.graph import build_graph_inputs
from mlgcn_dist.losses import build_loss
from mlgcn_dist.metrics import AveragePrecisionMeter, gather_meter
from mlgcn_dist.models import build_model
from mlgcn_dist.optim import build_optimizer, build_scheduler, group_lrs, scaled_lr
from mlgcn_dist.tracking import Tracker

METRIC_KEYS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the batch's image ids and the last good checkpoint."""


@dataclass
class ThroughputMeter:
    """Images/s and the fraction of wall time spent waiting for data, over a logging window."""

    images: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)

    def window(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = self.images / elapsed, self.data_wait / elapsed
        self.images, self.data_wait, self.start = 0, 0.0, time.perf_counter()
        return rates


def resolve_decode(cfg: Config, device: torch.device) -> str:
    if cfg.data.decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return cfg.data.decode


def build_model_for(cfg: Config, info: DatasetInfo) -> torch.nn.Module:
    """The configured model with its label graph inputs built from the training split's statistics."""
    adj, embeddings = build_graph_inputs(cfg.graph, info.label_names, info.nums, info.adj)
    groups = LabelSpace(info.label_names, info.supercategories).groups()
    return build_model(cfg.model, info.num_classes, adj=adj, embeddings=embeddings, groups=groups)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    cfg: Config,
    accelerator: Accelerator,
    decode: str,
    augment: GpuAugment | None,
) -> tuple[dict, AveragePrecisionMeter]:
    """Metrics over the validation split, each image counted exactly once across all ranks.

    The unwrapped model is used: evaluation batches are uneven across ranks, and a DDP forward could start a
    collective (buffer broadcast) that a rank with fewer batches never joins.
    """
    model.eval()
    meter = AveragePrecisionMeter()
    loader = build_eval_loader(
        cfg.data, rank=accelerator.process_index, world_size=accelerator.num_processes, decode=decode
    )
    rng = random.Random(0)
    for batch in loader:
        images, targets, image_ids = to_device(batch, accelerator.device, augment, rng, cfg.train.channels_last)
        with accelerator.autocast():
            logits = model(images)
        meter.add(logits.float().cpu(), targets.cpu(), image_ids.cpu())
    merged, duplicates = gather_meter(meter)
    results = merged.compute()
    results["top3"] = merged.compute(top_k=3)
    results["duplicates"] = duplicates
    return results, merged


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
        "num_nodes": int(os.environ.get("SLURM_NNODES", "1")),
        "torch": torch.__version__,
        "distributed_type": str(accelerator.distributed_type.value),
    }


def train(cfg: Config) -> dict:
    """Train and evaluate as configured; returns the run summary. Raises SystemExit(75) after a preemption save."""
    accelerator = distributed.build_accelerator(cfg)
    topo = distributed.topology(accelerator, cfg)
    is_main = accelerator.is_main_process
    run_dir = cfg.run_dir
    lock = RunLock(run_dir)
    if is_main:
        lock.acquire()
        (run_dir / "REQUEUE").unlink(missing_ok=True)
        atomic_write_text(run_dir / "config.yaml", cfg.to_yaml())
        accelerator.print(cfg.to_yaml())
        accelerator.print(topo.describe())
    _configure_determinism(cfg, accelerator.process_index)

    info = dataset_info(cfg.data)
    model = build_model_for(cfg, info)
    if cfg.train.sync_bn and accelerator.device.type == "cuda" and accelerator.num_processes > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = model.to(accelerator.device)
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None

    train_loader_len = len(
        build_train_loader(cfg.data, rank=topo.rank, world_size=topo.world_size, epoch=0, seed=cfg.train.seed,
                           decode="cpu")
    )
    steps_per_epoch = max(train_loader_len // cfg.train.grad_accum, 1)
    # Every optimiser step sees exactly grad_accum micro-batches; a remainder would leak into the next epoch.
    micro_batches = steps_per_epoch * cfg.train.grad_accum
    lr = scaled_lr(cfg.optim, topo.global_batch)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = build_scheduler(optimizer, cfg.optim, steps_per_epoch, cfg.train.epochs)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    criterion = build_loss(cfg.optim)
    ckpt = CheckpointManager(accelerator, run_dir, cfg.train.keep_checkpoints)
    tracker = Tracker(cfg, run_dir, is_main=is_main, world_size=topo.world_size, system=_system_info(accelerator),
                      label_names=info.label_names)
    accelerator.print(f"LR per group: {group_lrs(optimizer)} (head lr {lr:g}, backbone lr x lrp {cfg.optim.lrp:g})")

    resume_from = resolve_resume(cfg.train.resume, run_dir)
    if resume_from is not None:
        ckpt.load(resume_from)
        accelerator.print(f"resumed from {resume_from}: epoch {state.epoch}, batch {state.step_in_epoch}, "
                          f"step {state.global_step}")

    decode = resolve_decode(cfg, accelerator.device)
    train_augment = GpuAugment(cfg.data.image_size, train=True) if decode == "gpu" else None
    eval_augment = GpuAugment(cfg.data.image_size, train=False) if decode == "gpu" else None
    preemption = PreemptionHandler().install()
    last_ckpt: Path | None = resume_from
    results: dict[str, dict] = {}
    bad_samples = 0
    seen_samples = 0
    throughput_total: list[float] = []
    try:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            model.train()
            loader = build_train_loader(cfg.data, rank=topo.rank, world_size=topo.world_size, epoch=epoch,
                                        seed=cfg.train.seed, decode=decode)
            aug_rng = random.Random(hash((cfg.train.seed, epoch, topo.rank)))
            bar = tqdm(total=micro_batches, initial=state.step_in_epoch, disable=not is_main,
                       desc=f"epoch {epoch}", dynamic_ncols=True)
            meter = ThroughputMeter()
            loss_sum = torch.zeros((), device=accelerator.device)
            loss_count = 0
            data_iter = iter(loader)
            for _ in range(state.step_in_epoch):  # deterministic order: skip what the checkpoint already saw
                next(data_iter)
            stop = False
            while state.step_in_epoch < micro_batches:
                t0 = time.perf_counter()
                batch = next(data_iter, None)
                if batch is None:
                    break
                meter.data_wait += time.perf_counter() - t0
                bad_samples += int(batch.get("n_bad", 0))
                images, targets, image_ids = to_device(batch, accelerator.device, train_augment, aug_rng,
                                                       cfg.train.channels_last)
                seen_samples += len(image_ids)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        logits = model(images)
                    loss = criterion(logits.float(), targets)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.clip_grad > 0 and not distributed.is_deepspeed(
                        accelerator
                    ):
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch += 1
                loss_sum += loss.detach()
                loss_count += 1
                meter.images += len(image_ids)
                bar.update(1)
                if not accelerator.sync_gradients:
                    continue
                if not accelerator.optimizer_step_was_skipped:
                    scheduler.step()
                state.global_step += 1
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
                if state.global_step % cfg.train.log_every == 0:
                    mean_loss = float(loss_sum) / max(loss_count, 1)
                    if not math.isfinite(mean_loss):
                        raise NonFiniteLossError(
                            f"loss is {mean_loss} at step {state.global_step} (epoch {epoch}); last batch image ids "
                            f"{image_ids.tolist()}; last good checkpoint: {last_ckpt or 'none'}"
                        )
                    img_s, wait_frac = meter.window()
                    throughput_total.append(img_s * topo.world_size)
                    lrs = group_lrs(optimizer)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{img_s * topo.world_size:.1f}",
                                    wait=f"{wait_frac:.0%}")
                    tracker.log_step(state.global_step, {
                        "train/loss": mean_loss,
                        "train/img_per_s": img_s * topo.world_size,
                        "train/img_per_s_per_process": img_s,
                        "train/data_wait_frac": wait_frac,
                        "train/epoch": epoch + state.step_in_epoch / micro_batches,
                        **{f"train/lr_{name}": value for name, value in lrs.items()},
                    })
                    loss_sum.zero_()
                    loss_count = 0
                    if distributed.any_rank(preemption.requested is not None, accelerator.device):
                        stop = True
                        break
                if cfg.train.max_steps and state.global_step >= cfg.train.max_steps:
                    break
            bar.close()
            _check_bad_fraction(cfg, bad_samples, seen_samples)
            if stop:
                if distributed.is_deepspeed(accelerator):
                    distributed.average_buffers(accelerator.unwrap_model(model))
                last_ckpt = ckpt.save(state, cfg.to_dict())
                if is_main:
                    mark_requeue(run_dir, f"preempted at step {state.global_step}; checkpoint {last_ckpt}")
                accelerator.print(f"preemption signal: saved {last_ckpt}; exit {REQUEUE_EXIT_CODE} to be requeued")
                tracker.finish({"preempted": True, "global_step": state.global_step})
                raise SystemExit(REQUEUE_EXIT_CODE)

            state.epoch += 1
            state.step_in_epoch = 0
            finished = state.epoch >= cfg.train.epochs or 0 < cfg.train.max_steps <= state.global_step
            if distributed.is_deepspeed(accelerator):
                distributed.average_buffers(accelerator.unwrap_model(model))
            if state.epoch % cfg.train.eval_every == 0 or finished:
                results = _evaluate_all(cfg, accelerator, model, ema, decode, eval_augment)
                best_name, best_value = max(((n, r["mAP"]) for n, r in results.items()), key=lambda x: x[1])
                improved = best_value > state.best_metric
                if improved:
                    state.best_metric, state.best_epoch, state.best_source = best_value, epoch, best_name
                tracker.log_eval(epoch, state.global_step, results)
                accelerator.print(format_metrics_table(results))
                payload = _portable_payload(cfg, accelerator, model, ema, info, state, results)
                if improved:
                    ckpt.save_portable("best.pt", payload)
                ckpt.save_portable("last.pt", payload)
            last_ckpt = ckpt.save(state, cfg.to_dict())
            if finished:
                break
    finally:
        preemption.uninstall()

    summary = {
        "best_mAP": state.best_metric,
        "best_epoch": state.best_epoch,
        "best_source": state.best_source,
        "final": {name: {k: res[k] for k in METRIC_KEYS} for name, res in results.items()},
        "img_per_s": float(np.median(throughput_total)) if throughput_total else None,
        "world_size": topo.world_size,
        "global_batch": topo.global_batch,
        "global_step": state.global_step,
        "bad_samples": bad_samples,
    }
    if results:
        summary["frequency_baseline_mAP"] = results["model"]["frequency_baseline_mAP"]
        summary["num_val_images"] = results["model"]["num_images"]
    tracker.finish(summary)
    if is_main:
        accelerator.print(
            f"best mAP {state.best_metric:.2f} ({state.best_source}, epoch {state.best_epoch}); "
            f"label-frequency baseline mAP {summary.get('frequency_baseline_mAP', float('nan')):.2f}"
        )
        lock.release()
    accelerator.end_training()
    return summary


def _evaluate_all(cfg, accelerator, model, ema, decode, augment) -> dict[str, dict]:
    models = {"model": accelerator.unwrap_model(model)}
    if ema is not None:
        models["ema"] = ema.module
    results = {}
    for name, module in models.items():
        res, merged = evaluate(module, cfg, accelerator, decode, augment)
        res["frequency_baseline_mAP"] = frequency_baseline_map(merged)
        results[name] = res
    model.train()
    return results


def _portable_payload(cfg, accelerator, model, ema, info: DatasetInfo, state: TrainState, results) -> dict:
    return {
        "model": accelerator.get_state_dict(model),
        "ema": ema.module.state_dict() if ema is not None else None,
        "config": cfg.to_dict(),
        "label_names": info.label_names,
        "supercategories": info.supercategories,
        "nums": info.nums,
        "adj": info.adj,
        "epoch": state.epoch - 1,
        "global_step": state.global_step,
        "metrics": {n: {k: r[k] for k in METRIC_KEYS} for n, r in results.items()},
    }


def _check_bad_fraction(cfg: Config, bad: int, seen: int) -> None:
    if bad and bad > cfg.data.max_bad_fraction * max(bad + seen, 1):
        raise RuntimeError(
            f"{bad} undecodable training samples out of {bad + seen} exceed data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction}: check the shards (mlgcn pack lists skipped files in meta.json)"
        )
