"""Plain helpers of the tests (pytest fixtures and the session set-up live in conftest.py): the repository's
paths, the one tiny model and the flags built on it, running main.py in this process, reading checkpoints,
an oracle DETR with known outputs, and a guard against network access."""

import argparse
import contextlib
import hashlib
import io
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch
from torch import nn

import main as main_py
from util.checkpoint import safe_globals

REPO_ROOT = Path(__file__).resolve().parent.parent
# The spec data the parity and state-dict layout tests read: the published state_dict layouts and the parity case
# computed by the original DETR (test_spec_data.py checks the files against their SHA-256 list).
DATA_DIR = REPO_ROOT / "tests" / "data"
SPEC_DIR = DATA_DIR / "spec"

# The one tiny DETR for 2 shared CPU cores: width 32, 2 heads, 1 encoder and 2 decoder layers, no dropout.
# Every tiny configuration below (and the detectron2 wrapper's in test_d2.py, the mask head's in
# test_segmentation.py) builds on these sizes.
TINY_SIZES = dict(hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, dropout=0.0)
TINY_SIZE_FLAGS = [str(flag) for name, value in TINY_SIZES.items() for flag in (f"--{name}", value)]
# The mask head's group norms need hidden_dim + nheads and hidden_dim / 2..16 to be multiples of 8.
MASK_HEAD_SIZES = dict(hidden_dim=128, nheads=8)
MASK_HEAD_FLAGS = [str(flag) for name, value in MASK_HEAD_SIZES.items() for flag in (f"--{name}", value)]

# The flags of the original DETR's main.py (spec/CLI.md): all a checkpoint of it carries in 'args'.
ORIGINAL_FLAGS = (
    "lr",
    "lr_backbone",
    "batch_size",
    "weight_decay",
    "epochs",
    "lr_drop",
    "clip_max_norm",
    "frozen_weights",
    "backbone",
    "dilation",
    "position_embedding",
    "enc_layers",
    "dec_layers",
    "dim_feedforward",
    "hidden_dim",
    "dropout",
    "nheads",
    "num_queries",
    "pre_norm",
    "masks",
    "aux_loss",
    "set_cost_class",
    "set_cost_bbox",
    "set_cost_giou",
    "mask_loss_coef",
    "dice_loss_coef",
    "bbox_loss_coef",
    "giou_loss_coef",
    "eos_coef",
    "dataset_file",
    "coco_path",
    "coco_panoptic_path",
    "remove_difficult",
    "output_dir",
    "device",
    "seed",
    "resume",
    "start_epoch",
    "eval",
    "num_workers",
    "world_size",
    "dist_url",
)

# main.py's flags of the tiny model on its own: ResNet-18 without weights, 5 queries, on the CPU.
TINY_FLAGS = [
    "--device",
    "cpu",
    "--backbone",
    "resnet18",
    "--backbone_weights",
    "none",
    *TINY_SIZE_FLAGS,
    "--num_queries",
    "5",
]

# The session's synthetic dataset (conftest.synthetic_root): 16 training and 8 validation images of 64x64 pixels.
SYNTHETIC_SIZES = dict(seed=0, num_train=16, num_val=8, image_size=64)


def tiny_args(*extra: str):
    """main.py's parsed flags for the tiny model; `extra` flags are appended and override the defaults."""
    return main_py.get_args_parser().parse_args(TINY_FLAGS + list(extra))


def tiny_model(*extra: str, seed: int = 0):
    """(model, criterion, postprocessors) of build_model(tiny_args(*extra)), with a fixed seed."""
    from models import build_model

    torch.manual_seed(seed)
    return build_model(tiny_args(*extra))


def tiny_flags(root, output_dir="", *extra: str) -> List[str]:
    """main.py flags that train the tiny model for an epoch in seconds on the synthetic dataset at `root`:
    the tiny sizes with 8 queries (the synthetic recipe's backbone: ResNet-18 without weights)."""
    flags = [
        "--dataset_file",
        "synthetic",
        "--synthetic_path",
        str(root),
        "--synthetic_seed",
        str(SYNTHETIC_SIZES["seed"]),
        "--synthetic_train_size",
        str(SYNTHETIC_SIZES["num_train"]),
        "--synthetic_val_size",
        str(SYNTHETIC_SIZES["num_val"]),
        "--synthetic_image_size",
        str(SYNTHETIC_SIZES["image_size"]),
        *TINY_SIZE_FLAGS,
        "--num_queries",
        "8",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
        "--device",
        "cpu",
        "--no_amp",
        "--output_dir",
        str(output_dir),
        # The original's learned queries on the stride-32 map; tests/test_two_stage.py covers the others.
        "--no_two_stage",
        "--feature_stride",
        "32",
        # The recipe's width depends on the CPU kind (a half-width ResNet where --amp runs fp32): pinned, so that
        # every test runs the same model on every machine.
        "--backbone_width",
        "1",
    ]
    return flags + list(extra)


