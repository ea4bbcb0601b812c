"""Tests of models/backbone.py: frozen batch norm, which layers train, feature masks, and where weights come from."""

import os
import re

import pytest
import torch
import torchvision
from torch import nn

from helpers import block_network, tiny_args
from models.backbone import (
    IMAGENET_WEIGHTS,
    Backbone,
    FrozenBatchNorm2d,
    Joiner,
    build_backbone,
    load_backbone_weights,
    narrow_resnet,
)
from models.position_encoding import PositionEmbeddingSine
from util.misc import nested_tensor_from_tensor_list


def random_batchnorm(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(n, generator=g))
        bn.running_mean.copy_(torch.randn(n, generator=g))
        bn.running_var.copy_(torch.rand(n, generator=g) * 2 + 1e-3)
    bn.num_batches_tracked.fill_(17)
    return bn.eval()


# ---------------------------------------------------------------------------------------------- FrozenBatchNorm2d


def test_frozen_batchnorm_equals_batchnorm_in_eval():
    bn = random_batchnorm(6)
    frozen = FrozenBatchNorm2d(6)
    # A BatchNorm2d state_dict carries num_batches_tracked; strict loading must still succeed.
    assert "num_batches_tracked" in bn.state_dict()
    frozen.load_state_dict(bn.state_dict(), strict=True)
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_adds_eps_before_rsqrt():
    frozen = FrozenBatchNorm2d(1)
    frozen.running_var.zero_()  # a channel with zero variance stays finite: x / sqrt(0 + 1e-5)
    x = torch.full((1, 1, 1, 1), 2.0)
    assert frozen(x).item() == pytest.approx(2.0 / 1e-5**0.5, rel=1e-5)


def test_frozen_batchnorm_has_no_parameters_and_ignores_train_mode():
    frozen = FrozenBatchNorm2d(3)
    frozen.load_state_dict(random_batchnorm(3).state_dict())
    assert list(frozen.parameters()) == []
    assert sorted(frozen.state_dict()) == ["bias", "running_mean", "running_var", "weight"]
    x = torch.randn(4, 3, 2, 2)
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen.train()
    out_train = frozen(x)
    frozen.eval()
    assert torch.equal(out_train, frozen(x))
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())


# ---------------------------------------------------------------------------------------------- Backbone


def test_only_layer2_to_4_train():
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad}
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert trainable and all(n.split(".")[1] in ("layer2", "layer3", "layer4") for n in trainable)
    assert frozen and all(n.split(".")[1] in ("conv1", "layer1") for n in frozen)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    still = Backbone("resnet18", train_backbone=False, return_interm_layers=False, dilation=False)
    assert not any(p.requires_grad for p in still.parameters())


def test_features_and_downsampled_masks():
    torch.manual_seed(0)
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False).eval()
    # A 64x64 image padded to 64x96 by a wider one.
    batch = nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 96)])
    with torch.no_grad():
        out = backbone(batch)
    assert list(out) == ["0", "1", "2", "3"]
    for (name, feature), channels, stride in zip(out.items(), [64, 128, 256, 512], [4, 8, 16, 32]):
        assert feature.tensors.shape == (2, channels, 64 // stride, 96 // stride)
        assert feature.mask.shape == (2, 64 // stride, 96 // stride) and feature.mask.dtype == torch.bool
        # A feature cell is padding when the pixel it samples (nearest) is: columns >= 64 / stride.
        expected = torch.zeros(2, 64 // stride, 96 // stride, dtype=torch.bool)
        expected[0, :, 64 // stride :] = True
        assert torch.equal(feature.mask, expected), name
    # The last stage of the default (non-intermediate) backbone.
    last = Backbone("resnet18", train_backbone=True, return_interm_layers=False, dilation=False)
    assert last.num_channels == 512
    with torch.no_grad():
        only = last(batch)
    assert list(only) == ["0"] and only["0"].tensors.shape == (2, 512, 2, 3)
    assert torch.equal(only["0"].mask, torch.tensor([[[False, False, True]] * 2, [[False] * 3] * 2]))


@pytest.mark.slow
def test_dilation_keeps_stride_16_in_the_last_stage():
    # DC5 needs bottleneck blocks (torchvision's BasicBlock refuses dilation), so ResNet-50 here.
    backbone = Backbone("resnet50", train_backbone=False, return_interm_layers=False, dilation=True).eval()
    assert backbone.num_channels == 2048
    with torch.no_grad():
        out = backbone(nested_tensor_from_tensor_list([torch.rand(3, 64, 96)]))["0"]
    assert out.tensors.shape == (1, 2048, 4, 6)
    # The first block of the last stage no longer strides; the blocks after it dilate instead.
    assert backbone.body.layer4[0].conv2.stride == (1, 1) and backbone.body.layer4[0].downsample[0].stride == (1, 1)
    assert all(block.conv2.dilation == (2, 2) for block in backbone.body.layer4[1:])


@pytest.mark.parametrize("name", ["resnet18", "resnet34"])
def test_dilation_of_a_basic_block_resnet_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"--dilation.*{name}"):
        Backbone(name, train_backbone=False, return_interm_layers=False, dilation=True)


def test_unknown_backbone_norm_is_rejected_by_the_backbone_itself():
    with pytest.raises(ValueError, match="--backbone_norm must be one of .*'group'"):
        Backbone("resnet18", True, False, False, norm="group")


def test_unknown_backbone_is_rejected():
    with pytest.raises(ValueError, match="vgg16"):
        Backbone("vgg16", True, False, False)


def test_joiner_returns_features_and_their_encodings():
    backbone = Backbone("resnet18", train_backbone=True, return_interm_layers=True, dilation=False)
    position = PositionEmbeddingSine(16, normalize=True)
    joiner = Joiner(backbone, position).eval()
    batch = nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 64, 96)])
    with torch.no_grad():
        features, pos = joiner(batch)
    assert isinstance(features, list) and isinstance(pos, list) and len(features) == len(pos) == 4
    for f, p in zip(features, pos):
        assert p.shape == (2, 32) + tuple(f.tensors.shape[-2:])
        torch.testing.assert_close(p, position(f))


