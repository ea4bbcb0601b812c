"""Detect objects in your own images with a trained DETR: a picture per image and COCO-format results.

    python predict.py --resume outputs/synthetic/checkpoint.pth data/synthetic/val2017 --output_dir predictions
    python predict.py --hub detr_resnet50 --pretrained detr-r50-e632da11.pth photo.jpg --output_dir predictions

The model is rebuilt from the flags stored in a main.py checkpoint (its `args`), or taken from a torch.hub entry
point of hubconf.py. Each image is resized and normalized as the model's validation images were (shorter side
800 for COCO models, the native size for the synthetic dataset; --size overrides), images of different sizes
are batched together (the model pads them), and the detections scoring above --threshold are kept.
Written to --output_dir:

    <name>_detections.png   the image with boxes, class names and scores
    <name>_panoptic.png     panoptic models only: the image tinted by segment, with a legend
    results.json            COCO detection results [{image_id, category_id, bbox: [x, y, w, h], score}], in
                            pixels of the image as given; pycocotools' COCO.loadRes reads it
    images.json             [{id, file_name, height, width}]: which file each image_id is

image_id is, with --annotations FILE (a COCO-format annotation file), the id FILE gives the image's file name,
so that results.json evaluates against FILE; otherwise the number a file is named by (COCO's
000000000139.jpg is 139) when every file is named by a distinct number, else the image's position in the list
(0, 1, ...). Class names come from --annotations, else from the annotation files of the checkpoint's dataset
when they are at hand, else from COCO's category table for COCO models.

A path that does not exist, or a folder without images, stops the run before anything is computed. An image
that cannot be decoded is reported and skipped: the others are still processed, the run ends with the list of
skipped images and exits with status 0 if at least one image was processed (1 if none was).
"""
import argparse
import io
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

import hubconf
from datasets import transforms as T
from datasets.coco import IMAGENET_MEAN, IMAGENET_STD, make_coco_transforms
from datasets.synthetic import STUFF_IDS, THING_IDS, make_synthetic_transforms
from main import choose_device, get_args_parser as main_args_parser
from models import build_model
from models.detr import PostProcess
from util.checkpoint import load_checkpoint, load_state_dict_checked, model_state_from
from util.panoptic import rgb2id
from util.visualize import COCO_NAMES, COCO_PANOPTIC_STUFF_NAMES, save_detections_picture, save_panoptic_picture

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


# ----------------------------------------------------------------------------------------------------------
# The model

