"""``mlgcn bench train``: every phase on one pack of shards (a toy set made for it by default), with MFU and the
ratios end to end / ceiling and end to end / reference."""

from __future__ import annotations

import os
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from mlgcn_dist.bench import host
from mlgcn_dist.bench.phases import data_path_phase, loader_phase, synthetic_phase
from mlgcn_dist.bench.profiling import StepProfiler, request_for
from mlgcn_dist.bench.step import (
    ORIGINAL_MLGCN,
    TRAIN_FLOPS_PER_FORWARD,
    TrainStep,
    cuda_numerics,
    forward_flops_per_image,
    peak_tflops,
    run_setting,
)
from mlgcn_dist.bench.window import LoaderQueue, untimed_after_drop
from mlgcn_dist.config import Config, ConfigError, set_key
from mlgcn_dist.data.loader import DatasetInfo, bench_loader, dataset_info, read_meta, whole_rounds
from mlgcn_dist.data.pack import TRAINING_SPLIT, pack_dataset
from mlgcn_dist.data.toy import make_toy
from mlgcn_dist.engine import build_model_for
from mlgcn_dist.errors import interrupted, one_line
from mlgcn_dist.streams import side_stream
from mlgcn_dist.threads import intra_op_threads, threads_phrase


def _progress(name: str, result: dict) -> dict:
    """Print a phase as soon as it is measured: a run cut short by a timeout still shows what it got."""
    print(
        f"[bench] {name}: {result['img_s']:.1f} img/s, data wait {result['data_wait_frac']:.1%}, "
        f"first step {result['first_step_s']:.1f} s",
        flush=True,
    )
    return result


def _failed(name: str, err: Exception) -> str:
    """Print a phase that failed, with its traceback, as soon as it has: its error in a line for the report."""
    traceback.print_exc()
    error = one_line(err)
    print(f"[bench] {name}: failed: {error}", flush=True)
    return error


def with_mfu(result: dict, train_flops: float, device_name: str) -> dict:
    """``result`` plus the achieved training TFLOP/s and their fraction of the device's peak (MFU)."""
    peak = peak_tflops(device_name, result["numerics"])
    achieved = train_flops * result["img_s"]
    return {
        **result,
        "peak_tflops": peak,
        "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak else None,
    }


CEILING_BEFORE = "ceiling_before_"  # + an end-to-end phase's name: the ceiling measured again just before it
CEILING_PINNED = "ceiling_pinned"  # the ceiling with its launching threads each held on one core


def ratios(phases: dict[str, dict]) -> dict[str, float]:
    """img/s of each end-to-end phase over the ceiling's and over the reference's; where the ceiling was also
    measured between the end-to-end phases (``--ceiling-each``), over the last ceiling measured before it too
    (``<phase>/ceiling_before``), the first one included; the pinned ceiling's over the ceiling's
    (``--pinned-ceiling``)."""
    result = {
        f"{name}/{base}": phases[name]["img_s"] / phases[base]["img_s"]
        for name in phases
        if name.startswith("e2e_")
        for base in ("ceiling", "reference")
    }
    if any(name.startswith(CEILING_BEFORE) for name in phases):
        last = None
        for name, phase in phases.items():  # in the order they ran
            if name == "ceiling" or name.startswith(CEILING_BEFORE):
                last = phase
            elif name.startswith("e2e_"):
                result[f"{name}/ceiling_before"] = phase["img_s"] / last["img_s"]
    if CEILING_PINNED in phases:
        result[f"{CEILING_PINNED}/ceiling"] = phases[CEILING_PINNED]["img_s"] / phases["ceiling"]["img_s"]
    return result


def bench_device(cfg: Config) -> torch.device:
    return torch.device("cuda" if cfg.train.device == "auto" and torch.cuda.is_available() else "cpu")


