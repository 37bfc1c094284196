"""Backbone registry: a name maps to a constructor of a feature extractor [B, 3, H, W] -> [B, F, h, w].

``build_backbone("resnet101", pretrained="imagenet")`` returns ``(module, F)``. Torchvision nets are cut
before their pooling and classifier; ResNets become
``nn.Sequential(conv1, bn1, relu, maxpool, layer1..layer4)``, so indices 0..7 match the original ML-GCN's
``features`` (see convert.py). ``pretrained`` is "none" (random init), "imagenet" (torchvision's weights,
fetched or read from the torch hub cache) or a path to a .pth file.
Inputs of any size work (torchvision's GoogLeNet needs at least 15 px).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from mlgcn_dist.config import ConfigError
from mlgcn_dist.models import cifar
from mlgcn_dist.models.convert import clean_state_dict, first_lines, load_fitting

BackboneFactory = Callable[[str], tuple[nn.Module, int]]

_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Register ``factory(pretrained) -> (feature extractor, feature width)`` under ``name``."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, pretrained: str = "none") -> tuple[nn.Module, int]:
    """The feature extractor registered as ``name`` and its output width F."""
    if name not in _REGISTRY:
        raise ConfigError(
            f"model.backbone: unknown backbone '{name}'; expected one of {', '.join(list_backbones())}"
        )
    return _REGISTRY[name](pretrained)


# ----------------------------------------------------------------------------------------------------------
# torchvision ImageNet nets


class ImageNetToGoogLeNetInput(nn.Module):
    """torchvision's GoogLeNet ``transform_input``: its weights (ported from TensorFlow) expect inputs scaled
    to [-1, 1], while our loaders normalise with ImageNet mean/std. Kept whatever ``pretrained`` is, so that
    a model built without weights behaves like one trained from them once a checkpoint is loaded into it."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        # x_tf = (x * std + mean - 0.5) / 0.5 = x * scale + shift, per channel.
        self.register_buffer("scale", (std / 0.5).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean - 0.5) / 0.5).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _resnet_features(net: nn.Module) -> nn.Module:
    return nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )


def _densenet_features(net: nn.Module) -> nn.Module:
    # Transitions pool 2x2 without padding, which fails once a map is 1 px (inputs under 32 px); rounding up
    # accepts any size and changes nothing for sizes divisible by 32 (224, 448).
    for module in net.features.modules():
        if isinstance(module, nn.AvgPool2d):
            module.ceil_mode = True
    # torchvision applies a ReLU after norm5 in forward(), outside ``features``.
    return nn.Sequential(net.features, nn.ReLU(inplace=True))


def _googlenet_features(net: nn.Module) -> nn.Module:
    names = (
        "conv1 maxpool1 conv2 conv3 maxpool2 inception3a inception3b maxpool3 inception4a inception4b "
        "inception4c inception4d inception4e maxpool4 inception5a inception5b"
    ).split()
    return nn.Sequential(ImageNetToGoogLeNetInput(), *(getattr(net, name) for name in names))


@dataclass(frozen=True)
class TorchvisionSpec:
    weights: str  # torchvision weights enum member, e.g. "ResNet101_Weights.IMAGENET1K_V1"
    cut: Callable[[nn.Module], nn.Module]  # full net -> feature extractor
    classifier: str  # attribute of the final Linear (its in_features is the feature width)
    discarded: tuple[str, ...]  # state-dict prefixes of the parts we cut away (classifier, auxiliary heads)


def _resnet(weights: str) -> TorchvisionSpec:
    return TorchvisionSpec(weights, _resnet_features, "fc", ("fc.",))


_TORCHVISION: dict[str, TorchvisionSpec] = {
    "resnet18": _resnet("ResNet18_Weights.IMAGENET1K_V1"),
    "resnet34": _resnet("ResNet34_Weights.IMAGENET1K_V1"),
    "resnet50": _resnet("ResNet50_Weights.IMAGENET1K_V1"),
    # V1 weights: the ones the original ML-GCN started from (torchvision's first ResNet-101 release).
    "resnet101": _resnet("ResNet101_Weights.IMAGENET1K_V1"),
    "resnet152": _resnet("ResNet152_Weights.IMAGENET1K_V1"),
    "densenet121": TorchvisionSpec(
        "DenseNet121_Weights.IMAGENET1K_V1", _densenet_features, "classifier", ("classifier.",)
    ),
    "googlenet": TorchvisionSpec(
        "GoogLeNet_Weights.IMAGENET1K_V1", _googlenet_features, "fc", ("fc.", "aux1.", "aux2.")
    ),
}