def checkpoint_args(checkpoint, state: Dict[str, torch.Tensor], source: str) -> argparse.Namespace:
    """main.py's flags a checkpoint was trained with: its 'args' laid over today's defaults (older checkpoints
    lack newer flags), with the class count read from the weights when the flags leave it open."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("args"), argparse.Namespace):
        raise ValueError(f"{source} carries no 'args' (main.py's flags) to rebuild its model from; for a "
                         f"published DETR checkpoint use --hub NAME --pretrained {source}")
    args = main_args_parser().parse_args([])
    vars(args).update(vars(checkpoint["args"]))
    if args.num_classes is None:
        for key in ("class_embed.bias", "detr.class_embed.bias"):
            if key in state:
                args.num_classes = state[key].shape[0] - 1  # the head has one more class: "no object"
    args.backbone_weights = "none"  # the checkpoint holds the backbone's weights: nothing to download
    args.frozen_weights = None
    return args


def names_from_annotations(ann_file: Path) -> Dict[int, str]:
    """{category id: name} of a COCO-format annotation file (instances or panoptic)."""
    try:
        categories = json.loads(Path(ann_file).read_text())["categories"]
        return {int(c["id"]): str(c["name"]) for c in categories}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read category names from {ann_file}: {type(e).__name__}: {e}; it must be a "
                         "COCO-format JSON file with 'categories': [{'id', 'name'}, ...]") from e


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
    return T.Compose([T.RandomResize([size], max_size=MAX_SIZE), T.ToTensor(), T.Normalize(IMAGENET_MEAN,
                                                                                             IMAGENET_STD)])


def load_detector(resume: Optional[str] = None, hub: Optional[str] = None, pretrained: Optional[str] = None,
                  device="cpu", size: Optional[int] = None, annotations: Optional[str] = None) -> Detector:
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
        names = dataset_names(args)
    else:
        if hub not in HUB_ENTRIES:
            raise ValueError(f"--hub {hub!r} is not an entry point of hubconf.py; choose one of "
                             f"{', '.join(HUB_ENTRIES)}")
        if not pretrained:
            print(f"--hub {hub} without --pretrained: the model has random weights (give the path of "
                  f"{hubconf.URLS[hub].rsplit('/', 1)[-1]}, or its URL to download it)")
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


@torch.no_grad()
def detect(detector: Detector, images: Sequence[Image.Image], threshold: float) -> List[dict]:
    """Run the model on a batch of PIL images of any sizes. Per image: 'scores', 'labels' and 'boxes' (xyxy, in
    pixels of the image as given) of the detections scoring above `threshold`; for panoptic models also
    'segment_ids' [H, W] (a segment id per pixel) and 'segments_info'."""
    tensors = [detector.transform(image, None)[0].to(detector.device) for image in images]
    outputs = detector.model(tensors)
    original_sizes = torch.tensor([[image.height, image.width] for image in images], device=detector.device)
    results = []
    for result in detector.postprocessors["bbox"](outputs, original_sizes):
        keep = result["scores"] > threshold
        results.append({k: v[keep].cpu() for k, v in result.items()})
    if "panoptic" in detector.postprocessors:
        masks = outputs["pred_masks"]
        padded_h, padded_w = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
        for i, (tensor, image) in enumerate(zip(tensors, images)):
            # The masks cover the padded batch: give the post-processor this image's part only.
            h, w = tensor.shape[-2:]
            mask_h = math.ceil(h * masks.shape[-2] / padded_h)
            mask_w = math.ceil(w * masks.shape[-1] / padded_w)
            own = {"pred_logits": outputs["pred_logits"][i:i + 1], "pred_masks": masks[i:i + 1, :, :mask_h, :mask_w]}
            panoptic = detector.postprocessors["panoptic"](own, [(h, w)], [(image.height, image.width)])[0]
            with Image.open(io.BytesIO(panoptic["png_string"])) as png:
                results[i]["segment_ids"] = rgb2id(np.asarray(png.convert("RGB")))
            results[i]["segments_info"] = panoptic["segments_info"]
    return results


# ----------------------------------------------------------------------------------------------------------
# Images in, files out

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


def image_ids(paths: Sequence[Path], annotations: Optional[Path] = None) -> List[int]:
    """COCO image ids: those the annotation file `annotations` gives the files' names; without one, the numbers
    the files are named by when all are (and differ), else 0, 1, 2, ..."""
    if annotations is not None:
        try:
            listed = {Path(image["file_name"]).name: int(image["id"])
                      for image in json.loads(Path(annotations).read_text())["images"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read image ids from {annotations}: {type(e).__name__}: {e}; it must be a "
                             "COCO-format JSON file with 'images': [{'id', 'file_name'}, ...]") from e
        missing = [p.name for p in paths if p.name not in listed]
        if missing:
            raise ValueError(f"{len(missing)} image(s) are not among the images of --annotations {annotations}, "
                             f"e.g. {missing[0]}; leave --annotations out to number the images instead")
        return [listed[p.name] for p in paths]
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
        return [int(s) for s in stems]
    return list(range(len(paths)))


def output_names(paths: Sequence[Path]) -> List[str]:
    """A distinct name per image for its pictures: the file's stem, prefixed by its position when two
    inputs share a stem (a.jpg and a.png, or files of two folders)."""
    stems = [p.stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{i:05d}_{s}" for i, s in enumerate(stems)]


def coco_results(image_id: int, detections: dict) -> List[dict]:
    """COCO detection results of one image: bbox as [x, y, width, height] in pixels."""
    results = []
    for (x0, y0, x1, y1), label, score in zip(detections["boxes"].tolist(), detections["labels"].tolist(),
                                              detections["scores"].tolist()):
        results.append({"image_id": image_id, "category_id": int(label),
                        "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                        "score": round(score, 5)})
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "predict.py", description="Draw DETR's detections on images and write them in COCO results format.")
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--resume", help="a checkpoint written by main.py (path or URL)")
    source.add_argument("--hub", help=f"a torch.hub entry point of hubconf.py: {', '.join(HUB_ENTRIES)}")
    parser.add_argument("--pretrained", help="with --hub: its published checkpoint (path, or URL to download); "
                                             "without it the hub model has random weights")
    parser.add_argument("--output_dir", default="predictions", help="where pictures and results.json go")
    parser.add_argument("--threshold", default=0.7, type=float, help="keep detections scoring above this")
    parser.add_argument("--batch_size", default=4, type=int, help="images per forward pass")
    parser.add_argument("--size", default=None, type=int,
                        help="resize the shorter side to this (default: as the model's validation images)")
    parser.add_argument("--annotations", default=None,
                        help="a COCO-format annotation file: its categories name the classes and its images give "
                             "each image's id by file name (default: the names of the checkpoint's dataset, or "
                             "COCO's for COCO models; ids from the file names)")
    parser.add_argument("--device", default="cuda", help="falls back to the CPU when CUDA is absent")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit("predict.py: --batch_size must be at least 1")
    try:
        paths = list_images(args.images)  # before the model is built: a typo fails at once
        ids = image_ids(paths, args.annotations)
        detector = load_detector(args.resume, args.hub, args.pretrained, choose_device(args.device), args.size,
                                 args.annotations)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"predict.py: error: {e}")

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = output_names(paths)
    results, images, failures = [], [], []
    start = time.time()
    for first in range(0, len(paths), args.batch_size):
        batch = []
        for i in range(first, min(first + args.batch_size, len(paths))):
            try:
                batch.append((i, read_image(paths[i])))
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                failures.append(f"{paths[i]}: {e}")
                print(f"cannot read {paths[i]}, skipped: {e}", file=sys.stderr)
        detections = detect(detector, [image for _, image in batch], args.threshold) if batch else []
        for (i, image), found in zip(batch, detections):
            save_detections_picture(image, found["boxes"], found["labels"], found["scores"], detector.names,
                                    output_dir / f"{names[i]}_detections.png")
            if "segment_ids" in found:
                save_panoptic_picture(image, found["segment_ids"], found["segments_info"], detector.names,
                                      output_dir / f"{names[i]}_panoptic.png")
            results += coco_results(ids[i], found)
            images.append({"id": ids[i], "file_name": str(paths[i]), "height": image.height, "width": image.width})
        done, elapsed = min(first + args.batch_size, len(paths)), time.time() - start
        print(f"[{done}/{len(paths)}] {elapsed:.1f}s, about {elapsed / done * (len(paths) - done):.0f}s left",
              flush=True)

    (output_dir / "results.json").write_text(json.dumps(results))
    (output_dir / "images.json").write_text(json.dumps(images, indent=1))
    print(f"{len(images)} image(s), {len(results)} detection(s) scoring above {args.threshold}: pictures, "
          f"results.json and images.json in {output_dir}")
    if failures:
        print(f"{len(failures)} image(s) could not be read and were skipped:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
