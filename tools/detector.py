"""What the tools share: a DETR ready for inference, from a main.py checkpoint or a torch.hub entry point of
hubconf.py, and the images to run it on.

    detector = load_detector(resume="outputs/synthetic/checkpoint.pth", device="cpu")
    images = [read_image(path) for path in list_images(["photo.jpg", "folder/"])]

A module of the tools package, not a script: tools/predict.py, tools/attention.py and tools/export_onnx.py
import it, and it imports none of them, nor main.py: a checkpoint's flags are completed with main.py's defaults by
util.config.complete_args.
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from PIL import Image, ImageOps

import hubconf
from datasets import transforms as T
from datasets.coco import IMAGENET_MEAN, IMAGENET_STD, make_coco_transforms
from datasets.synthetic import STUFF_IDS, THING_IDS, make_synthetic_transforms
from models import build_model
from models.train_only import deployed_args
from models.detr import PostProcess
from util.checkpoint import load_checkpoint, load_state_dict_checked, model_state_from
from util.config import complete_args
from util.visualize import COCO_NAMES, COCO_PANOPTIC_STUFF_NAMES

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
HUB_ENTRIES = tuple(hubconf.URLS)  # every entry point of hubconf.py has a published checkpoint
MAX_SIZE = 1333  # longer-side cap of --size, as in COCO evaluation


@dataclass
class Detector:
    """A DETR ready for inference on PIL images, with what it takes to read its outputs."""

    model: torch.nn.Module
    postprocessors: Dict[str, torch.nn.Module]  # 'bbox', plus 'panoptic' for panoptic models
    transform: T.Compose  # (PIL image, None) -> (normalized tensor, None), as the model's validation images
    names: Dict[int, str]  # category id -> name; ids without a name are shown as numbers
    device: torch.device


def add_model_source_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say which model a tool runs: --resume CHECKPOINT, or --hub NAME with --pretrained."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--resume", help="a checkpoint written by main.py (path or URL), or a Hugging Face DETR model folder"
    )
    source.add_argument("--hub", help=f"a torch.hub entry point of hubconf.py: {', '.join(HUB_ENTRIES)}")
    parser.add_argument(
        "--pretrained",
        help="with --hub: its published checkpoint (path, or URL to download); "
        "without it the hub model has random weights",
    )


# ----------------------------------------------------------------------------------------------------------
# The model


def checkpoint_args(checkpoint, state: Dict[str, torch.Tensor], source: str) -> argparse.Namespace:
    """main.py's flags a checkpoint was trained with: its 'args', with main.py's defaults for the flags it
    predates, and the class count read from the weights when the flags leave it open."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("args"), argparse.Namespace):
        raise ValueError(
            f"{source} carries no 'args' (main.py's flags) to rebuild its model from; for a "
            f"published DETR checkpoint use --hub NAME --pretrained {source}"
        )
    # A checkpoint's 'args' lack the flags added after it was written (one of the original DETR, all of this
    # project's): main.py's defaults build what it was trained with, the original's model.
    args = complete_args(checkpoint["args"])
    if args.num_classes is None:
        for key in ("class_embed.bias", "detr.class_embed.bias"):
            if key in state:
                args.num_classes = state[key].shape[0] - 1  # the head has one more class: "no object"
    args.backbone_weights = "none"  # the checkpoint holds the backbone's weights: nothing to download
    args.frozen_weights = None
    # The model it deploys: with training-only supervision (models/train_only.py) on, a plain DETR all the same.
    return deployed_args(args)


def names_from_annotations(ann_file: Path) -> Dict[int, str]:
    """{category id: name} of a COCO-format annotation file (instances or panoptic)."""
    try:
        categories = json.loads(Path(ann_file).read_text())["categories"]
        return {int(c["id"]): str(c["name"]) for c in categories}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"cannot read category names from {ann_file}: {type(e).__name__}: {e}; it must be a "
            "COCO-format JSON file with 'categories': [{'id', 'name'}, ...]"
        ) from e