def test_build_backbone_from_flags():
    model = build_backbone(tiny_args())
    assert isinstance(model, Joiner) and model.num_channels == 512
    assert any(p.requires_grad for p in model.parameters())
    frozen = build_backbone(tiny_args("--lr_backbone", "0", "--masks"))
    assert not any(p.requires_grad for p in frozen.parameters())
    assert list(frozen[0].body.return_layers.values()) == ["0", "1", "2", "3"]


# ---------------------------------------------------------------------------------------------- --backbone_weights


def stand_in_resnet18(seed=0):
    """A ResNet-18 state_dict whose every entry (batch-norm statistics included) is random and non-default."""
    g = torch.Generator().manual_seed(seed)
    state = torchvision.models.resnet18(weights=None).state_dict()
    return {
        k: (torch.randn(v.shape, generator=g).abs() + 0.1 if v.is_floating_point() else v) for k, v in state.items()
    }


def assert_loaded(backbone, state):
    own = backbone.body.state_dict()
    assert own.keys() <= state.keys()
    for k, v in own.items():
        assert torch.equal(v, state[k]), k


def test_backbone_weights_none_loads_nothing(monkeypatch):
    attempts = block_network(monkeypatch)
    assert load_backbone_weights("resnet18", "none") is None
    torch.manual_seed(0)
    backbone = Backbone("resnet18", True, False, False, weights="none")
    # Batch-norm statistics stay at their defaults: nothing was loaded.
    bn = backbone.body.bn1
    assert torch.equal(bn.running_var, torch.ones(64)) and torch.equal(bn.running_mean, torch.zeros(64))
    assert attempts == []


