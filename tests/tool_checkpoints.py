"""Checkpoints for the tests of the tools (predict.py, attention.py, export_onnx.py): tiny models saved in
main.py's checkpoint format, built in an instant instead of trained, optionally with heads fixed so that every
query predicts a known box and class."""
import math
from pathlib import Path
from typing import Optional, Sequence

import torch

import main as main_py
from conftest import tiny_flags
from models import build_model


def tiny_checkpoint(path, synthetic_root, *extra: str, num_classes: int = 6, seed: int = 0, box=None,
                    label: Optional[int] = None, thing_classes: Optional[Sequence[int]] = None) -> Path:
    """Save {'model', 'args'} of the tiny synthetic-dataset DETR (conftest.tiny_flags + `extra`) at `path`.

    With `box` (normalized cx, cy, w, h) and `label`, the heads are fixed: every query predicts that box and
    that class with a score of about 0.98, whatever the image."""
    args = main_py.parse_args(tiny_flags(synthetic_root, "", *extra))
    args.num_classes = num_classes  # what main.main sets before building the model
    if thing_classes is not None:
        args.thing_classes = list(thing_classes)
    torch.manual_seed(seed)
    model, _, _ = build_model(args)
    if box is not None:
        detr = model.detr if hasattr(model, "detr") else model
        with torch.no_grad():
            detr.class_embed.weight.zero_()
            detr.class_embed.bias.zero_()
            # Against the num_classes other logits (0): softmax score e^6 / (e^6 + 1) = 0.9975.
            detr.class_embed.bias[label] = 6.0 + math.log(num_classes)
            detr.bbox_embed.layers[-1].weight.zero_()
            detr.bbox_embed.layers[-1].bias.copy_(torch.logit(torch.tensor(box, dtype=torch.float32)))
    torch.save({"model": model.state_dict(), "args": args}, path)
    return Path(path)