# Checkpoints from torchvision's download URLs name DenseNet layers "norm.1" etc. (from before module names
# with dots were disallowed); current modules call them "norm1". torchvision renames them the same way.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
    r"([12]\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _rename_old_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_OLD_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def _imagenet_state_dict(name: str, spec: TorchvisionSpec) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_weight(spec.weights)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    # URLError is an OSError; a truncated or corrupt download raises a RuntimeError.
    except (OSError, RuntimeError) as err:
        raise RuntimeError(
            f"model.pretrained=imagenet: could not fetch the ImageNet weights of {name} ({spec.weights}) "
            f"from {weights.url}: {err}. Without internet access, download that file elsewhere and pass "
            f"model.pretrained=/path/to/file.pth (or copy it into {torch.hub.get_dir()}/checkpoints/)."
        ) from err


def _file_state_dict(path: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"model.pretrained: weights file '{path}' not found "
            "(expected none, imagenet or the path to a .pth file)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises pickle, zip and type errors alike for unreadable files
        raise ConfigError(f"model.pretrained: cannot read '{path}' as a PyTorch state dict: "
                          f"{first_lines(err)}") from err
    try:
        return clean_state_dict(obj, path)
    except ValueError as err:
        raise ConfigError(f"model.pretrained: {err}") from err


def _load_classifier_weights(
    net: nn.Module, state: dict[str, torch.Tensor], spec: TorchvisionSpec, source: str
) -> None:
    """Load ``state`` into the full torchvision ``net``; the parts we cut away need not be there or match."""
    kept = {k: v for k, v in _rename_old_densenet_keys(state).items() if not k.startswith(spec.discarded)}
    load_fitting(net, kept, f"model.pretrained={source}: not a state dict of this torchvision net",
                 ignored=lambda key: key.startswith(spec.discarded))


def _torchvision_backbone(name: str, pretrained: str) -> tuple[nn.Module, int]:
    spec = _TORCHVISION[name]
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    net = torchvision.models.get_model(name, weights=None, **extra)
    if pretrained == "imagenet":
        _load_classifier_weights(net, _imagenet_state_dict(name, spec), spec, spec.weights)
    elif pretrained != "none":
        _load_classifier_weights(net, _file_state_dict(pretrained), spec, pretrained)
    return spec.cut(net), getattr(net, spec.classifier).in_features


def _register_torchvision(name: str) -> None:
    register_backbone(name)(lambda pretrained: _torchvision_backbone(name, pretrained))


# ----------------------------------------------------------------------------------------------------------
# small CIFAR-style nets (no published weights: "none" or a state dict of the feature extractor itself)


def _register_cifar(name: str, constructor: Callable[[], nn.Module]) -> None:
    def factory(pretrained: str) -> tuple[nn.Module, int]:
        net = constructor()
        if pretrained == "imagenet":
            raise ConfigError(
                f"model.pretrained=imagenet: backbone '{name}' has no ImageNet weights; use none or a path"
            )
        if pretrained != "none":
            load_fitting(net, _file_state_dict(pretrained),
                         f"model.pretrained={pretrained}: not a state dict of backbone '{name}'")
        return net, net.out_channels

    register_backbone(name)(factory)


def _register_builtin_backbones() -> None:
    for name in _TORCHVISION:
        _register_torchvision(name)
    _register_cifar("cifar_resnet18", cifar.cifar_resnet18)
    _register_cifar("cifar_preact_resnet18", cifar.cifar_preact_resnet18)
    _register_cifar("cifar_resnet_tiny", cifar.cifar_resnet_tiny)
    _register_cifar("cifar_densenet", cifar.cifar_densenet)
    _register_cifar("cifar_googlenet", cifar.cifar_googlenet)
    _register_cifar("cifar_plainnet", cifar.cifar_plainnet)


_register_builtin_backbones()
