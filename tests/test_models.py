"""Backbone registry, heads, global max pooling, pretrained loading and ML-GCN checkpoint import."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from conftest import TorchCalls
from torch import nn

from mlgcn_dist.config import ConfigError, ModelConfig
from mlgcn_dist.models import (
    GlobalMaxPool,
    MultiLabelModel,
    build_backbone,
    build_model,
    list_backbones,
    list_heads,
    register_backbone,
)
from mlgcn_dist.models.cifar import PreActBlock
from mlgcn_dist.models.convert import clean_state_dict, import_mlgcn_state_dict
from mlgcn_dist.models.gcn import GCNHead, GraphConvolution
from mlgcn_dist.models.hgat import FullyConnectedMixing, GraphAttention, GroupResidualBlocks, HGATHead

NUM_CLASSES = 7
# Interleaved on purpose: labels of one group are not contiguous.
GROUPS = [0, 1, 0, 2, 1, 2, 0]


def small_cfg(head: str, backbone: str = "cifar_resnet_tiny") -> ModelConfig:
    return ModelConfig(head=head, backbone=backbone, gcn_hidden=16, hgat_reduce=16, hgat_heads_dim=8)


def graph_inputs() -> dict:
    rng = np.random.default_rng(0)
    adj = rng.random((NUM_CLASSES, NUM_CLASSES)).astype(np.float32)
    return {"adj": adj / adj.sum(1, keepdims=True), "embeddings": rng.standard_normal((NUM_CLASSES, 10))}


def build(head: str, backbone: str = "cifar_resnet_tiny") -> MultiLabelModel:
    torch.manual_seed(0)
    return build_model(small_cfg(head, backbone), NUM_CLASSES, **graph_inputs(), groups=GROUPS)


# --------------------------------------------------------------------------------------------- backbones


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_builds_and_outputs_its_feature_width(name):
    backbone, width = build_backbone(name, pretrained="none")
    with torch.no_grad():
        features = backbone.eval()(torch.randn(2, 3, 16, 16))
    assert features.ndim == 4 and features.shape[:2] == (2, width)


def test_resnet_backbone_keeps_the_original_mlgcn_feature_indices():
    backbone, width = build_backbone("resnet18")
    kinds = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d] + [nn.Sequential] * 4
    assert width == 512 and [type(m) for m in backbone] == kinds
    assert "0.weight" in backbone.state_dict() and "7.1.conv2.weight" in backbone.state_dict()


def test_unknown_backbone_lists_the_registered_names():
    with pytest.raises(ValueError, match="resnet101"):
        build_backbone("resnet1001")


def test_a_backbone_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="backbone 'resnet18' is already registered"):
        register_backbone("resnet18")(lambda pretrained: (nn.Identity(), 1))
    assert build_backbone("resnet18")[1] == 512  # still torchvision's


CIFAR_BACKBONES = [name for name in list_backbones() if name.startswith("cifar_")]
# Feature map side for a 32 px input: the stem keeps full resolution (the tiny net's halves it), then ResNets
# halve it in stages 2-4, DenseNet in its 3 transitions, the GoogLeNet in its 2 pools, the plain net 3 times.
CIFAR_FEATURE_SIDE = {"cifar_resnet18": 4, "cifar_preact_resnet18": 4, "cifar_resnet_tiny": 2,
                      "cifar_densenet": 4, "cifar_googlenet": 8, "cifar_plainnet": 4}


@pytest.mark.parametrize("name", CIFAR_BACKBONES)
def test_cifar_backbones_downsample_as_documented_down_to_one_pixel_and_end_with_a_relu(name):
    backbone, width = build_backbone(name)
    with torch.no_grad():
        features = backbone.eval()(torch.randn(2, 3, 32, 32))
        assert backbone(torch.randn(1, 3, 1, 1)).shape == (1, width, 1, 1)
    side = CIFAR_FEATURE_SIDE[name]
    assert features.shape == (2, width, side, side)
    assert features.min() >= 0  # the pre-activation net through its final BN-ReLU


@pytest.mark.parametrize(("in_ch", "out_ch", "stride"), [(8, 8, 1), (8, 16, 2)])
def test_preact_block_adds_its_branch_to_the_input_or_to_the_projection_of_the_pre_activated_input(
        in_ch, out_ch, stride):
    torch.manual_seed(0)
    block = PreActBlock(in_ch, out_ch, stride).eval()
    x = torch.randn(2, in_ch, 6, 6)
    with torch.no_grad():
        block.conv2.weight.zero_()  # the branch adds nothing: the output is the shortcut alone
        skip = x if block.shortcut is None else block.shortcut(torch.relu(block.bn1(x)))
        torch.testing.assert_close(block(x), skip)


def test_the_plain_net_computes_each_image_alone_even_in_training_mode():
    """No normalisation layer: the distributed tests rely on it to compare DDP with one process exactly."""
    backbone, _ = build_backbone("cifar_plainnet")
    images = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(backbone.train()(images)[:1], backbone(images[:1]))


def save_torchvision_weights(net: nn.Module, path, rename=lambda key: key) -> dict:
    """Save ``net``'s weights the way training scripts often do: nested and with DataParallel prefixes."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": {"module." + rename(k): v for k, v in state.items()}}, path)
    return state


