"""For the tests of the tools (tools/predict.py, tools/attention.py, tools/export_onnx.py, tools/plot_logs.py,
tools/convert_hf.py): checkpoints of tiny models saved in main.py's checkpoint format, built in an instant instead of
trained, optionally with heads fixed so that every query predicts a known box and class; a checkpoint of the
synthetic demo's plain DETR after two training steps; and a tool run as a command."""

import math
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

import main as main_py
from helpers import REPO_ROOT, tiny_flags
from models import build_model
from util.misc import nested_tensor_from_tensor_list


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
    args.num_classes = num_classes  # what main.main builds the model with (the data decides it)
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


# The architecture of the synthetic demo's plain DETR (the learned queries of the original on ResNet-18's stride-32
# map, batch norms trained from scratch), as main.py's flags; the demo adds --backbone_width 0.5 on CPUs without
# bfloat16.
DEMO_FLAGS = [
    "--dataset_file",
    "synthetic",
    "--backbone",
    "resnet18",
    "--backbone_norm",
    "batch",
    "--backbone_weights",
    "none",
    "--hidden_dim",
    "128",
    "--nheads",
    "8",
    "--enc_layers",
    "2",
    "--dec_layers",
    "3",
    "--dim_feedforward",
    "512",
    "--num_queries",
    "20",
    "--dropout",
    "0.0",
    "--no_two_stage",
    "--device",
    "cpu",
]


def demo_checkpoint(path, synthetic_path, *extra: str, steps: int = 2, seed: int = 0) -> Path:
    """Save {'model', 'args'} of the demo's DETR (DEMO_FLAGS + `extra`, 6 classes) at `path`, as main.py saves it,
    after `steps` SGD steps on random 64x64 images: the batch norms' running statistics and num_batches_tracked
    then hold what training left there, not their initial values. `synthetic_path` goes into the args (where the
    tools look for the class names)."""
    args = main_py.get_args_parser().parse_args(DEMO_FLAGS + ["--synthetic_path", str(synthetic_path), *extra])
    args.num_classes = 6  # what main.main builds the model with, from the synthetic dataset
    torch.manual_seed(seed)
    model, criterion, _ = build_model(args)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        images = [torch.randn(3, 64, 64, generator=generator) for _ in range(2)]
        targets = [
            {
                "labels": torch.randint(0, 6, (2,), generator=generator),
                "boxes": 0.2 + 0.5 * torch.rand(2, 4, generator=generator),
            }
            for _ in images
        ]
        losses = criterion(model(nested_tensor_from_tensor_list(images)), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.save({"model": model.state_dict(), "args": args}, path)
    return Path(path)


def run_tool(script: str, *argv, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    """`python tools/SCRIPT ARGV` as a user types it, in a process of its own started in `cwd`: from the repository
    root by the relative path, from any other folder by the absolute one (the script finds the code itself)."""
    path = Path("tools", script) if Path(cwd).resolve() == REPO_ROOT else REPO_ROOT / "tools" / script
    return subprocess.run(
        [sys.executable, str(path), *map(str, argv)], cwd=cwd, capture_output=True, text=True, timeout=600
    )
