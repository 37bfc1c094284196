"""Specifications that need a CUDA device (``pytest -m gpu``; skipped without one): the nvJPEG input path
gives the images of the CPU path, mixed-precision channels_last steps train, and the bench's CUDA branch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from mlgcn_dist.bench import TrainStep, make_toy_shards, run_setting
from mlgcn_dist.cli import main
from mlgcn_dist.config import load_config
from mlgcn_dist.data.loader import build_eval_loader, dataset_info
from mlgcn_dist.data.prefetch import prefetch_to_device
from mlgcn_dist.data.transforms import IMAGENET_STD, GpuAugment, to_device
from mlgcn_dist.engine import build_model_for, train

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
        cpu.update(zip(batch["image_id"].tolist(), zip(batch["image"], batch["target"])))
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
    step = TrainStep(build_model_for(cfg, info), cfg, run_setting(cfg), torch.device("cuda"))
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
    assert all(
        p["peak_mem_kind"] == "cuda_max_allocated" and p["peak_mem_bytes"] > 0 for p in phases.values()
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


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_engine_trains_with_cuda_graphs_gpu_decode_ahead_and_bf16(toy_root, tmp_path):
    """compile_mode=reduce-overhead (CUDA graph replays) with batches decoded ahead on a side stream."""
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
            f"train.output_dir={tmp_path / 'run'}",
            "train.resume=none",
        ],
    )
    summary = train(cfg)
    assert summary["global_step"] == 24
    assert summary["best_mAP"] > summary["frequency_baseline_mAP"]