def test_pretrained_path_loads_a_torchvision_state_dict_into_the_backbone(tmp_path):
    torch.manual_seed(1)
    saved = save_torchvision_weights(torchvision.models.resnet18(), tmp_path / "r18.pth")
    torch.manual_seed(2)
    backbone, _ = build_backbone("resnet18", pretrained=str(tmp_path / "r18.pth"))
    random_init, _ = build_backbone("resnet18")
    assert torch.equal(backbone[0].weight, saved["conv1.weight"])
    assert torch.equal(backbone[7][1].bn2.running_var, saved["layer4.1.bn2.running_var"])
    assert not torch.equal(random_init[0].weight, saved["conv1.weight"])


def test_pretrained_path_accepts_densenet_keys_from_torchvision_download_urls(tmp_path):
    def old_style(key: str) -> str:  # "denselayer1.norm1.weight" was "denselayer1.norm.1.weight"
        for part in ("norm", "relu", "conv"):
            key = key.replace(f".{part}1.", f".{part}.1.").replace(f".{part}2.", f".{part}.2.")
        return key

    saved = save_torchvision_weights(torchvision.models.densenet121(), tmp_path / "d121.pth", old_style)
    backbone, width = build_backbone("densenet121", pretrained=str(tmp_path / "d121.pth"))
    loaded = backbone[0].denseblock1.denselayer1.norm1.running_mean
    assert width == 1024 and torch.equal(loaded, saved["features.denseblock1.denselayer1.norm1.running_mean"])


@pytest.mark.parametrize("name", ["resnet18", "densenet121", "googlenet"])
def test_a_torchvision_backbone_average_pooled_gives_the_features_its_net_classifies(tmp_path, name):
    """The cut keeps all the net computes before its average pooling: GoogLeNet's input transform (its
    ImageNet weights expect it), DenseNet's ReLU after ``features``, every pooling layer."""
    torch.manual_seed(0)
    googlenet = {"aux_logits": False, "transform_input": True, "init_weights": True}
    extra = googlenet if name == "googlenet" else {}
    net = torchvision.models.get_model(name, weights=None, **extra).eval()
    save_torchvision_weights(net, tmp_path / "net.pth")
    backbone, _ = build_backbone(name, pretrained=str(tmp_path / "net.pth"))
    classified = []
    classifier = net.classifier if name == "densenet121" else net.fc
    classifier.register_forward_pre_hook(lambda module, args: classified.append(args[0]))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        net(images)
        pooled = backbone.eval()(images).mean(dim=(2, 3))
    scale = classified[0].abs().max()  # GoogLeNet's initialisation leaves features of about 1e-12
    torch.testing.assert_close(pooled / scale, classified[0] / scale)


def test_pretrained_path_takes_the_backbone_of_a_net_fine_tuned_for_other_labels(tmp_path):
    saved = save_torchvision_weights(torchvision.models.resnet18(num_classes=20), tmp_path / "r18_voc.pth")
    backbone, _ = build_backbone("resnet18", pretrained=str(tmp_path / "r18_voc.pth"))
    assert torch.equal(backbone[0].weight, saved["conv1.weight"])