def dataset_names(args) -> Dict[int, str]:
    """{category id: name} of the dataset a checkpoint was trained on: from its validation annotations when
    they are on this machine, else the built-in tables of COCO (for 91 / 250-class COCO models) and of the
    synthetic dataset; {} when none applies."""
    kind = args.dataset_file
    root = args.coco_panoptic_path if kind == "coco_panoptic" else args.coco_path
    if kind in ("synthetic", "synthetic_panoptic") and not root:
        root = args.synthetic_path
    prefix = "panoptic" if kind.endswith("panoptic") else "instances"
    ann_file = Path(root) / "annotations" / f"{prefix}_val2017.json" if root else None
    if ann_file is not None and ann_file.is_file():
        return names_from_annotations(ann_file)
    if kind == "coco" and args.num_classes == 91:
        return dict(COCO_NAMES)
    if kind == "coco_panoptic" and args.num_classes == 250:
        return {**COCO_NAMES, **COCO_PANOPTIC_STUFF_NAMES}
    if kind in ("synthetic", "synthetic_panoptic"):
        return {i: name for name, i in {**THING_IDS, **STUFF_IDS}.items()}
    return {}


def resize_transform(size: int) -> T.Compose:
    """Shorter side to `size` (longer side at most MAX_SIZE), then ImageNet normalization."""
    return T.Compose(
        [T.RandomResize([size], max_size=MAX_SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )


def load_detector(
    resume: Optional[str] = None,
    hub: Optional[str] = None,
    pretrained: Optional[str] = None,
    device="cpu",
    size: Optional[int] = None,
    annotations: Optional[str] = None,
) -> Detector:
    """The model of a main.py checkpoint (`resume`) or of a hubconf.py entry point (`hub`, with the weights of
    the checkpoint file `pretrained`, random ones without), in eval mode on `device`. `size` overrides the
    input resolution; the categories of `annotations`, a COCO-format JSON file, override the class names."""
    device = torch.device(device)
    if (resume is None) == (hub is None):
        raise ValueError("give either --resume CHECKPOINT or --hub NAME")
    if pretrained and not hub:
        raise ValueError("--pretrained goes with --hub; a main.py checkpoint is given with --resume")
    if resume is not None:
        checkpoint = load_checkpoint(resume)
        state = model_state_from(checkpoint, resume)
        args = checkpoint_args(checkpoint, state, resume)
        args.device = str(device)
        model, _, postprocessors = build_model(args)
        load_state_dict_checked(model, state, f"--resume {resume}")
        postprocessors = {k: v for k, v in postprocessors.items() if k in ("bbox", "panoptic")}
        if args.dataset_file in ("synthetic", "synthetic_panoptic"):
            transform = make_synthetic_transforms("val", args.synthetic_image_size)
        else:
            transform = make_coco_transforms("val")
        # A Hugging Face folder's id2label (util/hf.py) names its classes.
        names = checkpoint.get("class_names") or dataset_names(args)
    else:
        if hub not in HUB_ENTRIES:
            raise ValueError(
                f"--hub {hub!r} is not an entry point of hubconf.py; choose one of {', '.join(HUB_ENTRIES)}"
            )
        if not pretrained:
            print(
                f"--hub {hub} without --pretrained: the model has random weights (give the path of "
                f"{hubconf.URLS[hub].rsplit('/', 1)[-1]}, or its URL to download it)"
            )
        model, postprocessor = getattr(hubconf, hub)(pretrained=pretrained or False, return_postprocessor=True)
        panoptic = hub.endswith("_panoptic")
        postprocessors = {"bbox": PostProcess(), "panoptic": postprocessor} if panoptic else {"bbox": postprocessor}
        transform = make_coco_transforms("val")
        names = {**COCO_NAMES, **COCO_PANOPTIC_STUFF_NAMES} if panoptic else dict(COCO_NAMES)
    if size is not None:
        transform = resize_transform(size)
    if annotations is not None:
        names = names_from_annotations(Path(annotations))
    model.to(device).eval()
    return Detector(model, postprocessors, transform, names, device)


# ----------------------------------------------------------------------------------------------------------
# The images


def list_images(inputs: Sequence[str]) -> List[Path]:
    """The image files named by `inputs`: files as given, folders by their image files (sorted, not
    recursive). A missing path or a folder without images raises."""
    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no images (looked for {' '.join(IMAGE_SUFFIXES)})")
            paths += found
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return paths


def read_image(path: Path) -> Image.Image:
    """The image at `path` in RGB, turned upright by its EXIF orientation (as image viewers show it)."""
    with Image.open(path) as f:
        return ImageOps.exif_transpose(f).convert("RGB")
