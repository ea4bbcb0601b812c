"""The CNN backbone: a torchvision ResNet with frozen batch norm, returning padded feature maps and their masks."""

import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck

from util.misc import NestedTensor, is_main_process

from .position_encoding import build_position_encoding


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d whose statistics and affine parameters are fixed buffers.

    DETR trains with 2 images per GPU; batch statistics that small are noise, so the ImageNet statistics are
    kept as they are. Unlike torchvision.ops.FrozenBatchNorm2d, eps is added before rsqrt as in BatchNorm2d,
    so eval outputs equal those of nn.BatchNorm2d with the same buffers.
    """

    def __init__(self, n: int, eps: float = 1e-5):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))
        self.eps = eps

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # BatchNorm2d checkpoints carry a counter this module has no use for.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def scale_and_shift(self) -> Tuple[Tensor, Tensor]:
        """(scale, shift) [C] such that forward(x) = x * scale + shift per channel."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: Tensor) -> Tensor:
        # Fold into one scale and shift: fewer ops, and the reshapes keep it fuser-friendly.
        scale, shift = self.scale_and_shift()
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


class BackboneBase(nn.Module):
    """Wraps a ResNet body; returns the chosen stages as NestedTensors with the padding mask resized to each."""

    def __init__(
        self,
        backbone: nn.Module,
        train_backbone: bool,
        num_channels: int,
        return_interm_layers: bool,
        train_stem: bool = False,
        last_layer: int = 4,
    ):
        super().__init__()
        for name, parameter in backbone.named_parameters():
            # The stem and layer1 stay frozen even when the backbone trains: pretrained, they carry generic
            # low-level filters, and freezing them saves memory. (A backbone trained from scratch has no such
            # filters, so `train_stem` trains them too.)
            trainable = train_backbone and (train_stem or any(s in name for s in ("layer2", "layer3", "layer4")))
            parameter.requires_grad_(trainable)
        # The body ends at stage `last_layer` (4 in the original; IntermediateLayerGetter drops later stages).
        if return_interm_layers:
            return_layers = {f"layer{i}": str(i - 1) for i in range(1, last_layer + 1)}
        else:
            return_layers = {f"layer{last_layer}": "0"}
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.num_channels = num_channels
        self.last_layer = last_layer
        self.channels_last = False  # see use_channels_last()

    def use_channels_last(self) -> None:
        """Keep the body's weights and run its input in the channels-last layout (--channels_last). The
        numbers are the same up to float rounding; loading and saving weights is unaffected (copies into a
        parameter keep its layout)."""
        self.body.to(memory_format=torch.channels_last)
        self.channels_last = True

    def forward(self, tensor_list: NestedTensor) -> Dict[str, NestedTensor]:
        x = tensor_list.tensors
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        xs = self.body(x)
        m = tensor_list.mask
        assert m is not None
        out: Dict[str, NestedTensor] = {}
        for name, x in xs.items():
            # Nearest resizing of the padding mask to the feature size: a feature cell is padding when the
            # pixel it samples is.
            mask = F.interpolate(m[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
            out[name] = NestedTensor(x, mask)
        return out


# torchvision's ImageNet weights (IMAGENET1K_V1), by the file names torch.hub caches them under.
IMAGENET_WEIGHTS = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth",
    "resnet152": "resnet152-394f9c45.pth",
}


def load_backbone_weights(name: str, weights: str) -> Optional[Dict[str, Tensor]]:
    """The state_dict chosen by --backbone_weights: 'imagenet', 'none', or a path to a ResNet state_dict file or
    to a DETR checkpoint (whose backbone is taken: the ResNet a detector trained, e.g. on a dataset like yours)."""
    if weights in ("none", "", None):
        return None
    if weights != "imagenet":
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"--backbone_weights {weights!r}: no such file. Give 'imagenet', 'none' "
                "(train from scratch) or the path of a ResNet state_dict file."
            )
        state = torch.load(weights, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        # A DETR checkpoint (this project's or the original's): its backbone's ResNet, under the body's prefix.
        prefix = "backbone.0.body."
        if isinstance(state, dict) and any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        return state
    if name not in IMAGENET_WEIGHTS:
        raise ValueError(f"--backbone {name}: no ImageNet weights known; use --backbone_weights none or a file")
    file_name = IMAGENET_WEIGHTS[name]
    url = "https://download.pytorch.org/models/" + file_name
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"--backbone_weights imagenet: could not load {file_name} for {name} ({type(e).__name__}: {e}). "
            f"It is looked for at {cached} (set TORCH_HOME to move it) and otherwise downloaded from {url}. "
            "Options: put that file there, pass --backbone_weights PATH to a local ResNet state_dict, or "
            "--backbone_weights none to train the backbone from scratch."
        ) from e


# --backbone_norm: 'frozen' (the original's FrozenBatchNorm2d, right for pretrained weights) or 'batch'
# (trainable BatchNorm2d, for a backbone trained from scratch, where frozen identity statistics would leave
# the ResNet without any normalization).
NORM_LAYERS = {"frozen": FrozenBatchNorm2d, "batch": nn.BatchNorm2d}