def test_pretrained_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("resnet18", pretrained=str(missing))


def test_pretrained_path_of_another_architecture_is_rejected(tmp_path):
    save_torchvision_weights(torchvision.models.resnet18(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="r18.pth"):
        build_backbone("resnet50", pretrained=str(tmp_path / "r18.pth"))


@pytest.mark.parametrize(("name", "weights"), [
    ("resnet18", "ResNet18_Weights.IMAGENET1K_V1"),
    ("resnet101", "ResNet101_Weights.IMAGENET1K_V1"),  # the weights the original ML-GCN started from
])
def test_pretrained_imagenet_without_network_explains_how_to_pass_a_file(tmp_path, monkeypatch, name,
                                                                          weights):
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache: the weights must be fetched
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(RuntimeError, match=rf"{weights}.*download.*model\.pretrained=/path/to/file\.pth"):
        build_backbone(name, pretrained="imagenet")


def tiny_weights() -> dict[str, torch.Tensor]:
    return build_backbone("cifar_resnet_tiny")[0].state_dict()


@pytest.mark.parametrize(("write", "message"), [
    (lambda path: path.write_bytes(b"not a checkpoint"), "cannot read .* as a PyTorch state dict"),
    # Loading it whole would run whatever the pickle names: only tensors and plain containers are read.
    (lambda path: torch.save({"state_dict": tiny_weights(), "origin": pathlib.Path("x")}, path),
     "cannot read .* as a PyTorch state dict"),
    (lambda path: torch.save([1, 2], path), r"tiny\.pth: expected a state dict"),
    (lambda path: torch.save({k: v for k, v in tiny_weights().items() if k != "stem.0.weight"}, path),
     r"missing keys \['stem\.0\.weight'\] \(1 in all\)"),
    (lambda path: torch.save({**tiny_weights(), "extra.weight": torch.zeros(1)}, path),
     r"unexpected keys \['extra\.weight'\] \(1 in all\)"),
], ids=["junk", "pickled-object", "list", "missing-key", "unexpected-key"])
def test_a_pretrained_file_that_is_not_exactly_the_backbones_weights_is_a_config_error(tmp_path, write,
                                                                                       message):
    write(tmp_path / "tiny.pth")
    with pytest.raises(ConfigError, match=rf"^model\.pretrained.*{message}"):
        build_backbone("cifar_resnet_tiny", pretrained=str(tmp_path / "tiny.pth"))


@pytest.mark.parametrize("wrap", [
    lambda weights: {"model": weights, "optimizer": {"state": {}}, "epoch": 3},  # torchvision's references
    lambda weights: {"state_dict": {"model": {"module." + k: v for k, v in weights.items()}}},  # nested twice
], ids=["model", "nested"])
def test_clean_state_dict_unwraps_the_usual_checkpoint_containers(wrap):
    weights = {"conv.weight": torch.ones(1), "conv.bias": torch.zeros(1)}
    assert clean_state_dict(wrap(weights), "ckpt.pth") == weights
    with pytest.raises(ValueError, match=r"ckpt\.pth: expected a state dict .* got dict"):
        clean_state_dict({"epoch": 3, "arch": "resnet18"}, "ckpt.pth")


def test_cifar_backbone_loads_its_own_state_dict_from_a_path(tmp_path):
    torch.manual_seed(3)
    source, _ = build_backbone("cifar_resnet_tiny")
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    loaded, _ = build_backbone("cifar_resnet_tiny", pretrained=str(tmp_path / "tiny.pth"))
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="no ImageNet weights"):
        build_backbone("cifar_resnet_tiny", pretrained="imagenet")


# --------------------------------------------------------------------------------------------- pooling, heads


@pytest.mark.parametrize("size", [(1, 1), (3, 7), (14, 14)])
def test_global_max_pool_takes_the_spatial_maximum_at_any_size(size):
    x = torch.randn(2, 5, *size)
    assert torch.equal(GlobalMaxPool()(x), x.flatten(2).max(dim=2).values)


