"""Small CIFAR-style feature extractors for fast CPU experiments and tests.

Every net maps [B, 3, H, W] to a feature map [B, out_channels, h, w] for any H, W >= 1 (no fixed-size
pooling) and exposes ``out_channels``; the global max pooling and the classifier belong to the model.
Unlike ImageNet nets they keep full resolution in the stem (3x3 conv, stride 1, no max pool), as is usual for
32 px inputs; ``cifar_resnet_tiny`` halves the resolution in its stem so it trains at CPU speed at 64 px.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_bn_relu(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation ResNet)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016, "Identity mappings"): BN-ReLU before each conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        # The projection shortcut reads the pre-activated input, the identity shortcut the raw one.
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


class CifarResNet(nn.Module):
    """ResNet with four stages of widths (w, 2w, 4w, 8w); stages 2-4 halve the resolution."""

    def __init__(
        self, block: type[nn.Module], blocks_per_stage: list[int], width: int = 64, stem_stride: int = 1
    ) -> None:
        super().__init__()
        preact = block is PreActBlock
        # A pre-activation net's stem is a bare convolution: the first block normalises and activates it.
        self.stem = (
            nn.Conv2d(3, width, 3, stride=stem_stride, padding=1, bias=False)
            if preact
            else conv_bn_relu(3, width, stride=stem_stride)
        )
        stages, in_ch = [], width
        for index, count in enumerate(blocks_per_stage):
            out_ch = width * 2**index
            for repeat in range(count):
                stride = 2 if index > 0 and repeat == 0 else 1
                stages.append(block(in_ch, out_ch, stride))
                in_ch = out_ch
        self.stages = nn.Sequential(*stages)
        # Pre-activation nets end un-normalised; the final BN-ReLU gives the pooled features a sane scale.
        self.final = nn.Sequential(nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.final(self.stages(self.stem(x)))


class DenseLayer(nn.Module):
    """DenseNet-BC bottleneck: BN-ReLU-1x1 (4k) then BN-ReLU-3x3 (k); the output is appended to the input."""

    def __init__(self, in_ch: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def transition(in_ch: int, out_ch: int) -> nn.Sequential:
    """DenseNet-BC transition: compress the channels with a 1x1 convolution, halve the resolution."""
    return nn.Sequential(
        nn.BatchNorm2d(in_ch),
        nn.ReLU(inplace=True),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.AvgPool2d(2, ceil_mode=True),
    )


class CifarDenseNet(nn.Module):
    """Small DenseNet-BC (Huang et al. 2017): growth rate k, compression 0.5 in the transitions."""

    def __init__(self, layers_per_block: tuple[int, ...] = (6, 12, 24, 16), growth: int = 12) -> None:
        super().__init__()
        channels = 2 * growth
        body: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
        for index, count in enumerate(layers_per_block):
            for _ in range(count):
                body.append(DenseLayer(channels, growth))
                channels += growth
            if index < len(layers_per_block) - 1:
                body.append(transition(channels, channels // 2))
                channels //= 2
        body += [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*body)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Inception(nn.Module):
    """Inception-v1 block: 1x1, 1x1->3x3, 1x1->3x3->3x3 (factorised 5x5), pool->1x1; concatenated."""

    def __init__(
        self, in_ch: int, n1: int, n3_reduce: int, n3: int, n5_reduce: int, n5: int, pool_proj: int
    ) -> None:
        super().__init__()
        self.branch1 = conv_bn_relu(in_ch, n1, kernel=1)
        self.branch3 = nn.Sequential(conv_bn_relu(in_ch, n3_reduce, kernel=1), conv_bn_relu(n3_reduce, n3))
        self.branch5 = nn.Sequential(
            conv_bn_relu(in_ch, n5_reduce, kernel=1), conv_bn_relu(n5_reduce, n5), conv_bn_relu(n5, n5)
        )
        self.branch_pool = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_ch, pool_proj, kernel=1)
        )
        self.out_channels = n1 + n3 + n5 + pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], dim=1)


# GoogLeNet's inception stages 3, 4 and 5 at half the original widths; None marks a stride-2 max pool.
_HALF_GOOGLENET = (
    (32, 48, 64, 8, 16, 16),
    (64, 64, 96, 16, 48, 32),
    None,
    (96, 48, 104, 8, 24, 32),
    (80, 56, 112, 12, 32, 32),
    (64, 64, 128, 12, 32, 32),
    None,
    (128, 80, 160, 16, 64, 64),
    (192, 96, 192, 24, 64, 64),
)


class CifarGoogLeNet(nn.Module):
    """GoogLeNet-style net of Inception blocks for small images (3x3 stem at full resolution)."""

    def __init__(self, stem_width: int = 96) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn_relu(3, stem_width)]
        channels = stem_width
        for widths in _HALF_GOOGLENET:
            if widths is None:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
                continue
            block = Inception(channels, *widths)
            layers.append(block)
            channels = block.out_channels
        self.body = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def cifar_resnet18() -> CifarResNet:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], width=64)


def cifar_preact_resnet18() -> CifarResNet:
    return CifarResNet(PreActBlock, [2, 2, 2, 2], width=64)


def cifar_resnet_tiny() -> CifarResNet:
    return CifarResNet(BasicBlock, [1, 1, 1, 1], width=16, stem_stride=2)


def cifar_densenet() -> CifarDenseNet:
    return CifarDenseNet()


def cifar_googlenet() -> CifarGoogLeNet:
    return CifarGoogLeNet()


class PlainConvNet(nn.Module):
    """Conv + ReLU stages without any normalisation layer.

    BatchNorm makes a sample's output depend on the other samples of its device's batch, so a DDP run and a
    single-process run with the same global batch legitimately differ. Without it, they must agree to float
    tolerance: the distributed tests use this net to prove gradient averaging exact.
    """

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for width in widths:
            layers += [nn.Conv2d(in_ch, width, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_ch = width
        self.body = nn.Sequential(*layers)
        self.out_channels = in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def cifar_plainnet() -> PlainConvNet:
    return PlainConvNet()
