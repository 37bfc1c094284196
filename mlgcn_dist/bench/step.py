"""One training step as the engine takes it, under a :class:`Setting` (numerics, memory layout, compilation),
and what it costs: the model's FLOPs per image and the device's peak for the setting's numerics."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlgcn_dist.config import Config
from mlgcn_dist.distributed import concrete_precision, uses_cuda_graphs
from mlgcn_dist.losses import build_loss
from mlgcn_dist.optim import build_optimizer

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's datasheets, looked up by the first key contained in
# torch.cuda.get_device_name ("H100 PCIe", "H100 NVL" and "H200 NVL" before "H100" and "H200", whose numbers are the
# SXM parts'; NVL: per GPU). fp32: CUDA cores.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
}
# FlopCounterMode counts a forward; the backward costs about twice as much (input and weight gradients; the first
# convolution's input gradient, ~0.5% of ResNet-101's training FLOPs, is never computed, so MFU reads that much high).
TRAIN_FLOPS_PER_FORWARD = 3
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Setting:
    """How a training step runs: numerics, memory layout, compilation."""

    precision: str  # fp32 | bf16 | fp16 (autocast; fp16 with a GradScaler)
    channels_last: bool
    compile: bool
    tf32: bool  # fp32 matmuls and convolutions on TF32 tensor cores (CUDA)
    cudnn_benchmark: bool
    compile_mode: str = "default"  # torch.compile mode (reduce-overhead: CUDA graphs)

    @property
    def numerics(self) -> str:
        """The key of PEAK_TFLOPS this setting runs at."""
        return "tf32" if self.precision == "fp32" and self.tf32 else self.precision


# The original code trained in fp32 on GPUs without TF32, NCHW, eagerly, with cudnn.benchmark on.
ORIGINAL_MLGCN = Setting("fp32", channels_last=False, compile=False, tf32=False, cudnn_benchmark=True)


def run_setting(cfg: Config, device: torch.device) -> Setting:
    """The configured setting on ``device`` (``train.precision=auto`` resolved as the engine resolves it); TF32
    and cuDNN autotuning as the engine enables them (unless deterministic)."""
    fast = not cfg.train.deterministic
    return Setting(
        concrete_precision(cfg.train.precision, torch.device(device).type),
        cfg.train.channels_last,
        cfg.train.compile,
        tf32=fast and torch.device(device).type == "cuda",  # TF32 is a CUDA tensor-core format
        cudnn_benchmark=fast,
        compile_mode=cfg.train.compile_mode,
    )


def peak_tflops(device_name: str, numerics: str) -> float | None:
    """Dense peak TFLOP/s of a known GPU at ``numerics`` (bf16, fp16, tf32, fp32); None if unknown or CPU."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks[numerics]
    return None


@contextmanager
def cuda_numerics(setting: Setting) -> Iterator[None]:
    """TF32 and cuDNN autotuning as ``setting`` says, restored afterwards (these flags are process-global)."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = setting.tf32
    torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.benchmark,
        ) = saved


class TrainStep:
    """One optimiser step as the engine takes it: autocast forward, fp32 loss, backward, clipping, SGD."""

    def __init__(self, model: torch.nn.Module, cfg: Config, setting: Setting, device: torch.device) -> None:
        memory_format = torch.channels_last if setting.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format).train()
        self.forward = torch.compile(self.model, mode=setting.compile_mode) if setting.compile else self.model
        self.cuda_graphs = uses_cuda_graphs(setting.compile, setting.compile_mode)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.optim.lr, fp16=setting.precision == "fp16")
        self.criterion = build_loss(cfg.optim)
        self.clip_grad = cfg.optim.clip_grad
        self.setting = setting
        self.device = device
        self.scaler = self._new_scaler()
        # The pre-clip gradient norm of the last step (a device tensor: reading it would wait for the device).
        self.grad_norm: torch.Tensor | None = None
        # On the host: a copy on the device would count in every phase's peak memory.
        self._initial = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def eager_loss(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        """The loss of the uncompiled model on one batch, without a step (BatchNorm statistics do move: restart
        after it)."""
        with torch.no_grad(), self._autocast():
            logits = self.model(images)
        return float(self.criterion(logits.float(), targets))

    def _autocast(self) -> torch.autocast:
        dtype = _AUTOCAST_DTYPES.get(self.setting.precision)
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None)

    def _new_scaler(self) -> torch.amp.GradScaler:
        """fp16 loss scaling from its initial scale; a no-op for the other precisions."""
        return torch.amp.GradScaler(self.device.type, enabled=self.setting.precision == "fp16")

    def restart(self) -> None:
        """Back to the initial weights, buffers and empty optimiser state, in place.

        Every phase starts from the same model: the phases are then comparable steps of one training run's
        start, and a divergence in one phase does not carry into the next. In place, so a compiled model (and
        its CUDA graphs, which read the parameters where they are) stays valid.
        """
        with torch.no_grad():
            for key, value in self.model.state_dict().items():
                value.copy_(self._initial[key])
        self.optimizer.state.clear()  # SGD makes its momentum buffers again at the next step
        self.scaler = self._new_scaler()
        self.grad_norm = None

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cuda_graphs:  # as the engine: the previous replay's outputs are no longer needed
            torch.compiler.cudagraph_mark_step_begin()
        with self._autocast():
            logits = self.forward(images)
        loss = self.criterion(logits.float(), targets)
        self.scaler.scale(loss).backward()
        if self.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def forward_flops_per_image(
    model: torch.nn.Module, image_size: int, device: torch.device, batch_size: int = 1
) -> float:
    """FLOPs of one image's forward in a batch of ``batch_size``: convolutions and matmuls, 2 per multiply-add (as
    FlopCounterMode). The GCN head computes its label classifiers once per batch: counted at batches of 1 and 2,
    that per-batch part is shared by the batch's images instead of charged to each."""
    was_training = model.training
    model.eval()  # no BatchNorm statistics update from this probe

    def flops(batch: int) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(batch, 3, image_size, image_size, device=device))
        return counter.get_total_flops()

    one, two = flops(1), flops(2)
    model.train(was_training)
    per_image = two - one
    return per_image + (one - per_image) / batch_size