def test_global_max_pool_sends_the_gradient_to_the_element_maxpool2d_picks():
    x = torch.randn(2, 5, 14, 14, requires_grad=True)
    reference = x.detach().clone().requires_grad_()
    weights = torch.randn(2, 5)
    (GlobalMaxPool()(x) * weights).sum().backward()
    (nn.MaxPool2d(14, 14)(reference).flatten(1) * weights).sum().backward()
    assert torch.equal(x.grad, reference.grad)


def _two_path_pooling(x, w1, w2, w3):
    """A feature map that reaches the output directly and through its pooled maximum: the pattern under which
    torch.compile's backward of ``amax`` in bf16 loses the maximum (pytorch/pytorch #186799)."""
    feat = torch.einsum("bchw,cd->bdhw", x, w1)
    feat = feat + torch.einsum("bchw,cd->bdhw", feat, w2)
    return feat + (GlobalMaxPool()(feat) @ w3)[:, :, None, None]


def test_global_max_pool_gradients_compiled_in_bf16_are_finite_and_match_eager():
    # With torch.amax this gives NaN gradients for x, w1 and w2 (checked on torch 2.14 CPU inductor).
    torch.manual_seed(0)
    inputs = [torch.randn(2, 4, 5, 3, dtype=torch.bfloat16, requires_grad=True)]
    inputs += [torch.randn(4, 4, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    eager = torch.autograd.grad(_two_path_pooling(*inputs).float().sum(), inputs)
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(_two_path_pooling)(*inputs).float().sum(), inputs)
    for e, c in zip(eager, compiled):
        assert torch.isfinite(c).all()
        torch.testing.assert_close(c.float(), e.float(), rtol=2e-2, atol=2e-2)  # bf16 rounding may differ


@pytest.mark.parametrize("size", [(17, 17), (32, 32), (60, 100)])
def test_model_accepts_any_input_size(size):
    model = build("gcn").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("head", list_heads())
def test_every_head_gives_one_logit_per_label_and_trains_every_parameter(head):
    model = build(head)
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, NUM_CLASSES) and model.num_classes == NUM_CLASSES
    logits.square().sum().backward()
    # DDP fails on a parameter that gets no gradient.
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    split = {id(p) for p in model.backbone.parameters()} | {id(p) for p in model.head.parameters()}
    assert split == {id(p) for p in model.parameters()}


def test_build_model_loads_the_pretrained_weights_the_config_names(tmp_path):
    torch.manual_seed(3)
    source, _ = build_backbone("cifar_resnet_tiny")
    torch.save(source.state_dict(), tmp_path / "tiny.pth")
    cfg = dataclasses.replace(small_cfg("linear"), pretrained=str(tmp_path / "tiny.pth"))
    model = build_model(cfg, NUM_CLASSES)
    assert torch.equal(model.backbone.stem[0].weight, source.stem[0].weight)


@pytest.mark.parametrize(("head", "mixing"), [("hgat", GraphAttention), ("hgat_fc", FullyConnectedMixing)])
def test_hgat_heads_mix_as_named_with_the_configured_widths(head, mixing):
    model = build(head)
    assert type(model.head.group_mixing) is mixing and type(model.head.label_mixing) is mixing
    assert model.head.reduce[0].out_features == 16  # hgat_reduce
    assert model.head.label_nodes.embedding.shape == (NUM_CLASSES, 8)  # hgat_heads_dim


@pytest.mark.parametrize(("adj", "embeddings", "message"), [
    (torch.ones(3, 2), torch.ones(3, 4), r"adj must be a square \[C, C\] matrix, got shape \(3, 2\)"),
    (torch.ones(3, 3), torch.ones(2, 4), r"embeddings must be \[C, E\] with C=3 .* got shape \(2, 4\)"),
    (torch.tensor([[1.0, math.nan], [0.0, 1.0]]), torch.ones(2, 4), "adj contains NaN or infinite values"),
    (torch.eye(2), torch.tensor([[1.0, math.inf], [0.0, 1.0]]), "embeddings contains NaN or infinite values"),
])
def test_gcn_head_refuses_a_graph_of_the_wrong_shape_or_with_non_finite_values(adj, embeddings, message):
    with pytest.raises(ValueError, match=message):
        GCNHead(adj, embeddings, feature_dim=8, hidden=4)