def end_to_end_phases(cfg: Config, device: torch.device) -> dict[str, dict]:
    """The end-to-end phases a run of ``cfg`` on ``device`` measures, in order: name -> how it is fed (``decode``,
    :func:`loader_phase`'s options, and ``other_stream``: the steps on the other kind of stream than
    train.side_stream)."""
    phases = {"e2e_decode_cpu": {"decode": "cpu"}, "e2e_decode_gpu": {"decode": "gpu"},
              # The same batches, decoded and augmented in a process of their own (data.augment_process).
              "e2e_decode_gpu_process": {"decode": "gpu", "augment_process": True}}
    if cfg.data.device_prefetch > 0:  # what running the device conversion ahead gains, in the same run
        phases["e2e_decode_gpu_inline"] = {"decode": "gpu", "depth": 0}
        # Only the decode ahead, on the helper; the loop launches the augment.
        phases["e2e_decode_gpu_augment_in_loop"] = {"decode": "gpu", "augment_in_loop": True}
    if device.type == "cuda":  # GPU decode ahead with the steps on the other kind of stream (streams.py)
        other = "default" if cfg.train.side_stream else "side"
        phases[f"e2e_decode_gpu_{other}_stream"] = {"decode": "gpu", "other_stream": True}
    return phases


def select_phases(phases: dict[str, dict], wanted: list[str] | None) -> dict[str, dict]:
    """``phases`` cut to ``wanted`` (all when None), in their own order; a name not among them is a ConfigError
    naming those there are."""
    if wanted is None:
        return phases
    unknown = [name for name in wanted if name not in phases]
    if unknown:
        raise ConfigError(
            f"--phases: {', '.join(unknown)} is not an end-to-end phase of this run (those are: "
            f"{', '.join(phases)}; the ceiling, its repeat and the reference always run)"
        )
    return {name: how for name, how in phases.items() if name in wanted}


def with_thread_variants(phases: dict[str, dict], threads: int | None) -> dict[str, dict]:
    """``phases``, each followed by the same phase at ``threads`` intra-op threads (``<name>_threads<N>``) when
    ``threads`` is given: two settings of the process compared within one run, side by side, where two runs
    minutes apart on one machine differed by 30% (README Performance, run G)."""
    if threads is None:
        return phases
    variants: dict[str, dict] = {}
    for name, how in phases.items():
        variants[name] = how
        variants[f"{name}_threads{threads}"] = {**how, "threads": threads}
    return variants


