"""The fast path: the same model, faster, within float rounding of the bit-exact one.

`build_model` returns the bit-exact model: the original DETR's numbers to the last bit (the parity case).
`enable_fast_path(model)` makes the same model, with the same weights and state_dict, faster; main.py applies
it with --fast (off by default: over a whole run, Adam magnifies the rounding differences). What it changes,
each measured by tools/benchmark.py (docs/performance.md):

- every FrozenBatchNorm2d of the ResNet runs folded into the convolution before it (one pass over each
  activation instead of two; the folded weight is recomputed every forward, so training is unchanged);
- the ResNet runs channels-last, the layout oneDNN (CPU) and cuDNN prefer;
- the encoder's self-attention and the decoder's cross-attention run through scaled_dot_product_attention;
- in fp32 training on the CPU, the weight gradient of each 3x3 convolution of the ResNet with 128 input channels
  or more is computed from contiguous copies of its input and output gradient (ContiguousWeightGradConv2d):
  oneDNN's channels-last kernels for it run up to 3x slower on AVX2 (a stride-2 one: 106 ms against 33 ms with
  the copies);
- in training on the CPU, dropout masks come from transformer.fast_dropout (16 random bits per element,
  several times faster than torch's bernoulli_ there), in the attention weights and the transformer's layers.
  Dropout draws other random numbers than the exact path's, as any fused kernel's dropout does.

Results stay within float rounding of the exact path: outputs and losses within 1e-4, gradients within 1e-3
relative (tests/test_fast_path.py).
"""

import inspect
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import BackboneBase, fold_frozen_batch_norms
from .transformer import FastDropout, TransformerDecoderLayer, TransformerEncoderLayer


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


def _cpu_autocast_enabled() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch before 2.4 has no device argument
        return torch.is_autocast_cpu_enabled()


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
            and not _cpu_autocast_enabled()
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
            module.fused_attention = True
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