def test_gcn_head_keeps_its_own_copy_of_the_graph_it_was_given():
    adj, embeddings = torch.eye(3), torch.ones(3, 4)
    head = GCNHead(adj, embeddings, feature_dim=8, hidden=4)
    adj.zero_()
    embeddings.zero_()
    assert torch.equal(head.adj, torch.eye(3)) and torch.equal(head.embeddings, torch.ones(3, 4))


def test_gcn_adjacency_and_embeddings_are_buffers_not_parameters():
    model = build("gcn")
    assert {"head.adj", "head.embeddings"} <= dict(model.named_buffers()).keys()
    assert not {"head.adj", "head.embeddings"} & dict(model.named_parameters()).keys()
    assert torch.allclose(model.head.adj, torch.as_tensor(graph_inputs()["adj"]))


def test_gcn_logits_are_pooled_features_dotted_with_gcn_classifiers():
    model = build("gcn").eval()
    images = torch.randn(2, 3, 32, 32)
    head = model.head
    hidden = torch.nn.functional.leaky_relu(head.adj @ head.embeddings @ head.gc1.weight, 0.2)
    classifiers = head.adj @ hidden @ head.gc2.weight
    with torch.no_grad():
        pooled = model.backbone(images).amax(dim=(2, 3))
        assert torch.allclose(model(images), pooled @ classifiers.t(), atol=1e-5)


def test_the_gcn_computes_the_label_classifiers_once_per_batch_not_once_per_image():
    model = build("gcn")
    outputs = []
    for layer in (model.head.gc1, model.head.gc2):
        layer.register_forward_hook(lambda module, args, out: outputs.append(tuple(out.shape)))
    model(torch.randn(8, 3, 32, 32))
    assert outputs == [(NUM_CLASSES, 16), (NUM_CLASSES, model.head.gc2.weight.shape[1])]


