"""The fast path: the same model, faster, within float rounding of the bit-exact one.

`build_model` returns the bit-exact model: the original DETR's numbers to the last bit (the parity case).
`enable_fast_path(model)` makes the same model, with the same weights and state_dict, faster; main.py applies
it with --fast (off by default: over a whole run, Adam magnifies the rounding differences). What it changes,
each measured by tools/benchmark.py (docs/performance.md):

- every FrozenBatchNorm2d of the ResNet runs folded into the convolution before it (one pass over each
  activation instead of two; the folded weight is recomputed every forward, so training is unchanged): the
  ResNet's blocks become FoldedBasicBlock / FoldedBottleneck, its body a FoldedLayerGetter;
- the ResNet runs channels-last, the layout oneDNN (CPU) and cuDNN prefer;
- the encoder's self-attention and the decoder's cross-attention become FusedMultiheadAttention, which runs
  scaled_dot_product_attention;
- in fp32 training on the CPU, the weight gradient of each 3x3 convolution of the ResNet with 128 input channels
  or more is computed from contiguous copies of its input and output gradient (ContiguousWeightGradConv2d):
  oneDNN's channels-last kernels for it run up to 3x slower on AVX2 (a stride-2 one: 106 ms against 33 ms with
  the copies);
- in training on the CPU, dropout masks come from fast_dropout (16 random bits per element, several times
  faster than torch's bernoulli_ there), in the attention weights and the transformer's layers (FastDropout).
  Dropout draws other random numbers than the exact path's, as any fused kernel's dropout does.

Each swapped-in class subclasses the one it replaces and holds the same parameters under the same names, so
checkpoints move freely between the two paths. Results stay within float rounding of the exact path: outputs and
losses within 1e-4, gradients within 1e-3 relative (tests/test_fast_path.py).
"""

import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck

from util.amp import autocast_enabled

from .backbone import BackboneBase, FrozenBatchNorm2d
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer

# ------------------------------------------------------------------------------- the ResNet: folded frozen norms


