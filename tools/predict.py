"""Detect objects in your own images with a trained DETR: a picture per image and COCO-format results.

    python tools/predict.py --resume outputs/synthetic/checkpoint.pth data/synthetic/val2017 --output_dir predictions
    python tools/predict.py --hub detr_resnet50 --pretrained detr-r50-e632da11.pth photo.jpg --output_dir predictions

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
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, wherever this runs from

from tools.detector import Detector, add_model_source_args, list_images, load_detector, read_image
from util.misc import choose_device
from util.panoptic import rgb2id
from util.visualize import save_detections_picture, save_panoptic_picture

PROG = "tools/predict.py"


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
            own = {
                "pred_logits": outputs["pred_logits"][i : i + 1],
                "pred_masks": masks[i : i + 1, :, :mask_h, :mask_w],
            }
            panoptic = detector.postprocessors["panoptic"](own, [(h, w)], [(image.height, image.width)])[0]
            with Image.open(io.BytesIO(panoptic["png_string"])) as png:
                results[i]["segment_ids"] = rgb2id(np.asarray(png.convert("RGB")))
            results[i]["segments_info"] = panoptic["segments_info"]
    return results


# ----------------------------------------------------------------------------------------------------------
# Files out


def image_ids(paths: Sequence[Path], annotations: Optional[Path] = None) -> List[int]:
    """COCO image ids: those the annotation file `annotations` gives the files' names; without one, the numbers
    the files are named by when all are (and differ), else 0, 1, 2, ..."""
    if annotations is not None:
        try:
            listed = {
                Path(image["file_name"]).name: int(image["id"])
                for image in json.loads(Path(annotations).read_text())["images"]
            }
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"cannot read image ids from {annotations}: {type(e).__name__}: {e}; it must be a "
                "COCO-format JSON file with 'images': [{'id', 'file_name'}, ...]"
            ) from e
        missing = [p.name for p in paths if p.name not in listed]
        if missing:
            raise ValueError(
                f"{len(missing)} image(s) are not among the images of --annotations {annotations}, "
                f"e.g. {missing[0]}; leave --annotations out to number the images instead"
            )
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
    for (x0, y0, x1, y1), label, score in zip(
        detections["boxes"].tolist(), detections["labels"].tolist(), detections["scores"].tolist()
    ):
        results.append(
            {
                "image_id": image_id,
                "category_id": int(label),
                "bbox": [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)],
                "score": round(score, 5),
            }
        )
    return results


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        PROG, description="Draw DETR's detections on images and write them in COCO results format."
    )
    parser.add_argument("images", nargs="+", help="image files and/or folders of images")
    add_model_source_args(parser)
    parser.add_argument("--output_dir", default="predictions", help="where pictures and results.json go")
    parser.add_argument("--threshold", default=0.7, type=float, help="keep detections scoring above this")
    parser.add_argument("--batch_size", default=4, type=int, help="images per forward pass")
    parser.add_argument(
        "--size",
        default=None,
        type=int,
        help="resize the shorter side to this (default: as the model's validation images)",
    )
    parser.add_argument(
        "--annotations",
        default=None,
        help="a COCO-format annotation file: its categories name the classes and its images give "
        "each image's id by file name (default: the names of the checkpoint's dataset, or "
        "COCO's for COCO models; ids from the file names)",
    )
    parser.add_argument("--device", default="cuda", help="falls back to the CPU when CUDA is absent")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.batch_size < 1:
        raise SystemExit(f"{PROG}: --batch_size must be at least 1") from None
    try:
        paths = list_images(args.images)  # before the model is built: a typo fails at once
        ids = image_ids(paths, args.annotations)
        detector = load_detector(
            args.resume, args.hub, args.pretrained, choose_device(args.device), args.size, args.annotations
        )
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None

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
            save_detections_picture(
                image,
                found["boxes"],
                found["labels"],
                found["scores"],
                detector.names,
                output_dir / f"{names[i]}_detections.png",
            )
            if "segment_ids" in found:
                save_panoptic_picture(
                    image,
                    found["segment_ids"],
                    found["segments_info"],
                    detector.names,
                    output_dir / f"{names[i]}_panoptic.png",
                )
            results += coco_results(ids[i], found)
            images.append({"id": ids[i], "file_name": str(paths[i]), "height": image.height, "width": image.width})
        done, elapsed = min(first + args.batch_size, len(paths)), time.time() - start
        print(
            f"[{done}/{len(paths)}] {elapsed:.1f}s, about {elapsed / done * (len(paths) - done):.0f}s left", flush=True
        )

    (output_dir / "results.json").write_text(json.dumps(results))
    (output_dir / "images.json").write_text(json.dumps(images, indent=1))
    print(
        f"{len(images)} image(s), {len(results)} detection(s) scoring above {args.threshold}: pictures, "
        f"results.json and images.json in {output_dir}"
    )
    if failures:
        print(f"{len(failures)} image(s) could not be read and were skipped:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
    return 0 if images else 1


if __name__ == "__main__":
    sys.exit(main())
