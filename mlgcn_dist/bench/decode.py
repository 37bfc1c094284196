"""``mlgcn bench decode``: how long a GPU JPEG decoder takes for a batch while the device is busy with other work.

Why: under CUDA graphs, `mlgcn bench train` on an H100 saw torchvision's batched nvJPEG call take 74 ms for 64
images during training against ~7 ms on an idle device, and GPU decode reach 0.88 of the ceiling (README
Performance). The cases, each the median of ``repeats`` calls:

- idle: the decode alone (and 4x the batch);
- busy: the decode right after ``busy_ms`` of 8192^2 bf16 matrix products were queued on another stream: the
  default stream, a non-blocking one at normal and at high priority, the products as one CUDA graph, 4x the
  batch, and a spin of one thread block that leaves the other SMs free. For each: host ms until the call
  returns, until its images are ready on the device, and whether the queued work had finished by then.

Decoders: torchvision's ``decode_jpeg`` on CUDA (what GpuAugment uses) with the bitstreams in pageable or pinned
memory, and NVIDIA nvImageCodec (``nvidia-nvimgcodec-cu13[nvjpeg]``) if installed. Both decode baseline JPEGs on
the GPU's JPEG engines where it has them (A100, H100, H200): torchvision's batched call creates its nvJPEG handle
with the hardware backend and sends it every image ``nvjpegDecodeBatchedSupported`` accepts.

Then what follows the decode in training, ``GpuAugment.apply`` on the decoded batch (crop, normalise, resize,
flip, channels_last): its device time and the host time of its launches, against the same with every crop
antialiased (what it did before it antialiased only shrinking crops), measured in the same run.

What it found on an H100 (2026-11-26): every decoder was ready only once all the queued products had run,
whatever their stream, priority or graph, and in its idle time behind the one-block spin. Their kernels, on
streams of their own at default priority, wait for SMs behind the work queued before them; a training step
queued whole, as a CUDA graph, is such work, and the device idles while the decode that follows it runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from mlgcn_dist.arguments import positive_float, positive_int
from mlgcn_dist.data.toy import make_toy
from mlgcn_dist.data.transforms import GpuAugment

CYCLES_PER_MS = 1.98e6  # torch.cuda._sleep spins for cycles: an H100's 1.98 GHz boost clock

# A decoder under test: JPEG byte tensors -> (host ms until the call returned, host ms until its images were
# ready on the device).
Decode = Callable[[list[torch.Tensor]], tuple[float, float]]


def toy_jpegs(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` make-toy JPEGs of up to ``size`` px, as the uint8 byte tensors the decoder takes."""
    with tempfile.TemporaryDirectory() as tmp:
        make_toy(tmp, train=count, val=4, size=size, seed=seed)
        files = sorted((Path(tmp) / "train2014").glob("*.jpg"))
        return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def torchvision_decoder(device: torch.device, pinned: bool) -> Decode:
    """torchvision's batched call: it returns once its own stream has finished, so ready = returned."""

    def decode(jpegs: list[torch.Tensor]) -> tuple[float, float]:
        if pinned:
            jpegs = [j.pin_memory() for j in jpegs]
        t0 = time.perf_counter()
        decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        ms = 1000 * (time.perf_counter() - t0)
        return ms, ms

    return decode


def nvimgcodec_decoder(device: torch.device) -> Decode:
    """nvImageCodec's batched decode (hardware engine first, then CUDA), ordered on a stream of our own; ready
    is when an event recorded on that stream after the call completes (polled, so the host never blocks)."""
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder(
        device_id=device.index or 0,
        backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY),
                  nvimgcodec.Backend(nvimgcodec.BackendKind.GPU_ONLY)],
    )
    params = nvimgcodec.DecodeParams(sample_format=nvimgcodec.SampleFormat.P_RGB)
    stream = torch.cuda.Stream(device, priority=-1)

    def decode(jpegs: list[torch.Tensor]) -> tuple[float, float]:
        sources = [nvimgcodec.CodeStream(j.numpy()) for j in jpegs]
        t0 = time.perf_counter()
        images = decoder.decode(sources, params=params, cuda_stream=stream.cuda_stream)
        returned = 1000 * (time.perf_counter() - t0)
        done = torch.cuda.Event()
        done.record(stream)
        while not done.query():
            pass
        if any(image is None for image in images):
            raise RuntimeError("nvImageCodec could not decode every image")
        return returned, 1000 * (time.perf_counter() - t0)

    return decode