def test_backbone_weights_imagenet_from_the_torch_hub_cache(tmp_path, monkeypatch):
    attempts = block_network(monkeypatch, hub_cache=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = stand_in_resnet18()
    torch.save(state, checkpoints / IMAGENET_WEIGHTS["resnet18"])
    assert IMAGENET_WEIGHTS["resnet18"] == "resnet18-f37072fd.pth"  # torchvision's IMAGENET1K_V1 file
    backbone = Backbone("resnet18", True, False, False, weights="imagenet")
    assert_loaded(backbone, state)
    assert attempts == []
    model = build_backbone(tiny_args("--backbone_weights", "imagenet"))
    assert_loaded(model[0], state)


def test_backbone_weights_imagenet_missing_offline_says_what_to_do(tmp_path, monkeypatch):
    attempts = block_network(monkeypatch, hub_cache=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(RuntimeError) as info:
        Backbone("resnet18", True, False, False, weights="imagenet")
    message = str(info.value)
    assert attempts, "the download should have been attempted (and refused)"
    assert os.path.join(str(tmp_path), "hub", "checkpoints", "resnet18-f37072fd.pth") in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "--backbone_weights none" in message and "--backbone_weights PATH" in message


@pytest.mark.parametrize("wrapped", [False, True])
def test_backbone_weights_from_a_local_file(tmp_path, monkeypatch, wrapped):
    attempts = block_network(monkeypatch)
    state = stand_in_resnet18(seed=3)
    path = tmp_path / "my_resnet18.pth"
    torch.save({"model": state} if wrapped else state, path)
    backbone = Backbone("resnet18", True, False, False, weights=str(path))
    assert_loaded(backbone, state)
    assert attempts == []


def test_backbone_weights_from_a_detr_checkpoint_take_its_backbone(tmp_path, monkeypatch):
    attempts = block_network(monkeypatch)
    state = stand_in_resnet18(seed=4)
    detr_state = {"backbone.0.body." + k: v for k, v in state.items() if not k.startswith("fc.")}
    detr_state["class_embed.weight"] = torch.zeros(6, 32)  # the rest of DETR is left out
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": detr_state, "epoch": 3}, path)
    backbone = Backbone("resnet18", True, False, False, weights=str(path))
    assert_loaded(backbone, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert attempts == []


def test_backbone_weights_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="imagenet.*none"):
        Backbone("resnet18", True, False, False, weights=str(tmp_path / "missing.pth"))
    wrong = tmp_path / "resnet34.pth"  # same layer names as resnet18, more blocks
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), wrong)
    flag = re.escape(f"--backbone_weights {wrong}: ")
    with pytest.raises(RuntimeError, match=f"(?s){flag}.*do not fit resnet18.*unexpected.*layer1.2"):
        Backbone("resnet18", True, False, False, weights=str(wrong))
    wrong = tmp_path / "resnet50.pth"  # same keys in the first blocks, other shapes
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), wrong)
    flag = re.escape(f"--backbone_weights {wrong}: ")
    with pytest.raises(RuntimeError, match=f"(?s){flag}.*do not fit resnet18.*size mismatch"):
        Backbone("resnet18", True, False, False, weights=str(wrong))


# ---------------------------------------------------------------------------------------------- --channels_last