def narrow_resnet(resnet: torchvision.models.ResNet, width: float) -> None:
    """Rebuild a torchvision ResNet in place with `width` times the channels in every stage (--backbone_width),
    same module names, same block counts and strides, initialized as torchvision initializes its ResNets."""
    block = type(resnet.layer1[0])
    blocks = [len(getattr(resnet, f"layer{i}")) for i in range(1, 5)]
    norm_layer = resnet._norm_layer
    stem = int(64 * width)
    resnet.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = norm_layer(stem)
    resnet.inplanes, resnet.dilation = stem, 1
    # DC5 (--dilation): layer4's first bottleneck then has stride 1 where it would have 2.
    dilated = block is Bottleneck and resnet.layer4[0].conv2.stride[0] == 1
    for i, count in enumerate(blocks):
        planes, stride = int(64 * width) << i, 1 if i == 0 else 2
        layer = resnet._make_layer(block, planes, count, stride=stride, dilate=dilated and i == 3)
        setattr(resnet, f"layer{i + 1}", layer)
    resnet.fc = nn.Linear(resnet.inplanes, resnet.fc.out_features)
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


# --feature_stride: the stride of the feature map the transformer reads -> the ResNet stage that ends the body.
FEATURE_STRIDES = {8: 2, 16: 3, 32: 4}


class Backbone(BackboneBase):
    """A torchvision ResNet with the `norm` layers of NORM_LAYERS (the original's FrozenBatchNorm2d by default);
    `dilation` trades the last stage's stride for dilation (DC5); `stride` 8 or 16 ends the body after layer2
    or layer3 (a finer feature map from a shorter network) instead of the original's layer4 (stride 32)."""

    def __init__(
        self,
        name: str,
        train_backbone: bool,
        return_interm_layers: bool,
        dilation: bool,
        weights: str = "none",
        norm: str = "frozen",
        stride: int = 32,
        width: float = 1.0,
    ):
        if not name.startswith("resnet") or not hasattr(torchvision.models, name):
            raise ValueError(
                f"--backbone {name!r} is not a torchvision ResNet (resnet18, resnet34, resnet50, resnet101, resnet152)"
            )
        if dilation and name in ("resnet18", "resnet34"):
            # torchvision's BasicBlock (resnet18/34) has no dilated form; fail here rather than deep inside it.
            raise ValueError(
                f"--dilation needs a bottleneck ResNet (resnet50, resnet101, resnet152); {name} "
                "has basic blocks, which torchvision cannot dilate. Drop --dilation or change --backbone"
            )
        if stride not in FEATURE_STRIDES:
            raise ValueError(f"--feature_stride must be one of {sorted(FEATURE_STRIDES)}, got {stride!r}")
        if dilation and stride != 32:
            raise ValueError(
                f"--dilation changes the stride of layer4, which --feature_stride {stride} leaves "
                "out; use one of the two"
            )
        if norm not in NORM_LAYERS:
            raise ValueError(f"--backbone_norm must be one of {sorted(NORM_LAYERS)}, got {norm!r}")
        if not 0 < width <= 1 or int(64 * width) != 64 * width:
            raise ValueError(f"--backbone_width must be in (0, 1] with 64 x it a whole number, got {width!r}")
        if width != 1 and weights != "none":
            raise ValueError(
                f"--backbone_width {width} has no pretrained weights: torchvision's are for width 1. "
                "Add --backbone_weights none"
            )
        body = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=NORM_LAYERS[norm]
        )
        if width != 1:
            narrow_resnet(body, width)
        # As in the original, only the main process loads pretrained weights: the others receive them through
        # DistributedDataParallel's initial broadcast.
        state = load_backbone_weights(name, weights) if is_main_process() else None
        if state is not None:
            try:
                missing, unexpected = body.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shape mismatches raise even with strict=False
                raise RuntimeError(f"--backbone_weights {weights}: backbone weights do not fit {name}: {e}") from e
            missing = [k for k in missing if not k.startswith("fc.")]
            unexpected = [k for k in unexpected if not k.startswith("fc.")]
            if missing or unexpected:
                raise RuntimeError(
                    f"--backbone_weights {weights}: backbone weights do not fit {name}: "
                    f"missing {missing[:10]}, unexpected {unexpected[:10]}"
                )
        last_layer = FEATURE_STRIDES[stride]
        # Each stage doubles the channels: layer4 has 512 (basic blocks) or 2048 (bottlenecks).
        num_channels = int((512 if name in ("resnet18", "resnet34") else 2048) * width) >> (4 - last_layer)
        super().__init__(
            body,
            train_backbone,
            num_channels,
            return_interm_layers,
            train_stem=(norm == "batch"),
            last_layer=last_layer,
        )


class Joiner(nn.Sequential):
    """Backbone followed by the position encoding of each returned feature map."""

    def __init__(self, backbone: nn.Module, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)

    def forward(self, tensor_list: NestedTensor):
        xs = self[0](tensor_list)
        out: List[NestedTensor] = []
        pos: List[Tensor] = []
        for x in xs.values():
            out.append(x)
            pos.append(self[1](x).to(x.tensors.dtype))
        return out, pos


def build_backbone(args) -> Joiner:
    """Backbone + position encoding from the flags; the backbone trains when --lr_backbone > 0."""
    position_embedding = build_position_encoding(args)
    train_backbone = args.lr_backbone > 0
    return_interm_layers = args.masks
    backbone = Backbone(
        args.backbone,
        train_backbone,
        return_interm_layers,
        args.dilation,
        weights=args.backbone_weights,
        norm=args.backbone_norm,
        stride=args.feature_stride,
        width=args.backbone_width,
    )
    if args.channels_last:
        backbone.use_channels_last()
    model = Joiner(backbone, position_embedding)
    model.num_channels = backbone.num_channels
    return model