def _max_abs_diff_to_torchvision(device: torch.device, jpegs: list[torch.Tensor]) -> float:
    """Largest mean absolute difference per image between nvImageCodec's and torchvision's pixels."""
    from nvidia import nvimgcodec

    decoder = nvimgcodec.Decoder(device_id=device.index or 0)
    params = nvimgcodec.DecodeParams(sample_format=nvimgcodec.SampleFormat.P_RGB)
    ours = decoder.decode([nvimgcodec.CodeStream(j.numpy()) for j in jpegs], params=params)
    theirs = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    return max(
        (torch.from_numpy(np.asarray(a.cpu())).float() - b.cpu().float()).abs().mean().item()
        for a, b in zip(ours, theirs)
    )


def _queue_products(stream: torch.cuda.Stream, a: torch.Tensor, out: torch.Tensor, products: int) -> None:
    with torch.cuda.stream(stream):
        for _ in range(products):
            torch.mm(a, a, out=out)


def bench_decode(
    device: torch.device, decoders: dict[str, Decode], batch: int, size: int, busy_ms: float, repeats: int
) -> dict:
    """Every case of the module docstring for every decoder: median host ms until returned and until ready."""
    small = toy_jpegs(batch, size)
    jpegs = small * 4  # the same files again: decoding cost is per image, drawing more would only take longer
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    out = torch.empty_like(a)
    for decode in decoders.values():  # handles, buffers, the allocator's blocks
        for _ in range(3):
            decode(jpegs)
    _queue_products(torch.cuda.current_stream(device), a, out, 3)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    _queue_products(torch.cuda.current_stream(device), a, out, 20)
    torch.cuda.synchronize(device)
    product_ms = 1000 * (time.perf_counter() - t0) / 20
    products = max(1, round(busy_ms / product_ms))

    # The same products as one CUDA graph: how `compile_mode=reduce-overhead` queues a training step.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(products):
            torch.mm(a, a, out=out)

    spin_cycles = int(busy_ms * CYCLES_PER_MS)

    def queue(stream: torch.cuda.Stream, kind: str) -> torch.cuda.Event:
        with torch.cuda.stream(stream):
            if kind == "graph":
                graph.replay()
            elif kind == "spin":  # one thread block: the other SMs stay free
                torch.cuda._sleep(spin_cycles)
            else:
                _queue_products(stream, a, out, products)
            done = torch.cuda.Event()
            done.record()
        return done

    streams = {
        "default": torch.cuda.default_stream(device),
        "side": torch.cuda.Stream(device),
        "side_high_priority": torch.cuda.Stream(device, priority=-1),
    }
    busy = [(f"busy_{name}", stream, small, "products") for name, stream in streams.items()]
    busy += [("busy_side_4x", streams["side"], jpegs, "products"), ("busy_side_graph", streams["side"], small, "graph"),
             ("busy_side_one_sm_spin", streams["side"], small, "spin")]
    results: dict[str, dict[str, dict]] = {}
    for decoder_name, decode in decoders.items():
        cases = results[decoder_name] = {}
        for name, batch_jpegs in (("idle", small), ("idle_4x", jpegs)):
            runs = [decode(batch_jpegs) for _ in range(repeats)]
            cases[name] = {"return_ms": statistics.median(r[0] for r in runs),
                           "ready_ms": statistics.median(r[1] for r in runs)}
        for name, stream, batch_jpegs, kind in busy:
            runs, done = [], 0
            for _ in range(repeats):
                torch.cuda.synchronize(device)
                finished = queue(stream, kind)
                runs.append(decode(batch_jpegs))
                done += finished.query()
                torch.cuda.synchronize(device)
            cases[name] = {"return_ms": statistics.median(r[0] for r in runs),
                           "ready_ms": statistics.median(r[1] for r in runs),
                           "busy_done_when_ready": f"{done}/{repeats}"}
    return {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "batch": batch,
        "jpeg_kb_mean": sum(j.numel() for j in small) / len(small) / 1024,
        "busy_ms": products * product_ms,
        "product_ms": product_ms,
        "decoders": results,
    }


class AlwaysAntialiased(GpuAugment):
    """GpuAugment resizing every crop with antialiasing, as it did before it kept that for shrinking crops: the
    baseline that says, in the same run, what antialiasing enlarged crops cost."""

    def antialiases(self, h: int, w: int) -> bool:
        return True