def run_main(argv: Sequence[str]):
    """main.main(main.parse_args(argv)) in this process; returns (what main returned, what it printed).
    What it printed is echoed if it raises, so that a failing test shows it."""
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
    with safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_detr_and_optimizer(args, seed: int = 0):
    """(model, criterion, postprocessors, optimizer) as main.py builds them from `args` (main.build_optimizer:
    AdamW over two parameter groups, the backbone's at --lr_backbone), with a fixed seed."""
    from models import build_model

    torch.manual_seed(seed)
    model, criterion, postprocessors = build_model(args)
    optimizer, _ = main_py.build_optimizer(model, args, torch.device(args.device))
    return model, criterion, postprocessors, optimizer


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


class NetworkUsed(RuntimeError):
    pass


def block_network(monkeypatch, hub_cache: bool = False) -> List[str]:
    """Make every way out (sockets, urllib, torch.hub downloads) raise; returns the list of attempts made.

    With hub_cache, torch.hub.load_state_dict_from_url stays usable for files already in torch.hub's cache
    (it only downloads what is missing, and downloads are blocked)."""
    attempts: List[str] = []

    def refuse(what):
        def _refuse(*args, **kwargs):
            attempts.append(f"{what}{args[:2]}")
            raise NetworkUsed(f"test tried to use the network: {what}{args[:2]}")

        return _refuse

    monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
    monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("socket.getaddrinfo"))
    monkeypatch.setattr(urllib.request, "urlopen", refuse("urllib.request.urlopen"))
    monkeypatch.setattr(torch.hub, "urlopen", refuse("torch.hub.urlopen"), raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("torch.hub.download_url_to_file"))
    if not hub_cache:
        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("torch.hub.load_state_dict_from_url"))
    return attempts


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Hugging Face transformers' DETR (tests/test_hf.py, tests/test_convert_hf.py) -----------------------------------

# Small transformer sizes that DetrConfig and the project's DETR both take (the mask head needs 128 and 8 heads).
HF_SMALL = dict(
    d_model=32,
    encoder_layers=1,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    num_queries=6,
    num_labels=5,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and batch-norm statistic drawn at random, so that no output is degenerate (a fresh model's
    zero biases and unit statistics would hide a swapped name)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith("running_var"):
                tensor.copy_(noise.abs() + 0.5)
            elif tensor.dim() == 1:
                tensor.add_(0.1 * noise)
            else:
                tensor.add_(0.02 * noise)
    return model


def import_transformers():
    """transformers and timm for the tests that compare with them; the calling module skips where they are missing,
    or where this transformers cannot run with this torch (transformers 5 needs torch 2.6; torch 2.4 and 2.5 take
    transformers 4)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("timm")
    if not transformers.is_torch_available():
        pytest.skip(
            f"transformers {transformers.__version__} does not run with torch {torch.__version__}",
            allow_module_level=True,
        )
    return transformers


def hf_folder(path: Path, segmentation: bool = False, seed: int = 0, **config) -> Path:
    """A random-weight transformers DETR saved by save_pretrained (timm's resnet18 unless `config` says else)."""
    settings = dict(HF_SMALL, use_pretrained_backbone=False, use_timm_backbone=True, backbone="resnet18")
    settings.update(config)
    torch.manual_seed(seed)
    import transformers  # a test dependency only (tests/test_hf.py skips without it)

    model_class = transformers.DetrForSegmentation if segmentation else transformers.DetrForObjectDetection
    randomize(model_class(transformers.DetrConfig(**settings)), seed).save_pretrained(str(path))
    return path


def tensorboard_scalars(log_dir) -> Dict[str, List[tuple]]:
    """{tag: [(step, value), ...]} of the event files under `log_dir`, as TensorBoard itself reads them (its
    EventAccumulator, which drops what a later writer's purge_step discards)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]
    }
