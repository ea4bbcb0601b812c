"""An exponential moving average of a model's weights (--ema_decay)."""

import argparse
import copy
from typing import Optional

import torch
from torch import nn

from util.checkpoint import load_state_dict_checked


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    """The weight-averaging flag, in its argument group; the default keeps the original's weights."""
    group = parser.add_argument_group("Weight averaging (util/ema.py)")
    group.add_argument(
        "--ema_decay",
        default=0.0,
        type=float,
        help="evaluate and save a moving average of the weights with this decay per step (e.g. "
        "0.998); 0 keeps the original's weights (docs/flags.md)",
    )


class ModelEMA:
    """A copy of `model` whose parameters and floating buffers (batch-norm statistics) follow the model's as an
    exponential moving average: after each optimizer step, ema = d * ema + (1 - d) * weights. The decay d starts
    low and rises to `decay` ((1 + n) / (10 + n) after n updates), so the first steps are not tied to the random
    initialization. The average changes nothing in training; it is what gets evaluated and saved."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema_decay must lie strictly between 0 and 1, got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for averaged, current in zip(self.module.state_dict().values(), model.state_dict().values()):
            if averaged.is_floating_point():
                averaged.lerp_(current.detach(), 1.0 - d)
            else:  # integer buffers (num_batches_tracked) are copied
                averaged.copy_(current)


def build_ema(model, resumed: Optional[dict], resume: str, args) -> Optional[ModelEMA]:
    """The weights' moving average with --ema_decay (continued from a --resume checkpoint), else None."""
    if args.ema_decay <= 0 or args.eval:
        return None
    ema = ModelEMA(model, args.ema_decay)
    if resumed is not None and "train_model" in resumed:
        load_state_dict_checked(ema.module, resumed["model"], f"--resume {resume}")
        ema.updates = resumed["ema_updates"]
    return ema