def time_augment(device: torch.device, jpegs: list[torch.Tensor], size: int, repeats: int) -> dict:
    """``GpuAugment.apply`` (training crops, channels_last) on ``jpegs`` decoded, on the otherwise idle device,
    and the same with every crop antialiased: median device ms and host ms a call, and the batch's crop sizes.

    Device time is read between two events recorded around the call behind a 50 ms spin, so every kernel is
    queued before the first runs: the events then bracket the kernels alone, not the host's launch gaps.
    """
    shipped, before = GpuAugment(size, train=True), AlwaysAntialiased(size, train=True)
    images, _ = shipped.decode(jpegs, device)
    params = shipped.crops(images, random.Random(0))
    sizes = {(p.h, p.w) for p in params}
    result: dict = {"size": size, "crop_sizes": len(sizes),
                    "antialiased_crop_sizes": sum(shipped.antialiases(h, w) for h, w in sizes)}
    for name, augment in (("apply", shipped), ("always_antialiased", before)):
        for _ in range(3):  # constants, pinned buffers, lazily loaded kernels
            augment.apply(images, params, device, channels_last=True)
        device_ms, host_ms = [], []
        for _ in range(repeats):
            torch.cuda.synchronize(device)
            torch.cuda._sleep(int(50 * CYCLES_PER_MS))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            augment.apply(images, params, device, channels_last=True)
            host_ms.append(1000 * (time.perf_counter() - t0))
            end.record()
            end.synchronize()
            device_ms.append(start.elapsed_time(end))
        result[name] = {"device_ms": statistics.median(device_ms), "host_ms": statistics.median(host_ms)}
    return result


def format_decode_report(report: dict) -> str:
    lines = [
        f"GPU JPEG decode on {report['device']}: {report['batch']} JPEGs (x4 where marked) of "
        f"{report['jpeg_kb_mean']:.0f} KB; busy = {report['busy_ms']:.0f} ms of matrix products queued first",
        f"{'decoder':24s} {'case':24s} {'returned ms':>12s} {'ready ms':>9s}  busy work done when ready",
    ]
    for decoder, cases in report["decoders"].items():
        for name, case in cases.items():
            lines.append(f"{decoder:24s} {name:24s} {case['return_ms']:12.1f} {case['ready_ms']:9.1f}  "
                         f"{case.get('busy_done_when_ready', '')}")
    if "augment" in report:
        aug = report["augment"]
        lines.append(
            f"GpuAugment.apply at {aug['size']} px ({aug['crop_sizes']} crop sizes, {aug['antialiased_crop_sizes']} "
            f"antialiased): device {aug['apply']['device_ms']:.2f} ms, host {aug['apply']['host_ms']:.2f} ms; every "
            f"crop antialiased: device {aug['always_antialiased']['device_ms']:.2f} ms, host "
            f"{aug['always_antialiased']['host_ms']:.2f} ms; device time ratio "
            f"{aug['apply']['device_ms'] / aug['always_antialiased']['device_ms']:.2f}"
        )
    if "nvimgcodec_vs_torchvision" in report:
        lines.append(f"nvImageCodec vs torchvision pixels: largest mean |difference| per image "
                     f"{report['nvimgcodec_vs_torchvision']:.2f} grey levels")
    return "\n".join(lines)


def add_decode_arguments(parser: argparse.ArgumentParser) -> None:
    """``mlgcn bench decode``'s options."""
    parser.add_argument("--batch", type=positive_int, default=64, help="JPEGs per decode call")
    parser.add_argument(
        "--size", type=positive_int, default=640, help="long side of the toy JPEGs in px (~180 KB each at 640)"
    )
    parser.add_argument("--image-size", type=positive_int, default=448, help="GpuAugment's output size in px")
    parser.add_argument(
        "--busy-ms", type=positive_float, default=100.0, help="ms of device work queued before each busy decode"
    )
    parser.add_argument("--repeats", type=positive_int, default=7, help="calls per case (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write the report here")


def run_decode_bench(args: argparse.Namespace) -> dict | None:
    """Measure and print; the report, or None (with a message) without a CUDA device."""
    if not torch.cuda.is_available():
        print("mlgcn bench decode: measures GPU JPEG decoders and needs a CUDA device", file=sys.stderr)
        return None
    device = torch.device("cuda", torch.cuda.current_device())
    decoders = {
        "torchvision": torchvision_decoder(device, pinned=False),
        "torchvision_pinned": torchvision_decoder(device, pinned=True),
    }
    try:
        decoders["nvimgcodec"] = nvimgcodec_decoder(device)
    except (ImportError, RuntimeError) as err:  # optional: the torchvision rows are what training uses
        print(f"nvImageCodec not measured ({type(err).__name__}: {err}); pip install 'nvidia-nvimgcodec-cu13[nvjpeg]'")
    report = bench_decode(device, decoders, args.batch, args.size, args.busy_ms, args.repeats)
    report["augment"] = time_augment(device, toy_jpegs(args.batch, args.size), args.image_size, args.repeats)
    if "nvimgcodec" in decoders:
        report["nvimgcodec_vs_torchvision"] = _max_abs_diff_to_torchvision(device, toy_jpegs(8, args.size, seed=1))
    print(format_decode_report(report), flush=True)
    return report