def _configured_phases(
    cfg: Config,
    info: DatasetInfo,
    device: torch.device,
    steps: int,
    warmup: int,
    profiler: StepProfiler | None,
    end_to_end: dict[str, dict],
    ceiling_each: bool = False,
    pinned_ceiling: bool = False,
) -> tuple[dict[str, dict], dict[str, str], int]:
    """The ceiling and the ``end_to_end`` phases on one model (compiled once), the end-to-end phases that failed
    (name -> error), and the model's forward FLOPs per image. With ``ceiling_each``, the ceiling is measured again
    before each end-to-end phase after the first (``ceiling_before_<phase>``): a host whose pace drifts over the
    run (run I: the repeat at 0.85 of the first, the device's work unchanged) then gives each phase a ratio to a
    ceiling measured beside it. With ``pinned_ceiling``, the ceiling is measured again right after the first with the
    loop thread and the backward's each held on one core (``ceiling_pinned``, :func:`~mlgcn_dist.bench.host.pinned_threads`):
    whether the host's pace is its launching threads moving between cores.

    An end-to-end phase that fails is reported and the others are measured: a code path may fail on the first GPU
    it meets, in a device lease that may not come again, and the phases after it (the ceiling's repeat, the
    reference) are what its neighbours' ratios need."""
    setting = run_setting(cfg, device)
    with cuda_numerics(setting):
        torch.manual_seed(cfg.train.seed)
        step = TrainStep(build_model_for(cfg, info), cfg, setting, device)
        forward_flops = forward_flops_per_image(step.model, cfg.data.image_size, device, cfg.data.batch_size)

        stream = side_stream(device, cfg.train.side_stream)

        def ceiling(name: str) -> dict:
            return synthetic_phase(
                step, cfg.data.batch_size, cfg.data.image_size, info.num_classes, steps, warmup, stream,
                request_for(profiler, name),
            )

        phases = {"ceiling": _progress("ceiling", ceiling("ceiling"))}
        if pinned_ceiling:
            with host.pinned_threads() as pins:
                pinned = ceiling(CEILING_PINNED)
            pinned["pinned_cores"] = None if pins is None else {str(tid): core for tid, core in pins.items()}
            phases[CEILING_PINNED] = _progress(CEILING_PINNED, pinned)
        failed: dict[str, str] = {}
        for i, name in enumerate(end_to_end):
            if ceiling_each and i > 0:
                phases[CEILING_BEFORE + name] = _progress(CEILING_BEFORE + name, ceiling(CEILING_BEFORE + name))
            options = dict(end_to_end[name])
            decode = options.pop("decode")
            on = side_stream(device, not cfg.train.side_stream) if options.pop("other_stream", False) else stream
            threads = options.pop("threads", None)
            profile = request_for(profiler, name)
            try:
                with intra_op_threads(threads):
                    result = loader_phase(step, cfg, decode, steps, warmup, stream=on, profile=profile, **options)
                    result["intra_op_threads"] = torch.get_num_threads()
            except Exception as err:  # noqa: BLE001 - reported with its traceback; the other phases go on
                if interrupted(err):  # Ctrl-C or a stop signal that Python wrapped: the bench stops
                    raise
                failed[name] = _failed(name, err)
                continue
            if threads is not None:
                result["decode_on"] += f", {threads_phrase(threads)}"
            phases[name] = _progress(name, result)
        # The ceiling once more: how far the device itself drifted (clocks, temperature) over the phases.
        phases["ceiling_repeat"] = _progress("ceiling_repeat", ceiling("ceiling_repeat"))
    return phases, failed, forward_flops


def _reference_phase(
    cfg: Config, info: DatasetInfo, device: torch.device, steps: int, warmup: int, profiler: StepProfiler | None
) -> dict:
    with cuda_numerics(ORIGINAL_MLGCN):
        torch.manual_seed(cfg.train.seed)
        # The original stepped torch's default SGD, not the fused one optim.implementation=auto picks on CUDA.
        original = replace(cfg, optim=replace(cfg.optim, implementation="foreach"))
        step = TrainStep(build_model_for(cfg, info), original, ORIGINAL_MLGCN, device)
        # The original moved each batch inline (``input.cuda()``): no conversion ahead.
        profile = request_for(profiler, "reference")
        return _progress("reference", loader_phase(step, cfg, "cpu", steps, warmup, depth=0, profile=profile))


