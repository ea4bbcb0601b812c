"""Shared by the tests: one CPU thread, a tiny synthetic dataset made once per session, and running main.py
in this process on a tiny configuration."""
import argparse
import contextlib
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import Dict, List, Sequence

# Set before torch starts any thread pool, and inherited by the processes the tests start (torchrun, spawn).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

# The tests' models are tiny; on a shared 2-core machine a second thread makes small ops ~50x slower as the
# OpenMP threads spin-wait on each other.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent

# The session's synthetic dataset: 16 training and 8 validation images of 64x64 pixels.
SYNTHETIC_SIZES = dict(seed=0, num_train=16, num_val=8, image_size=64)


def tiny_flags(root, output_dir="", *extra: str) -> List[str]:
    """main.py flags of a DETR small enough to train an epoch in seconds on the synthetic dataset at `root`."""
    flags = ["--dataset_file", "synthetic", "--synthetic_path", str(root),
             "--synthetic_seed", str(SYNTHETIC_SIZES["seed"]),
             "--synthetic_train_size", str(SYNTHETIC_SIZES["num_train"]),
             "--synthetic_val_size", str(SYNTHETIC_SIZES["num_val"]),
             "--synthetic_image_size", str(SYNTHETIC_SIZES["image_size"]),
             "--hidden_dim", "32", "--nheads", "2", "--dim_feedforward", "64", "--enc_layers", "1",
             "--dec_layers", "2", "--num_queries", "8", "--batch_size", "4", "--num_workers", "0",
             "--dropout", "0", "--device", "cpu", "--no_amp", "--output_dir", str(output_dir),
             # The original's learned queries on the stride-32 map; tests/test_two_stage.py covers the others.
             "--no_two_stage", "--feature_stride", "32"]
    return flags + list(extra)


def run_main(argv: Sequence[str]):
    """main.main(main.parse_args(argv)) in this process; returns (what main returned, what it printed).
    What it printed is echoed if it raises, so that a failing test shows it."""
    import main as main_py

    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            result = main_py.main(main_py.parse_args(argv))
    except BaseException:
        sys.stdout.write(out.getvalue()[-5000:])
        raise
    return result, out.getvalue()


def load_checkpoint_safely(path):
    """A checkpoint as a careful user loads it: torch.load(weights_only=True), no code from the file, only
    the argparse.Namespace of 'args' allowed beyond tensors and containers."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_detr_and_optimizer(args, seed: int = 0):
    """(model, criterion, postprocessors, optimizer) as main.py builds them from `args`, with a fixed seed:
    AdamW over two parameter groups, the backbone's at --lr_backbone."""
    from models import build_model

    torch.manual_seed(seed)
    model, criterion, postprocessors = build_model(args)
    groups = [{"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
              {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad],
               "lr": args.lr_backbone}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    return model, criterion, postprocessors, optimizer


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    from datasets import synthetic
    return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", **SYNTHETIC_SIZES)


class OracleDETR(nn.Module):
    """A stand-in for DETR with fixed outputs: for every image of `dataset` it "predicts" the image's ground
    truth boxes (moved by up to `noise` of the image side) with confident class scores, and "no object" for the
    remaining queries. Images are recognised by their bytes, so evaluation results are known in advance."""

    def __init__(self, dataset, num_classes: int, num_queries: int = 8, noise: float = 0.0, seed: int = 0):
        super().__init__()
        self.num_classes, self.num_queries = num_classes, num_queries
        self.answers: Dict[str, tuple] = {}
        generator = torch.Generator().manual_seed(seed)
        for i in range(len(dataset)):
            image, target = dataset[i]
            boxes, labels = target["boxes"], target["labels"]
            n = len(labels)
            assert n <= num_queries
            logits = torch.full((num_queries, num_classes + 1), -5.0)
            logits[:, -1] = 5.0
            # Confidences differ per object so that the precision/recall curve has a real order.
            logits[torch.arange(n), labels] = 6.0 + torch.rand(n, generator=generator)
            logits[torch.arange(n), -1] = -5.0
            pred_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(num_queries, 1)
            pred_boxes[:n] = (boxes + noise * (2 * torch.rand(boxes.shape, generator=generator) - 1)).clamp(0.01, 1)
            self.answers[self.key(image)] = (logits, pred_boxes)

    @staticmethod
    def key(image: torch.Tensor) -> str:
        return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()

    def forward(self, samples):
        images = samples.tensors
        # The oracle's images all have the dataset's one size, so a batch holds them unpadded.
        logits, boxes = zip(*[self.answers[self.key(image)] for image in images])
        return {"pred_logits": torch.stack(logits), "pred_boxes": torch.stack(boxes)}
