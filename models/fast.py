"""The fast path: the same model, faster, within float rounding of the bit-exact one.

`build_model` returns the bit-exact model: the original DETR's numbers to the last bit (the parity case).
`enable_fast_path(model)` makes the same model, with the same weights and state_dict, faster; main.py applies
it with --fast (off by default: over a whole run, Adam magnifies the rounding differences). What it changes,
each measured by tools/benchmark.py (docs/performance.md):

- every FrozenBatchNorm2d of the ResNet runs folded into the convolution before it (one pass over each
  activation instead of two; the folded weight is recomputed every forward, so training is unchanged);
- the ResNet runs channels-last, the layout oneDNN (CPU) and cuDNN prefer;
- the encoder's self-attention and the decoder's cross-attention run through scaled_dot_product_attention;
- in training on the CPU, dropout masks come from transformer.fast_dropout (16 random bits per element,
  several times faster than torch's bernoulli_ there), in the attention weights and the transformer's layers.
  Dropout draws other random numbers than the exact path's, as any fused kernel's dropout does.

Results stay within float rounding of the exact path: outputs and losses within 1e-4, gradients within 1e-3
relative (tests/test_fast_path.py).
"""

import inspect
from typing import Any, Dict

import torch
from torch import nn

from .backbone import BackboneBase, fold_frozen_batch_norms
from .transformer import FastDropout, TransformerDecoderLayer, TransformerEncoderLayer


def enable_fast_path(model: nn.Module, channels_last: bool = True) -> nn.Module:
    """Switch a DETR built by build_model (or any module holding its parts) to the fast path, in place; returns
    it. `channels_last`: also run the ResNet channels-last (faster on CPU and GPU; off only to measure)."""
    for module in model.modules():
        if isinstance(module, BackboneBase):
            fold_frozen_batch_norms(module.body)
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
