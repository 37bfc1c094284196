"""Specifications that need a CUDA device (``pytest -m gpu``; skipped without one): the nvJPEG input path
gives the images of the CPU path, mixed-precision channels_last steps train, and the bench's CUDA branch."""

from __future__ import annotations

import gc
import json
import multiprocessing
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import jpeg, photo
from torchvision.io import ImageReadMode, decode_jpeg

from mlgcn_dist.bench.profiling import ProfileRequest, profile_steps
from mlgcn_dist.bench.step import TrainStep, run_setting
from mlgcn_dist.bench.train import make_toy_shards
from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config
from mlgcn_dist.data.augment_process import AugmentProcess
from mlgcn_dist.data.folder import PackedJpegs
from mlgcn_dist.data.loader import build_eval_loader, build_train_loader, dataset_info
from mlgcn_dist.data.prefetch import prefetch_to_device
from mlgcn_dist.data.transforms import IMAGENET_STD, CropParams, GpuAugment, to_device
from mlgcn_dist.distributed import concrete_precision
from mlgcn_dist.engine import Trainer, build_model_for, train
from mlgcn_dist.timing import DataStall

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning"),
]

ONE_GREY_LEVEL = 1.0 / 255 / min(IMAGENET_STD)  # one uint8 step after ImageNet normalisation, at its largest


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Toy shards of 32 training images of up to 160 px (larger than the 96 px output: the resize matters)."""
    return make_toy_shards(tmp_path_factory.mktemp("gpu"), images=32, size=160, workers=1, seed=0)


def test_nvjpeg_loader_path_gives_the_images_of_the_cpu_loader_path(shards):
    """The same samples through the loader: PIL in the workers vs raw bytes decoded by nvJPEG in to_device.

    nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's (PIL upsamples 4:2:0 chroma with a smoothing
    filter, nvJPEG replicates): measured on an H200 (2026-11-26) on these noisy toy images, mean 1.7 grey levels.
    """
    cfg = load_config(
        "configs/toy.yaml",
        [
            "data.format=wds",
            f"data.shards={shards}",
            "data.val_split=train",
            "data.image_size=96",
            "data.workers=0",
        ],
    )
    rng = random.Random(0)
    cpu, gpu = {}, {}
    for batch in build_eval_loader(cfg.data, rank=0, world_size=1, decode="cpu"):
        images, targets, ids = to_device(batch, "cpu", None, rng, channels_last=False)
        cpu.update(zip(ids.tolist(), zip(images, targets)))
    augment = GpuAugment(96, train=False)
    for batch in build_eval_loader(cfg.data, rank=0, world_size=1, decode="gpu"):
        images, targets, ids = to_device(batch, "cuda", augment, rng, channels_last=True)
        assert images.is_contiguous(memory_format=torch.channels_last)
        gpu.update(zip(ids.tolist(), zip(images.cpu(), targets.cpu())))
    assert gpu.keys() == cpu.keys() and len(cpu) == dataset_info(cfg.data).num_train
    diffs = torch.stack([(gpu[i][0] - cpu[i][0]).abs() for i in cpu])
    grey = diffs / ONE_GREY_LEVEL
    print(f"nvJPEG vs PIL through the loader: max {grey.max():.2f}, mean {grey.mean():.3f} grey levels")
    assert diffs.mean() <= 3 * ONE_GREY_LEVEL
    assert diffs.max() <= 64 * ONE_GREY_LEVEL  # measured 42 at chroma edges of tiny drawn objects
    assert all(torch.equal(gpu[i][1], cpu[i][1]) for i in cpu)


def test_auto_precision_is_bf16_on_gpus_of_compute_capability_8_and_later_else_fp16():
    native = torch.cuda.get_device_capability() >= (8, 0)  # Ampere: the first with bf16 tensor cores
    assert concrete_precision("auto", "cuda") == ("bf16" if native else "fp16")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_channels_last_step_trains_gcn_resnet101_on_cuda(toy_root, precision):
    cfg = load_config(
        "configs/coco_gcn.yaml",
        [
            "data.format=folder",
            f"data.root={toy_root}",
            "model.pretrained=none",
            "graph.embeddings=onehot",
            "log.wandb=disabled",
            f"train.precision={precision}",
            "train.channels_last=true",
            "train.compile=false",
        ],
    )
    info = dataset_info(cfg.data)
    step = TrainStep(build_model_for(cfg, info), cfg, run_setting(cfg, "cuda"), torch.device("cuda"))
    conv = step.model.backbone[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 448, 448, device="cuda").contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(8, info.num_classes, device="cuda") < 0.2).to(torch.int8)
    head_before = [p.detach().clone() for p in step.model.head.parameters()]
    conv_before = conv.weight.detach().clone()
    # fp16: the grad scaler starts at 2**16 and skips the first steps that overflow, as it should; 12 steps
    # leave room for it to back off (measured on an H200: 3 steps were all skipped).
    losses = [float(step(images, targets)) for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(conv.weight, conv_before)
    assert any(not torch.equal(p, b) for p, b in zip(step.model.head.parameters(), head_before))
    assert conv.weight.dtype == torch.float32  # autocast keeps fp32 master weights


def test_bench_train_on_cuda_reports_nvjpeg_decode_and_cuda_memory(tmp_path, shards):
    out = tmp_path / "train.json"
    argv = [
        "bench",
        "train",
        "--config",
        "configs/toy.yaml",
        "--shards",
        str(shards),
        "--steps",
        "3",
        "--warmup",
        "2",
        "--json",
        str(out),
        "train.precision=bf16",
        "train.channels_last=true",
    ]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["device"] == torch.cuda.get_device_name()
    phases = report["phases"]
    assert phases["e2e_decode_gpu"]["decode_on"] == "cuda (nvJPEG)"
    # The configured steps run on the default stream; one more GPU-decode phase runs them on a side stream.
    assert phases["e2e_decode_gpu"]["train_stream"] == "default"
    assert phases["e2e_decode_gpu_side_stream"]["train_stream"] == "side"
    assert "e2e_decode_gpu_side_stream/ceiling" in report["ratios"]
    # Its CUDA context alone takes hundreds of MiB.
    assert phases["e2e_decode_gpu_process"]["augment_process_device_bytes"] > 64 * 2**20
    assert report["data_gpu"]["decode_on"] == "cuda (nvJPEG)" and report["data_gpu"]["decode_ms"] > 0
    assert all(
        p["peak_mem_kind"] == "cuda_max_allocated" and 0 < p["peak_mem_bytes"] <= p["peak_mem_reserved_bytes"]
        and 0 <= p["data_stall_frac"] <= 1 for p in phases.values()
    )
    if phases["ceiling"]["peak_tflops"] is not None:  # a GPU in the peak table
        assert 0 < phases["ceiling"]["mfu"] < 1


def test_batches_decoded_ahead_on_a_side_stream_equal_inline_decoding(shards):
    """The helper thread's stream decodes and augments; the consumer's stream reads complete, unrecycled tensors."""
    cfg = load_config(
        "configs/toy.yaml",
        ["data.format=wds", f"data.shards={shards}", "data.val_split=train", "data.image_size=96", "data.workers=0"],
    )
    augment = GpuAugment(96, train=True)
    results = []
    for depth in (0, 2):
        rng = random.Random(3)
        loader = build_eval_loader(cfg.data, rank=0, world_size=1, decode="gpu")
        pairs = prefetch_to_device(
            loader, lambda b, rng=rng: to_device(b, "cuda", augment, rng, True), torch.device("cuda"), depth
        )
        seen = []
        for _, (images, _, _) in pairs:
            # A slow consumer on the default stream: the side stream runs ahead and must not reuse this memory
            # before the consumer's kernels have read it.
            torch.cuda._sleep(2_000_000)
            seen.append((images * 1).cpu())
        results.append(seen)
    assert len(results[0]) == len(results[1]) > 1
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_the_pinning_thread_pins_a_workers_batch_as_it_came_and_leaves_the_jpeg_bytes_unpinned(shards, decode):
    """With pinning (on CUDA) the DataLoader's pinning thread runs Batch.pin_memory, which frees the worker's shared
    memory after its copies: the batches equal those of a loader without pinning, every tensor pinned."""
    overrides = ["data.format=wds", f"data.shards={shards}", "data.image_size=96", "data.workers=2", "data.batch_size=8",
                 "data.shuffle_buffer=0"]
    loaders = {
        pin: build_train_loader(load_config("configs/toy.yaml", [*overrides, f"data.pin_memory={pin}"]).data,
                                rank=0, world_size=1, epoch=0, seed=0, decode=decode)
        for pin in (True, False)
    }
    pinned, plain = (list(loaders[pin]) for pin in (True, False))
    assert len(pinned) == len(plain) > 1
    for got, want in zip(pinned, plain):
        for key in ("image", "target", "image_id") if decode == "cpu" else ("target", "image_id"):
            assert got[key].is_pinned() and not want[key].is_pinned() and torch.equal(got[key], want[key])
        if decode == "gpu":
            assert not got["jpeg"].data.is_pinned() and torch.equal(got["jpeg"].data, want["jpeg"].data)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("train_stream", ["default", "side"])
def test_engine_trains_with_cuda_graphs_gpu_decode_ahead_and_bf16(toy_root, tmp_path, train_stream):
    """compile_mode=reduce-overhead (CUDA graphs) with batches decoded ahead on a side stream; the steps on the
    default stream or on a side stream of their own (train.side_stream)."""
    cfg = load_config(
        "configs/toy.yaml",
        [
            f"data.root={toy_root}",
            "data.decode=gpu",
            "data.device_prefetch=2",
            "data.steps_per_epoch=12",
            "train.epochs=2",
            "train.precision=bf16",
            "train.channels_last=true",
            "train.compile=true",
            "train.compile_mode=reduce-overhead",
            f"train.side_stream={train_stream == 'side'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.resume=none",
        ],
    )
    summary = train(cfg)
    assert summary["global_step"] == 24
    assert summary["best_mAP"] > summary["frequency_baseline_mAP"]
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert logged and all(0 <= step["train/data_stall_frac"] <= 1 for step in logged)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_training_steps_between_logging_intervals_never_make_the_host_wait_for_the_gpu(toy_root, tmp_path,
                                                                                       monkeypatch):
    """With torch's sync debug mode at "error", any call that makes the host wait for the device (``.item()``, a
    copy to the host, a stream or device synchronise) raises. It is on from the start of the 3rd step (after
    cuDNN's autotuning) to the start of the last (before the end-of-epoch finiteness check): the steps, the loop
    around them, the EMA, and the batches moved onto the device ahead on the helper thread (CPU decode: nvJPEG
    waits for its own stream inside torchvision by design, on the helper thread)."""
    steps = 0
    train_step = Trainer._train_step

    def checked(self, images, targets):
        nonlocal steps
        steps += 1
        torch.cuda.set_sync_debug_mode("error" if 3 <= steps < 12 else "default")
        return train_step(self, images, targets)

    monkeypatch.setattr(Trainer, "_train_step", checked)
    cfg = load_config("configs/toy.yaml", [
        f"data.root={toy_root}", "data.decode=cpu", "data.device_prefetch=2", "data.steps_per_epoch=12",
        "train.epochs=1", "train.log_every=100", "train.precision=bf16", "train.channels_last=true",
        "train.ema_decay=0.9", f"train.output_dir={tmp_path / 'run'}", "train.resume=none",
    ])
    try:
        summary = train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert steps == 12 and summary["global_step"] == 12


def _photo_jpegs(seed: int, count: int = 8) -> list[torch.Tensor]:
    """``count`` different 256 x 256 RGB test pictures as JPEGs."""
    return [jpeg(photo(256, 256, seed=seed * count + i)) for i in range(count)]


def _reads_corrupted_by(decode: Callable[[list[torch.Tensor]], object], jpegs: list[torch.Tensor]) -> int:
    """How many queued reads of freed memory see other bytes once ``decode`` has run, over 20 rounds.

    Each round fills tensors of the decoded images' size, queues a ~25 ms spin and then one sum per tensor on
    the current stream, frees the tensors (their blocks go back to the current stream's pool while the sums
    are still queued), decodes, and compares each sum with the value it was queued to read.
    """
    numel = 3 * 256 * 256  # the images are 256 x 256 RGB
    corrupted = 0
    for _ in range(20):
        tensors = [torch.full((numel,), 7, dtype=torch.uint8, device="cuda") for _ in jpegs]
        torch.cuda.synchronize()
        torch.cuda._sleep(50_000_000)
        sums = [t.sum(dtype=torch.int64) for t in tensors]
        del tensors
        decode(jpegs)
        torch.cuda.synchronize()
        corrupted += sum(int(s) != 7 * numel for s in sums)
    return corrupted


def test_gpu_decode_never_writes_into_memory_that_queued_kernels_still_read():
    """torchvision's nvJPEG call takes its output blocks on the caller's stream without waiting for it (the
    hardware engine writes at once); GpuAugment.decode allocates them on a stream of its own instead."""
    jpegs = _photo_jpegs(0)
    augment = GpuAugment(64, train=True)
    raw = _reads_corrupted_by(lambda j: decode_jpeg(j, mode=ImageReadMode.RGB, device="cuda"), jpegs)
    ours = _reads_corrupted_by(lambda j: augment.decode(j, "cuda"), jpegs)
    print(f"queued reads overwritten by the decoder: torchvision's call {raw}, GpuAugment.decode {ours}")
    assert ours == 0
    if raw == 0:
        pytest.skip("torchvision's own call overwrote nothing on this device: the defence was not exercised")


def test_decoded_images_are_not_reused_before_the_callers_queued_kernels_have_read_them():
    """The decode stream's blocks go back to its pool when the images are dropped; the readers recorded on the
    caller's stream keep the next decode from being handed them while their reads are still queued."""
    augment = GpuAugment(64, train=True)
    first, second = _photo_jpegs(1), _photo_jpegs(2)
    expected = [int(image.sum(dtype=torch.int64)) for image in augment.decode(first, "cuda")[0]]
    caller = torch.cuda.Stream()  # as the prefetch helper's stream
    wrong = 0
    with torch.cuda.stream(caller):
        for _ in range(10):
            images, _ = augment.decode(first, "cuda")
            torch.cuda._sleep(50_000_000)
            sums = [image.sum(dtype=torch.int64) for image in images]
            del images
            augment.decode(second, "cuda")  # would be handed the first images' blocks without the recorded reads
            caller.synchronize()
            wrong += sum(int(s) != e for s, e in zip(sums, expected))
    assert wrong == 0


def test_the_augment_process_writes_what_gpu_augment_writes_here_whichever_side_has_work_queued():
    """The shared buffer's two events: the trainer's copy waits for the child's writes (a copy queued at once
    would read them half done), the child's next writes wait for the trainer's copy (one queued behind a 25 ms
    spin would read the next batch). Eight batches of four kinds, the spin before every other one."""
    batches = [PackedJpegs.of(_photo_jpegs(seed, count=6)) for seed in range(4)]
    here = GpuAugment(64, train=True)
    expected = [here(batches[i % 4], "cuda", random.Random(i), True)[0] for i in range(8)]
    stream = torch.cuda.Stream()  # as the prefetch helper's
    got = []
    with AugmentProcess("cuda", 64, channels_last=True) as process, torch.cuda.stream(stream):
        augment = process.augment(train=True)
        for i in range(8):
            if i % 2:
                torch.cuda._sleep(50_000_000)
            images, kept = augment(batches[i % 4], "cuda", random.Random(i), True)
            assert kept == list(range(6)) and images.is_contiguous(memory_format=torch.channels_last)
            got.append(images)
        stream.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_the_augment_process_shares_a_buffer_outside_expandable_segments_while_training_memory_stays_in_them():
    """With expandable_segments:True (PyTorch's advice against fragmentation) a shared expandable segment would
    be received with pidfd_getfd, which a child may not use on its parent under Yama's ptrace_scope=1 without
    CAP_SYS_PTRACE (containers drop it). So the buffer comes from cudaMalloc; the batches are GpuAugment's, and an
    allocation after it still comes from an expandable segment (the control: they were on)."""
    get = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    put = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if get is None or put is None:
        pytest.skip("this torch cannot change the allocator's settings at run time")
    before = get()
    # Earlier tests' cached cudaMalloc segments: an allocation below could reuse one whatever the setting.
    gc.collect()
    torch.cuda.empty_cache()
    put("expandable_segments:True")
    try:
        batch = PackedJpegs.of(_photo_jpegs(0, count=6))
        expected = GpuAugment(64, train=True)(batch, "cuda", random.Random(0), True)[0]
        with AugmentProcess("cuda", 64, channels_last=True) as process:
            images, _ = process.augment(train=True)(batch, "cuda", random.Random(0), True)
            shared = process._outbox.data_ptr()  # the buffer the child writes into
            later = torch.empty(2**28, device="cuda")  # 1 GiB: larger than any free block an earlier test left
            segments = torch.cuda.memory._snapshot()["segments"]
            torch.cuda.synchronize()
        assert torch.equal(images, expected)
        assert get() == "expandable_segments:True"
    finally:
        put(before)

    def segment_of(pointer: int) -> dict:
        return next(s for s in segments if s["address"] <= pointer < s["address"] + s["total_size"])

    assert not segment_of(shared)["is_expandable"] and segment_of(later.data_ptr())["is_expandable"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_engine_trains_with_gpu_decode_in_a_process_of_its_own_and_ends_it(toy_root, tmp_path):
    cfg = load_config("configs/toy.yaml", [f"data.root={toy_root}", "data.decode=gpu", "data.augment_process=true",
                                           "data.steps_per_epoch=8", "train.epochs=1", "train.precision=bf16",
                                           "train.channels_last=true", f"train.output_dir={tmp_path / 'run'}",
                                           "train.resume=none"])
    summary = train(cfg)
    assert summary["global_step"] == 8 and summary["best_mAP"] > summary["frequency_baseline_mAP"]
    assert not [child for child in multiprocessing.active_children() if child.name == "mlgcn-augment"]


def test_gpu_augment_never_waits_for_the_device():
    """Decode and augment only queue work: with a long spin queued on the caller's stream before each call, the
    spin is still running when the call returns. (Run B's augment copied its constants from pageable memory,
    which waits for the current stream: inline, for the whole training step queued before it.) The decode is
    checked apart: a wait inside nvJPEG would show there, not in our code."""
    jpegs = _photo_jpegs(3)
    packed = PackedJpegs.of(jpegs)
    augment = GpuAugment(64, train=True)
    images, _ = augment.decode(jpegs, "cuda")
    params = [CropParams(8, 8, 200, 160, flip=i % 2 == 0) for i in range(len(images))]  # one size: reordered
    calls = {
        "decode": lambda: augment.decode(jpegs, "cuda"),
        "apply": lambda: augment.apply(images, params, "cuda"),
        "decode + augment": lambda: augment(packed, "cuda", random.Random(1)),
    }
    for call in calls.values():  # nvJPEG, the constants, pinned buffers and lazily loaded kernels made once
        call()
    torch.cuda.synchronize()

    def returns_before_the_spin_ends(call: Callable[[], object]) -> bool:
        torch.cuda._sleep(2_000_000_000)  # about a second on an H100's clock
        spun = torch.cuda.Event()
        spun.record()  # marks the spin's end alone, not the work the call queues after it
        call()
        early = not spun.query()
        torch.cuda.synchronize()
        return early

    waited = {name: not returns_before_the_spin_ends(call) for name, call in calls.items()}
    assert not any(waited.values()), f"waited for the caller's queued work: {waited}"


def test_a_data_wait_stalls_the_device_only_once_the_queued_steps_are_done():
    """A step is a spin of 500 M cycles (0.25-0.5 s at 1-2 GHz). A host that waits 0.1 s for a batch while that
    step still runs costs the device nothing; one that waits 0.1 s after the device has finished stalls it 0.1 s."""
    stall = DataStall(torch.device("cuda"))
    stalled = {}
    for name, device_done_first in (("while_busy", False), ("after_finish", True)):
        torch.cuda._sleep(500_000_000)
        if device_done_first:
            torch.cuda.synchronize()
        stall.waiting()
        time.sleep(0.1)
        stall.got_batch()
        torch.cuda._sleep(500_000_000)
        stalled[name] = stall.read()
    assert stalled["while_busy"] < 0.01
    assert 0.09 < stalled["after_finish"] < 0.2


def test_bench_decode_times_torchvisions_decoder_idle_and_behind_every_kind_of_queued_work(tmp_path):
    out = tmp_path / "decode.json"
    assert main(["bench", "decode", "--batch", "4", "--size", "128", "--busy-ms", "20", "--repeats", "2",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    cases = report["decoders"]["torchvision"]
    assert set(cases) == {"idle", "idle_4x", "busy_default", "busy_side", "busy_side_high_priority", "busy_side_4x",
                          "busy_side_graph", "busy_side_one_sm_spin"}
    assert all(case["ready_ms"] >= case["return_ms"] > 0 for case in cases.values())
    augment = report["augment"]
    assert augment["crop_sizes"] >= augment["antialiased_crop_sizes"] >= 0
    assert all(augment[name]["device_ms"] > 0 and augment[name]["host_ms"] > 0
               for name in ("apply", "always_antialiased"))


def test_a_profiled_host_pause_between_two_kernels_shows_as_device_idle_and_a_second_stream_as_other_work(tmp_path):
    x = torch.randn(4096, 4096, device="cuda")
    other = torch.cuda.Stream()

    def steps() -> None:
        for _ in range(2):
            x @ x
            torch.cuda.synchronize()
            time.sleep(0.02)  # the host launches nothing for 20 ms: what a launch thread held up looks like
            with torch.cuda.stream(other):
                x @ x
            torch.cuda.synchronize()

    result = profile_steps(steps, ProfileRequest(tmp_path / "steps.json.gz", 2), torch.device("cuda"))
    timeline = result["device"]
    assert timeline["streams"] == 2 and timeline["other_streams_ms"] > 0
    assert timeline["idle_ms"] >= 20.0
    assert timeline["window_ms"] == pytest.approx(timeline["busy_ms"] + timeline["idle_ms"])


def test_bench_contention_on_cuda_launches_kernels_beside_each_background_and_the_nvjpeg_data_path(tmp_path):
    out = tmp_path / "contention.json"
    assert main(["bench", "contention", "--seconds", "0.1", "--repeats", "1", "--batch", "4", "--size", "128",
                 "--image-size", "64", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["device"] == torch.cuda.get_device_name()
    rows = report["backgrounds"]
    assert all(row["launches_per_s"] > 0 for row in rows.values())
    assert rows["data_path"]["background_rounds_per_s"] > 0  # batches decoded on the device meanwhile
    assert rows["data_path_process"]["background_rounds_per_s"] > 0  # and in a process of their own
    assert rows["batches_released"]["background_rounds_per_s"] > 0  # batches pinned by Batch.pin_memory meanwhile