def bench_train(
    cfg: Config,
    steps: int,
    warmup: int,
    profiler: StepProfiler | None = None,
    end_to_end: dict[str, dict] | None = None,
    ceiling_each: bool = False,
    pinned_ceiling: bool = False,
) -> dict:
    """Every phase on ``cfg.data.shards``: the ceiling, the ``end_to_end`` phases (default: every one of
    :func:`end_to_end_phases`; the CLI passes those ``--phases`` and ``--also-threads`` make), its repeat and the
    reference; returns the report (see :mod:`mlgcn_dist.bench`), where an end-to-end phase that failed is in
    ``failed_phases`` (name -> its error), not ``phases``. With ``profiler``, each training phase ends with that many
    steps under torch.profiler (their device timeline in ``profile``). With ``ceiling_each``, the ceiling also runs
    before each end-to-end phase after the first, and with ``pinned_ceiling`` once with its launching threads held
    on a core each (:func:`_configured_phases`)."""
    device = bench_device(cfg)
    end_to_end = end_to_end_phases(cfg, device) if end_to_end is None else end_to_end
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = dataset_info(cfg.data, val=False)  # training alone: a pack of the training split is enough
    phases, failed, forward_flops = _configured_phases(cfg, info, device, steps, warmup, profiler, end_to_end,
                                                       ceiling_each, pinned_ceiling)
    data_gpu = data_path_phase(cfg, device, "gpu", steps, warmup)
    print(f"[bench] data path alone (gpu decode): {data_gpu['img_s']:.1f} img/s", flush=True)
    if device.type == "cuda":  # the first model is gone: the reference's peak memory is its own
        torch.cuda.empty_cache()
    phases["reference"] = _reference_phase(cfg, info, device, steps, warmup, profiler)
    train_flops = TRAIN_FLOPS_PER_FORWARD * forward_flops
    phases = {name: with_mfu(result, train_flops, device_name) for name, result in phases.items()}
    loader = bench_loader(
        cfg.data.shards,
        "cpu",
        workers=cfg.data.workers,
        batches=warmup + steps,
        batch_size=cfg.data.batch_size,
        image_size=cfg.data.image_size,
    )
    return {
        "device": device_name,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "host": host.host_setup(),
        "intra_op_threads": torch.get_num_threads(),
        "model": {"backbone": cfg.model.backbone, "head": cfg.model.head, "num_classes": info.num_classes},
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "workers": cfg.data.workers,
        "prefetch_factor": cfg.data.prefetch_factor,
        "steps": steps,
        "warmup": warmup,
        "flops": {"forward_per_image": forward_flops, "train_per_image": train_flops},
        "compile_s": phases["ceiling"]["first_step_s"] if cfg.train.compile else None,
        "phases": phases,
        "ratios": ratios(phases),
        "failed_phases": failed,
        "ceiling_drift": phases["ceiling_repeat"]["img_s"] / phases["ceiling"]["img_s"],
        "loader_cpu": loader,
        "data_gpu": data_gpu,
    }



def make_toy_shards(workdir: Path, images: int, size: int, workers: int, seed: int) -> Path:
    """make-toy at ``size`` px (real-sized noisy JPEGs), packed into two shards per loader worker."""
    root, shards = workdir / "toy", workdir / "shards"
    make_toy(root, train=images, val=max(4, images // 16), size=size, seed=seed)
    pack_dataset(
        "coco",
        root,
        shards,
        ["train", "val"],
        shard_count=2 * max(workers, 1),
        workers=max(1, min(workers, os.cpu_count() or 1)),
        overwrite=True,
    )
    return shards


def describe_shards(shards: Path, split: str) -> dict:
    """Where the data came from, and the mean bytes of a training sample (its JPEG, json and tar headers)."""
    body = read_meta(shards)["splits"][split]
    total = sum((shards / s["file"]).stat().st_size for s in body["shards"])
    return {
        "shards": str(shards),
        "split": split,
        "images": body["count"],
        "mean_sample_bytes": total / max(body["count"], 1),
    }


def batches_per_phase(cfg: Config, steps: int, warmup: int, profiled: int = 0) -> int:
    """Batches in a phase's loader epoch: warm-up, the dropped queue and the untimed steps after it
    (:class:`LoaderQueue`), the timed steps in whole rounds of the workers, the ``profiled`` ones, then the
    ``data.device_prefetch`` batches the helper converts past the last step and one more round, so the timed window
    never sees the end of the epoch (workers that finished their share, uneven shares)."""
    workers, depth = cfg.data.workers, cfg.data.device_prefetch
    dropped = LoaderQueue.queued(workers, cfg.data.prefetch_factor)
    timed = whole_rounds(steps, workers)
    return warmup + dropped + untimed_after_drop(workers, depth) + timed + profiled + depth + max(workers, 1)


def point_config_at_shards(cfg: Config, shards: Path, batches: int) -> None:
    """Read ``shards`` whatever the config said, with one loader epoch covering every batch a phase takes."""
    dataset = read_meta(shards)["dataset"]
    for key, value in (
        ("data.format", "wds"),
        ("data.shards", str(shards)),
        ("data.dataset", dataset),
        ("data.train_split", TRAINING_SPLIT[dataset]),
        ("data.steps_per_epoch", batches),
    ):
        set_key(cfg, key, value, "bench")


# ---------------------------------------------------------------------------------------------- report