def fold_norm_into_conv(
    norm_scale_and_shift: Tuple[Tensor, Tensor], conv_weight: Tensor, conv_bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """The weight and bias of one convolution doing what the convolution of conv_weight (and conv_bias) followed
    by a FrozenBatchNorm2d of that (scale, shift) does. Computed at every call from the conv's live weight, so
    gradients still reach it and the state_dict keeps its two modules (see fold_frozen_batch_norms)."""
    scale, shift = norm_scale_and_shift
    weight = conv_weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv_bias is None else conv_bias * scale + shift
    return weight, bias


# The folded blocks below spell out each (conv, norm) pair: TorchScript cannot pass modules to a helper.


class FoldedBasicBlock(BasicBlock):
    """torchvision's BasicBlock (resnet18/34) with each FrozenBatchNorm2d folded into the convolution before it."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = fold_norm_into_conv(self.bn1.scale_and_shift(), self.conv1.weight, self.conv1.bias)
        out = self.relu(self.conv1._conv_forward(x, weight, bias))
        weight, bias = fold_norm_into_conv(self.bn2.scale_and_shift(), self.conv2.weight, self.conv2.bias)
        out = self.conv2._conv_forward(out, weight, bias)
        if self.downsample is not None:
            conv, bn = self.downsample[0], self.downsample[1]
            weight, bias = fold_norm_into_conv(bn.scale_and_shift(), conv.weight, conv.bias)
            x = conv._conv_forward(x, weight, bias)
        out += x  # in place, as torchvision's blocks add (the convolution's output is saved by no backward)
        return self.relu(out)


class FoldedBottleneck(Bottleneck):
    """torchvision's Bottleneck (resnet50 and up) with each FrozenBatchNorm2d folded into the convolution before
    it."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = fold_norm_into_conv(self.bn1.scale_and_shift(), self.conv1.weight, self.conv1.bias)
        out = self.relu(self.conv1._conv_forward(x, weight, bias))
        weight, bias = fold_norm_into_conv(self.bn2.scale_and_shift(), self.conv2.weight, self.conv2.bias)
        out = self.relu(self.conv2._conv_forward(out, weight, bias))
        weight, bias = fold_norm_into_conv(self.bn3.scale_and_shift(), self.conv3.weight, self.conv3.bias)
        out = self.conv3._conv_forward(out, weight, bias)
        if self.downsample is not None:
            conv, bn = self.downsample[0], self.downsample[1]
            weight, bias = fold_norm_into_conv(bn.scale_and_shift(), conv.weight, conv.bias)
            x = conv._conv_forward(x, weight, bias)
        out += x
        return self.relu(out)


class FoldedLayerGetter(IntermediateLayerGetter):
    """IntermediateLayerGetter whose stem runs conv1 and its FrozenBatchNorm2d bn1 as one convolution."""

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for name, module in self.items():
            if name == "conv1":
                weight, bias = fold_norm_into_conv(self.bn1.scale_and_shift(), self.conv1.weight, self.conv1.bias)
                x = self.conv1._conv_forward(x, weight, bias)
            elif name != "bn1":
                x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


def fold_frozen_batch_norms(body: IntermediateLayerGetter) -> None:
    """Run every (convolution, FrozenBatchNorm2d) pair of a ResNet body as one convolution, in place.

    Only the modules' classes change: weights, buffers and state_dict keys stay as they are, and the folded
    weight is recomputed at every forward, so training, loading and saving work as before. Results equal the
    unfolded ones up to float rounding (about 1e-6 relative)."""
    if not any(isinstance(m, FrozenBatchNorm2d) for m in body.modules()):
        return  # --backbone_norm batch: trainable norms use batch statistics in training and cannot fold
    folded = {BasicBlock: FoldedBasicBlock, Bottleneck: FoldedBottleneck, IntermediateLayerGetter: FoldedLayerGetter}
    for module in body.modules():
        if type(module) in folded:
            module.__class__ = folded[type(module)]


class _ContiguousWeightGrad(torch.autograd.Function):
    """conv2d whose backward computes the input gradient as usual (in the layout it comes in) and the weight
    gradient from contiguous copies of the input and the output gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (list(stride), list(padding), list(dilation), groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
            )[0]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.ops.aten.convolution_backward(
                grad.contiguous(),
                x.contiguous(),
                weight.contiguous(),
                None,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                [False, True, False],
            )[1]
        if has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class ContiguousWeightGradConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict) whose weight gradient, in fp32 CPU training, comes from
    contiguous copies of its input and output gradient (see _ContiguousWeightGrad); elsewhere it is nn.Conv2d.
    The gradients are the same up to float rounding."""

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if not torch.jit.is_scripting() and self._contiguous_weight_grad(input, weight):
            return self._conv_with_contiguous_weight_grad(input, weight, bias)
        return F.conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @torch.jit.unused
    def _contiguous_weight_grad(self, input: Tensor, weight: Tensor) -> bool:
        return (
            weight.requires_grad
            and torch.is_grad_enabled()
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and not autocast_enabled("cpu")
        )

    @torch.jit.unused
    def _conv_with_contiguous_weight_grad(self, input: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        return _ContiguousWeightGrad.apply(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)


# The narrowest 3x3 convolution whose weight gradient goes through contiguous copies. Measured on AVX2 (simulated,
# docs/performance.md): ResNet-50's 3x3 layers (128-512 channels) gain 25-70% each; the 32-64-channel ones of the
# synthetic recipe's half-width ResNet-18 gain nothing, and the copies cost.
CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS = 128


def contiguous_weight_grad_convs(module: nn.Module) -> List[str]:
    """Make every 3x3 nn.Conv2d (zero padding, at least CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS input channels) under
    `module` a ContiguousWeightGradConv2d, in place; returns their names."""
    names = []
    for name, child in module.named_modules():
        if (
            type(child) is nn.Conv2d
            and child.kernel_size == (3, 3)
            and child.padding_mode == "zeros"
            and child.in_channels >= CONTIGUOUS_WEIGHT_GRAD_MIN_CHANNELS
        ):
            child.__class__ = ContiguousWeightGradConv2d
            names.append(name)
    return names


# ----------------------------------------------------------------- the transformer: fused attention, fast dropout


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout for the fast path on the CPU, where torch's bernoulli_ draws one double per element on one
    thread (about 8 ms per million elements on the project's CPU; this takes about 1.5 ms): every 64-bit draw
    of the default generator gives four 16-bit numbers, each element kept when its number is at or above the
    drop threshold. Elements are dropped with probability round(p * 65536) / 65536 (0.100006 for p = 0.1), the
    kept ones scaled by 1 / (1 - p) as F.dropout scales them. Elsewhere (a GPU, TorchScript) it is F.dropout."""
    if not training or p == 0.0:
        return x
    if torch.jit.is_scripting() or x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training)
    return x * _keep_mask(x, p)


@torch.jit.unused
def _keep_mask(x: Tensor, p: float) -> Tensor:
    """fast_dropout's mask: 1 / (1 - p) where an element is kept, 0 where dropped, in x's dtype."""
    n = x.numel()
    # random_ from -(2 ** 63) with no upper bound draws all 64 bits.
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    uniform = bits.view(torch.int16)[:n].reshape(x.shape).to(torch.float32)  # integers in [-32768, 32767]
    threshold = float(round(p * 65536) - 32768)
    # Integers: (u - threshold + 1) clamped to [0, 1] is 1 where u >= threshold and 0 below it.
    return uniform.sub_(threshold - 1.0).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - p)).to(x.dtype)


class FastDropout(nn.Dropout):
    """nn.Dropout through fast_dropout (the fast path swaps it in)."""

    def forward(self, x: Tensor) -> Tensor:
        return fast_dropout(x, self.p, self.training)


def explicit_attention_fast_dropout(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Optional[Tensor],
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj_weight: Tensor,
    out_proj_bias: Tensor,
    num_heads: int,
    dropout: float,
) -> Tensor:
    """nn.MultiheadAttention's explicit path (sequence-first, no attention mask) in training, with fast_dropout
    on the attention weights. On the CPU, scaled_dot_product_attention with dropout falls back to this same
    explicit attention, with bernoulli_ dropout."""
    tgt_len, batch, embed = query.shape
    head_dim = embed // num_heads
    q = F.linear(query, in_proj_weight[:embed], in_proj_bias[:embed])
    k = F.linear(key, in_proj_weight[embed : 2 * embed], in_proj_bias[embed : 2 * embed])
    v = F.linear(value, in_proj_weight[2 * embed :], in_proj_bias[2 * embed :])
    q = q.reshape(tgt_len, batch * num_heads, head_dim).transpose(0, 1) * (float(head_dim) ** -0.5)
    k = k.reshape(k.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * num_heads, head_dim).transpose(0, 1)
    scores = torch.bmm(q, k.transpose(1, 2))
    if key_padding_mask is not None:
        padding = key_padding_mask.view(batch, 1, 1, -1).expand(-1, num_heads, -1, -1)
        scores = scores.masked_fill(padding.reshape(batch * num_heads, 1, -1), float("-inf"))
    weights = fast_dropout(torch.softmax(scores, dim=-1), dropout, True)
    out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len, batch, embed)
    return F.linear(out, out_proj_weight, out_proj_bias)


def fast_dropout_applies(training: bool, p: float, x: Tensor) -> bool:
    """Whether a fused attention layer takes explicit_attention_fast_dropout: training with dropout on the CPU
    (never under TorchScript)."""
    return training and p > 0.0 and x.device.type == "cpu" and not torch.jit.is_scripting()


class FusedMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention (same parameters and state_dict) that returns no attention weights, so that torch runs
    it through scaled_dot_product_attention; in training with dropout on the CPU, explicit_attention_fast_dropout.
    The fast path swaps it in for the encoder's self-attention and the decoder's cross-attention."""

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        if attn_mask is None and not is_causal and fast_dropout_applies(self.training, self.dropout, query):
            assert self.in_proj_weight is not None and self.in_proj_bias is not None
            out = explicit_attention_fast_dropout(
                query,
                key,
                value,
                key_padding_mask,
                self.in_proj_weight,
                self.in_proj_bias,
                self.out_proj.weight,
                self.out_proj.bias,
                self.num_heads,
                self.dropout,
            )
            return out, None
        # What nn.MultiheadAttention (sequence-first) computes with need_weights=False.
        return F.multi_head_attention_forward(
            query,
            key,
            value,
            self.embed_dim,
            self.num_heads,
            self.in_proj_weight,
            self.in_proj_bias,
            self.bias_k,
            self.bias_v,
            self.add_zero_attn,
            self.dropout,
            self.out_proj.weight,
            self.out_proj.bias,
            training=self.training,
            key_padding_mask=key_padding_mask,
            need_weights=False,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )


def enable_fast_path(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Switch a DETR built by build_model (or any module holding its parts) to the fast path, in place; returns
    it. `channels_last`: also run the ResNet channels-last (faster on CPU and GPU; off only to measure)."""
    for module in model.modules():
        if isinstance(module, BackboneBase):
            fold_frozen_batch_norms(module.body)
            contiguous_weight_grad_convs(module.body)
            if channels_last:
                module.use_channels_last()
        elif isinstance(module, (TransformerEncoderLayer, TransformerDecoderLayer)):
            # The encoder's self-attention and the decoder's cross-attention, where nearly all of the attention's
            # time goes. The decoder's self-attention keeps the explicit path: over num_queries tokens it costs
            # nothing, and its noise gradients then stay the original's.
            attention = module.self_attn if isinstance(module, TransformerEncoderLayer) else module.multihead_attn
            attention.__class__ = FusedMultiheadAttention
            for name, child in list(module.named_children()):
                if type(child) is nn.Dropout:
                    setattr(module, name, FastDropout(child.p))
    return model


def adamw_options(device: torch.device, exact: bool = False) -> Dict[str, Any]:
    """Extra AdamW keyword arguments: fused=True (one kernel for the whole update) where this torch has a
    fused AdamW for `device`, nothing for the exact path or elsewhere (torch then picks its foreach kernel,
    as in the original). The fused update differs from the foreach one by float rounding only."""
    if exact or "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return {}
    try:
        # The check AdamW itself makes; it raises where the device has no fused kernel.
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
    except (RuntimeError, ValueError):
        return {}
    return {"fused": True}
