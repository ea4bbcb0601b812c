"""For the tests of the tools (tools/predict.py, tools/attention.py, tools/export_onnx.py, tools/plot_logs.py):
checkpoints of tiny models saved in main.py's checkpoint format, built in an instant instead of trained,
optionally with heads fixed so that every query predicts a known box and class; and a tool run as a command."""

import math
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import main as main_py
from helpers import REPO_ROOT, tiny_flags
from models import build_model


def tiny_checkpoint(
    path,
    synthetic_root,
    *extra: str,
    num_classes: int = 6,
    seed: int = 0,
    box=None,
    label: Optional[int] = None,
    thing_classes: Optional[Sequence[int]] = None,
) -> Path:
    """Save {'model', 'args'} of the tiny synthetic-dataset DETR (helpers.tiny_flags + `extra`) at `path`.

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


def run_tool(script: str, *argv, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    """`python tools/SCRIPT ARGV` as a user types it, in a process of its own started in `cwd`: from the repository
    root by the relative path, from any other folder by the absolute one (the script finds the code itself)."""
    path = Path("tools", script) if Path(cwd).resolve() == REPO_ROOT else REPO_ROOT / "tools" / script
    return subprocess.run(
        [sys.executable, str(path), *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