def torch_calls_of_one_training_step(head: str, num_classes: int, num_groups: int, batch: int) -> int:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    adj = rng.random((num_classes, num_classes)).astype(np.float32)
    model = build_model(small_cfg(head), num_classes, adj=adj / adj.sum(1, keepdims=True),
                        embeddings=rng.standard_normal((num_classes, 10)),
                        groups=[c % num_groups for c in range(num_classes)])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    images, targets = torch.randn(batch, 3, 16, 16), torch.randint(0, 2, (batch, num_classes)).float()

    def step() -> None:
        nn.functional.multilabel_soft_margin_loss(model(images), targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step creates the momentum buffers
    with TorchCalls() as counted:
        step()
    return counted.calls


@pytest.mark.parametrize("head", list_heads())
def test_the_host_work_of_a_training_step_does_not_grow_with_labels_label_groups_or_batch_size(head):
    # One Python-issued torch call is one kernel launch or more: a per-label, per-group or per-image loop in a head
    # would launch more on COCO's 80 labels and 12 supercategories than on 7 labels in 3 groups.
    small = torch_calls_of_one_training_step(head, num_classes=7, num_groups=3, batch=2)
    assert torch_calls_of_one_training_step(head, num_classes=80, num_groups=12, batch=2) == small
    assert torch_calls_of_one_training_step(head, num_classes=7, num_groups=3, batch=16) == small


def test_graph_convolution_uses_mlgcn_initialisation_range():
    layer = GraphConvolution(300, 64)
    assert layer.weight.shape == (300, 64) and layer.bias is None
    assert layer.weight.abs().max() <= 1 / 8 and layer.weight.abs().max() > 0.1


@pytest.mark.parametrize(
    ("head", "kwargs", "message"),
    [
        ("gcn", {"embeddings": np.zeros((NUM_CLASSES, 4))}, "needs adj"),
        ("gcn", {"adj": np.eye(NUM_CLASSES)}, "needs embeddings"),
        ("gcn", {"adj": np.eye(5), "embeddings": np.zeros((5, 4))}, "adj describes 5 labels"),
        ("hgat", {}, "needs groups"),
        ("hgat_fc", {}, "needs groups"),
        ("hgat_fc", {"groups": [0, 1]}, "groups describes 2 labels"),
        ("transformer", {}, "unknown head"),
    ],
)
def test_build_model_with_missing_or_mismatched_inputs_raises_value_error(head, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(small_cfg(head), NUM_CLASSES, **kwargs)


# --------------------------------------------------------------------------------------------- HGAT


def hgat_head(attention: bool) -> HGATHead:
    torch.manual_seed(0)
    return HGATHead(12, GROUPS, reduce_dim=16, label_dim=8, attention=attention).eval()


def logits_with_perturbed(head: HGATHead, module: nn.Module, node: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits before and after adding noise to node ``node`` of ``module``'s [B, N, D] output."""
    features = torch.randn(3, 12)
    with torch.no_grad():
        before = head(features)
        handle = module.register_forward_hook(
            lambda m, i, out: out + torch.eye(out.shape[1])[node, :, None] * 5
        )
        after = head(features)
        handle.remove()
    return before, after


@pytest.mark.parametrize("attention", [True, False])
def test_hgat_mixing_across_groups_lets_one_group_change_every_groups_logits(attention):
    head = hgat_head(attention)
    before, after = logits_with_perturbed(head, head.group_blocks, node=0)
    assert (before - after).abs().min() > 0  # labels of groups 1 and 2 read group 0 through the group mixing
    head.group_mixing = nn.Identity()
    before, after = logits_with_perturbed(head, head.group_blocks, node=0)
    changed = (before - after).abs().amax(dim=0) > 0
    assert changed.tolist() == [g == 0 for g in GROUPS]


@pytest.mark.parametrize("attention", [True, False])
def test_hgat_within_group_mixing_never_crosses_groups(attention):
    head = hgat_head(attention)
    for label in range(NUM_CLASSES):
        before, after = logits_with_perturbed(head, head.label_nodes, node=label)
        changed = (before - after).abs().amax(dim=0) > 0
        assert changed.tolist() == [g == GROUPS[label] for g in GROUPS]


@pytest.mark.parametrize("attention", [True, False])
def test_hgat_logits_come_out_in_the_original_label_order(attention):
    head = hgat_head(attention)
    with torch.no_grad():
        head.classifier.weight.zero_()
        head.classifier.bias.copy_(torch.arange(NUM_CLASSES, dtype=torch.float32)[:, None])
        assert torch.equal(head(torch.randn(2, 12)), torch.arange(NUM_CLASSES).float().expand(2, -1))


def test_graph_attention_weights_sum_to_one_depend_on_the_input_and_respect_the_mask():
    torch.manual_seed(0)
    same_group = torch.tensor(GROUPS)[:, None] == torch.tensor(GROUPS)[None, :]
    attention = GraphAttention(8, same_group)
    first, second = attention.coefficients(torch.randn(2, NUM_CLASSES, 8)).detach()
    assert torch.allclose(first.sum(dim=1), torch.ones(NUM_CLASSES))
    assert torch.all(first[~same_group] == 0) and torch.all(first[same_group] > 0)
    assert not torch.allclose(first, second)


def test_graph_attention_output_is_the_attention_weighted_sum_of_projected_nodes():
    torch.manual_seed(0)
    attention = GraphAttention(8, torch.ones(4, 4, dtype=torch.bool))
    x = torch.randn(2, 4, 8)
    with torch.no_grad():
        attention.att_src.zero_()
        attention.att_dst.zero_()  # equal scores: alpha is uniform, each node receives the mean message
        mean_message = attention.proj(x).mean(dim=1, keepdim=True)
        assert torch.allclose(attention(x), x + torch.nn.functional.elu(mean_message), atol=1e-6)
        attention.att_src.normal_()
        assert not torch.allclose(attention(x), x + torch.nn.functional.elu(mean_message), atol=1e-3)


def test_graph_attention_coefficients_are_the_masked_softmax_of_leaky_relu_scores():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    attention = GraphAttention(4, mask, slope=0.3)
    x = torch.randn(3, 4)
    dst, src = x @ attention.att_dst, x @ attention.att_src
    expected = torch.zeros(3, 3)
    for i in range(3):
        allowed = mask[i].nonzero().flatten()
        scores = torch.nn.functional.leaky_relu(dst[i] + src[allowed], 0.3)
        expected[i, allowed] = torch.softmax(scores, dim=0)
    torch.testing.assert_close(attention.coefficients(x).detach(), expected)


def test_node_mixing_refuses_a_mask_that_leaves_a_node_without_neighbours():
    with pytest.raises(ValueError, match="every node needs at least one allowed neighbour"):
        GraphAttention(4, torch.tensor([[True, False], [False, False]]))


def test_each_group_block_is_residual_over_the_shared_vector():
    blocks = GroupResidualBlocks(3, 8)
    shared = torch.randn(2, 8)
    with torch.no_grad():
        blocks.fc2.weight.zero_()
        blocks.fc2.bias.zero_()  # the bottleneck adds nothing: every group gets ReLU(shared)
        torch.testing.assert_close(blocks(shared), torch.relu(shared)[:, None].expand(-1, 3, -1))


def test_fully_connected_mixing_coefficients_do_not_depend_on_the_input():
    mixing = FullyConnectedMixing(8, torch.ones(3, 3, dtype=torch.bool))
    first, second = mixing.coefficients(torch.randn(3, 8)), mixing.coefficients(torch.randn(3, 8))
    assert torch.equal(first, second) and torch.allclose(first, torch.full((3, 3), 1 / 3))


def test_hgat_accepts_arbitrary_group_ids_but_not_none():
    head = HGATHead(12, [7, 3, 7, 40], reduce_dim=16, label_dim=8).eval()
    assert head.label_nodes.label_group.tolist() == [0, 1, 0, 2]
    assert head(torch.randn(1, 12)).shape == (1, 4)
    with pytest.raises(ValueError, match="groups is empty"):
        HGATHead(12, [], reduce_dim=16, label_dim=8)


# --------------------------------------------------------------------------------------------- ML-GCN import


def original_layout(model: MultiLabelModel, adjacency: torch.Tensor) -> dict:
    """What the original GCNResnet's checkpoint would hold for ``model`` (DataParallel-wrapped, nested)."""
    state = {"features." + k: v for k, v in model.backbone.state_dict().items()}
    state.update({"gc1.weight": model.head.gc1.weight, "gc2.weight": model.head.gc2.weight, "A": adjacency})
    return {"epoch": 20, "best_score": 0.83, "state_dict": {"module." + k: v for k, v in state.items()}}


def test_import_mlgcn_state_dict_reproduces_the_original_model():
    source = build("gcn", backbone="resnet18").eval()
    adjacency = torch.rand(NUM_CLASSES, NUM_CLASSES)
    converted, imported_adjacency = import_mlgcn_state_dict(original_layout(source, adjacency))
    assert torch.equal(imported_adjacency, adjacency)

    torch.manual_seed(5)
    cfg = small_cfg("gcn", "resnet18")
    target = build_model(
        cfg, NUM_CLASSES, adj=source.head.adj, embeddings=source.head.embeddings.numpy()
    ).eval()
    result = target.load_state_dict(converted, strict=False)
    assert set(result.missing_keys) == {"head.adj", "head.embeddings"} and result.unexpected_keys == []
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target(images), source(images))


def test_import_mlgcn_state_dict_rejects_foreign_keys():
    with pytest.raises(ValueError, match="classifier.weight"):
        import_mlgcn_state_dict({"A": torch.eye(2), "classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="no 'A'"):
        import_mlgcn_state_dict({"gc1.weight": torch.zeros(2, 2)})


def test_model_leaky_slope_reaches_the_gcn_activation():
    model = build_model(dataclasses.replace(small_cfg("gcn"), leaky_slope=0.5), NUM_CLASSES, **graph_inputs())
    assert model.head.act.negative_slope == 0.5


def test_model_leaky_slope_reaches_both_hgat_attention_layers():
    model = build_model(dataclasses.replace(small_cfg("hgat"), leaky_slope=0.5), NUM_CLASSES, groups=GROUPS)
    assert model.head.group_mixing.slope == model.head.label_mixing.slope == 0.5