def test_channels_last_runs_the_same_model_in_another_layout(tmp_path):
    from helpers import tiny_model

    plain, _, _ = tiny_model("--backbone_norm", "batch")
    fast, _, _ = tiny_model("--backbone_norm", "batch", "--channels_last")
    body = fast.backbone[0].body
    assert fast.backbone[0].channels_last and not plain.backbone[0].channels_last
    assert body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.backbone[0].body.conv1.weight.is_contiguous(memory_format=torch.channels_last)

    # One checkpoint layout: each model loads the other's weights, and the layout stays the model's own.
    torch.save(plain.state_dict(), tmp_path / "plain.pth")
    fast.load_state_dict(torch.load(tmp_path / "plain.pth", weights_only=True))
    assert body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.save(fast.state_dict(), tmp_path / "fast.pth")
    reloaded, _, _ = tiny_model("--backbone_norm", "batch", seed=1)
    reloaded.load_state_dict(torch.load(tmp_path / "fast.pth", weights_only=True))
    for (name, a), b in zip(plain.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name

    samples = nested_tensor_from_tensor_list([torch.rand(3, 70, 90), torch.rand(3, 96, 64)])
    # Same outputs and gradients in eval mode, and same outputs in training mode (batch statistics), up to
    # fp32 rounding (the layouts use different convolution kernels): within the 1e-4 this project holds its
    # numbers to. (Not training-mode gradients: statistics over two small images amplify rounding differences.)
    for train in (False, True):
        plain.train(train), fast.train(train)
        outs = [m(samples) for m in (plain, fast)]
        for key in ("pred_logits", "pred_boxes"):
            torch.testing.assert_close(outs[1][key], outs[0][key], rtol=0, atol=1e-4)
        if not train:
            for out in outs:
                (out["pred_logits"].logsumexp(-1).mean() + out["pred_boxes"].mean()).backward()
            for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_scripts(monkeypatch):
    import warnings
    from helpers import tiny_model

    model, _, _ = tiny_model("--channels_last")
    model.eval()
    samples = nested_tensor_from_tensor_list([torch.rand(3, 64, 80)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation warning
        scripted = torch.jit.script(model)
    with torch.no_grad():
        torch.testing.assert_close(scripted(samples)["pred_boxes"], model(samples)["pred_boxes"], rtol=0, atol=1e-6)


def test_channels_last_is_a_synthetic_default_that_a_flag_undoes():
    import main as main_py

    assert main_py.parse_args(["--dataset_file", "synthetic"]).channels_last is True
    assert main_py.parse_args(["--dataset_file", "synthetic_panoptic"]).channels_last is True
    assert main_py.parse_args(["--dataset_file", "synthetic", "--no_channels_last"]).channels_last is False
    assert main_py.parse_args([]).channels_last is False  # COCO keeps the original's layout


# ---------------------------------------------------------------------------------------------- --backbone_width


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", False), ("resnet50", True)])
def test_backbone_width_1_is_torchvisions_resnet(name, dilation):
    """narrow_resnet at width 1 rebuilds exactly torchvision's network: same names, shapes, strides, dilations."""
    reference = getattr(torchvision.models, name)(replace_stride_with_dilation=[False, False, dilation])
    rebuilt = getattr(torchvision.models, name)(replace_stride_with_dilation=[False, False, dilation])
    narrow_resnet(rebuilt, 1.0)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    convs = [(n, m.stride, m.dilation) for n, m in reference.named_modules() if isinstance(m, nn.Conv2d)]
    assert [(n, m.stride, m.dilation) for n, m in rebuilt.named_modules() if isinstance(m, nn.Conv2d)] == convs


@pytest.mark.parametrize("width,stride", [(0.5, 8), (0.5, 32), (0.25, 16)])
def test_backbone_width_scales_every_stage(width, stride):
    backbone = Backbone("resnet18", True, False, False, norm="batch", stride=stride, width=width)
    full = Backbone("resnet18", True, False, False, norm="batch", stride=stride)
    assert backbone.num_channels == full.num_channels * width
    (feature,) = backbone(nested_tensor_from_tensor_list([torch.rand(3, 64, 96)])).values()
    assert feature.tensors.shape == (1, backbone.num_channels, 64 // stride, 96 // stride)
    # Same module names, every convolution with `width` times the channels on each side but the image's 3.
    assert list(backbone.state_dict()) == list(full.state_dict())
    for (name, conv), (_, full_conv) in zip(backbone.named_modules(), full.named_modules()):
        if isinstance(conv, nn.Conv2d):
            assert conv.out_channels == full_conv.out_channels * width, name
            assert conv.in_channels == (3 if full_conv.in_channels == 3 else full_conv.in_channels * width), name
    # Initialized as torchvision initializes: He-normal convolutions (fan out), unit batch norms.
    conv = backbone.body.layer1[0].conv1
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() * (fan_out / 2) ** 0.5 - 1) < 0.15
    assert torch.equal(backbone.body.bn1.weight, torch.ones_like(backbone.body.bn1.weight))


def test_backbone_width_bad_values_are_clear_errors():
    for width in (0.0, 1.5, 0.3):  # 64 x 0.3 is not a whole number of channels
        with pytest.raises(ValueError, match="--backbone_width"):
            Backbone("resnet18", True, False, False, width=width)
    with pytest.raises(ValueError, match="--backbone_width 0.5 has no pretrained weights"):
        Backbone("resnet18", True, False, False, weights="imagenet", width=0.5)


def test_a_narrow_model_trains_runs_the_fast_path_and_refuses_another_width_on_resume():
    from helpers import MASK_HEAD_FLAGS, tiny_model
    from models.fast import enable_fast_path
    from util.checkpoint import architecture_differences

    model, criterion, _ = tiny_model("--backbone_width", "0.5", "--masks", *MASK_HEAD_FLAGS)
    assert model.detr.input_proj.in_channels == 256
    images = nested_tensor_from_tensor_list([torch.rand(3, 64, 64), torch.rand(3, 48, 64)])
    targets = [
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "masks": torch.ones(1, 64, 64)}
        for _ in range(2)
    ]
    model.eval()
    with torch.no_grad():
        exact = model(images)
        enable_fast_path(model)
        fast = model(images)
    assert exact["pred_masks"].shape == (2, 5, 16, 16)
    torch.testing.assert_close(fast["pred_boxes"], exact["pred_boxes"], rtol=1e-4, atol=1e-5)
    losses = criterion(model.train()(images), targets)
    assert all(torch.isfinite(v) for v in losses.values())
    saved = tiny_args("--backbone_width", "0.5")
    assert architecture_differences(saved, tiny_args()) == ["--backbone_width: checkpoint 0.5, this run 1.0"]
