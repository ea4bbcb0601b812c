"""COCO object detection (and instance segmentation) dataset.

Layout expected under --coco_path (as distributed by cocodataset.org):
    train2017/*.jpg   val2017/*.jpg   annotations/instances_{train,val}2017.json
Targets hold boxes in absolute xyxy pixels; `transforms.Normalize` turns them into the normalized
(cx, cy, w, h) that the model predicts.
"""

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torchvision
from PIL import Image
from pycocotools import mask as coco_mask

from . import transforms as T

MAX_IMAGES_TO_PROBE = 20000
LAYOUT = "train2017/, val2017/ and annotations/instances_{train,val}2017.json"


class CocoDetection(torchvision.datasets.CocoDetection):
    """torchvision's CocoDetection returning (image, target) with target tensors as described in
    `ConvertCocoPolysToMask`, passed through `transforms` (which take and return (image, target)).

    The annotation file is checked when the dataset is built, so a bad file or a missing image fails
    before any training time is spent.
    """

    def __init__(self, img_folder, ann_file, transforms, return_masks: bool):
        try:
            super().__init__(img_folder, ann_file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"annotation file {ann_file} is not valid JSON: {e}") from e
        except (AssertionError, KeyError, TypeError, AttributeError) as e:
            # pycocotools indexes the file while loading it; a non-dict file or a missing key lands here. The
            # checks below name the entry and the key where they can (read again only when it failed).
            with open(ann_file) as f:
                dataset = json.load(f)
            if isinstance(dataset, dict):
                check_coco_annotations(dataset, ann_file, return_masks)
            raise ValueError(
                f"annotation file {ann_file} is not in COCO format ({type(e).__name__}: {e}); "
                "expected a dict with 'images', 'annotations' and 'categories'"
            ) from e
        check_coco_annotations(self.coco.dataset, ann_file, return_masks)
        check_images_exist(self.coco.dataset["images"], img_folder, ann_file)
        # Not `self.transforms`: torchvision's base class would apply it to the raw annotation list.
        self._transforms = transforms
        self.prepare = ConvertCocoPolysToMask(return_masks)

    def __getitem__(self, idx: int):
        image_id = self.ids[idx]
        path = os.path.join(self.root, self.coco.loadImgs(image_id)[0]["file_name"])
        try:
            image = read_rgb(path)
        except OSError as e:  # PIL raises OSError subclasses for unreadable or truncated images
            raise OSError(f"cannot decode image {path} (image id {image_id}): {e}") from e
        annotations = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id))
        image, target = self.prepare(image, {"image_id": image_id, "annotations": annotations})
        if self._transforms is not None:
            image, target = self._transforms(image, target)
        return image, target


def read_rgb(path) -> Image.Image:
    """The image at `path` as 8-bit RGB, whatever its mode (greyscale, palette, CMYK, with alpha, 16-bit).
    EXIF orientation is not applied, as in the original: COCO-format boxes refer to the stored pixels."""
    with Image.open(path) as f:
        if f.mode.startswith("I"):  # 16-bit (or 32-bit int) greyscale: convert("RGB") would clip it at 255
            pixels = np.asarray(f).astype(np.int64)
            scale = 256 if f.mode.startswith("I;16") or pixels.max(initial=0) > 255 else 1
            f = Image.fromarray(np.clip(pixels // scale, 0, 255).astype(np.uint8))
        return f.convert("RGB")


def check_coco_annotations(dataset: Dict[str, Any], ann_file, return_masks: bool = False) -> None:
    """Raise a ValueError naming `ann_file` and the key when a COCO annotation dict lacks what training needs
    (with `return_masks`, also a 'segmentation' on every non-crowd annotation)."""
    for key in ("images", "annotations", "categories"):
        if not isinstance(dataset.get(key), list):
            raise ValueError(f"annotation file {ann_file}: missing or non-list top-level key '{key}'")
    required = {
        "images": ("id", "file_name"),
        "annotations": ("id", "image_id", "category_id", "bbox", "area"),
        "categories": ("id",),
    }
    for key, fields in required.items():
        for i, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict):
                raise ValueError(
                    f"annotation file {ann_file}: {key}[{i}] must be a JSON object, got "
                    f"{type(entry).__name__} {str(entry)[:50]}"
                )
            missing = [field for field in fields if field not in entry]
            if missing:
                raise ValueError(f"annotation file {ann_file}: {key}[{i}] lacks key '{missing[0]}'")
    category_ids = {cat["id"] for cat in dataset["categories"]}
    for i, ann in enumerate(dataset["annotations"]):
        bbox = ann["bbox"]
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
        ):
            raise ValueError(
                f"annotation file {ann_file}: annotations[{i}] (id {ann['id']}) 'bbox' must be "
                f"[x, y, w, h] numbers, got {str(bbox)[:60]}"
            )
        # (A box outside the image is clamped to it, and an empty or NaN one dropped, as in the original.)
        if ann["category_id"] not in category_ids:
            raise ValueError(
                f"annotation file {ann_file}: annotations[{i}] (id {ann['id']}) has category_id "
                f"{ann['category_id']!r}, which is not among its 'categories' ids "
                f"{sorted(category_ids)[:20]}; add the category or fix the annotation"
            )
        # Only --masks reads segmentations; crowd annotations are dropped before that.
        if return_masks and ann.get("iscrowd", 0) == 0 and "segmentation" not in ann:
            raise ValueError(
                f"annotation file {ann_file}: annotations[{i}] lacks key 'segmentation', which --masks needs"
            )


def check_images_exist(images: List[Dict[str, Any]], img_folder, ann_file) -> None:
    """Raise FileNotFoundError naming the first image of `ann_file` that is absent from `img_folder`."""
    if not os.path.isdir(img_folder):
        raise FileNotFoundError(f"image folder {img_folder} (for {ann_file}) does not exist")
    present = set(os.listdir(img_folder))  # one listing instead of a stat per image: COCO has 118k
    missing = [
        img["file_name"]
        for img in images
        if img["file_name"] not in present and not os.path.isfile(os.path.join(img_folder, img["file_name"]))
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {ann_file} are missing, e.g. {os.path.join(img_folder, missing[0])}"
        )
    if len(images) <= MAX_IMAGES_TO_PROBE:
        # Reading each header (not the pixels) catches files that are not images before training starts;
        # past this count (COCO's 118k) it would cost more than it saves, and __getitem__ still names the file.
        for img in images:
            path = os.path.join(img_folder, img["file_name"])
            try:
                with Image.open(path):
                    pass
            except OSError as e:
                raise OSError(f"cannot decode image {path} (listed in {ann_file}): {e}") from e


def check_category_ids(dataset: Dict[str, Any], ann_file, num_classes: Optional[int]) -> None:
    """Raise a ValueError when a category id of the annotation dict `dataset` (read from `ann_file`) does not
    fit a classifier of `num_classes` classes: ids must be < num_classes, the model adds the "no object"
    class itself. None skips the check."""
    if num_classes is None:
        return
    ids = [cat["id"] for cat in dataset.get("categories", [])]
    ids += [ann["category_id"] for ann in dataset.get("annotations", []) if "category_id" in ann]
    too_large = [i for i in ids if i >= num_classes]
    if too_large:
        example = next(
            (
                f" (e.g. annotation id {ann.get('id')})"
                for ann in dataset.get("annotations", [])
                if ann.get("category_id") == max(too_large)
            ),
            "",
        )
        raise ValueError(
            f"category id {max(too_large)} in {ann_file}{example} does not fit --num_classes "
            f"{num_classes}: category ids must be < num_classes; pass --num_classes "
            f"{max(too_large) + 1} or more"
        )


def convert_coco_poly_to_mask(segmentations: List[Any], height: int, width: int) -> torch.Tensor:
    """Rasterize COCO segmentations (polygon lists or RLEs) into boolean masks [N, height, width]."""
    masks = []
    for segmentation in segmentations:
        if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
            rles = segmentation  # already a compressed RLE
        else:
            rles = coco_mask.frPyObjects(segmentation, height, width)
        mask = coco_mask.decode(rles)
        if mask.ndim == 3:  # one layer per polygon of the object: their union is the object
            mask = mask.any(axis=2)
        masks.append(torch.as_tensor(mask, dtype=torch.bool))
    if not masks:
        return torch.zeros((0, height, width), dtype=torch.bool)
    return torch.stack(masks)


class ConvertCocoPolysToMask:
    """Turn (PIL image, {'image_id', 'annotations': COCO annotation list}) into (image, target tensors).

    Crowd annotations are dropped, boxes go from COCO (x, y, w, h) to (x0, y0, x1, y1) clamped to the image,
    and boxes left empty are dropped. The target holds boxes, labels, image_id, area, iscrowd, orig_size and
    size (both (h, w)), plus masks when `return_masks` and keypoints when the annotations have them.
    """

    def __init__(self, return_masks: bool = False):
        self.return_masks = return_masks

    def __call__(self, image: Image.Image, target: Dict[str, Any]) -> Tuple[Image.Image, Dict[str, Any]]:
        width, height = image.size
        annotations = [obj for obj in target["annotations"] if obj.get("iscrowd", 0) == 0]

        boxes = torch.as_tensor([obj["bbox"] for obj in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])

        out = {
            "boxes": boxes[keep],
            "labels": torch.tensor([obj["category_id"] for obj in annotations], dtype=torch.int64)[keep],
            "image_id": torch.tensor([target["image_id"]]),
            "area": torch.tensor([obj["area"] for obj in annotations], dtype=torch.float32)[keep],
            "iscrowd": torch.tensor([obj.get("iscrowd", 0) for obj in annotations], dtype=torch.int64)[keep],
        }
        if self.return_masks:
            segmentations = [obj["segmentation"] for obj in annotations]
            out["masks"] = convert_coco_poly_to_mask(segmentations, height, width)[keep]
        if annotations and "keypoints" in annotations[0]:
            keypoints = torch.as_tensor([obj["keypoints"] for obj in annotations], dtype=torch.float32)
            out["keypoints"] = keypoints.view(keypoints.shape[0], -1, 3)[keep]
        out["orig_size"] = torch.as_tensor([int(height), int(width)])
        out["size"] = torch.as_tensor([int(height), int(width)])
        return image, out


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def make_coco_transforms(image_set: str) -> T.Compose:
    """The original DETR augmentation: for 'train', a flip, then either multi-scale resizing (shorter side
    480..800, longer side <= 1333) or a resize + random crop + multi-scale resize; for 'val', shorter side
    800. Both end with ToTensor and ImageNet normalization."""
    normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    scales = [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800]
    if image_set == "train":
        return T.Compose(
            [
                T.RandomHorizontalFlip(),
                T.RandomSelect(
                    T.RandomResize(scales, max_size=1333),
                    T.Compose(
                        [
                            T.RandomResize([400, 500, 600]),
                            T.RandomSizeCrop(384, 600),
                            T.RandomResize(scales, max_size=1333),
                        ]
                    ),
                ),
                normalize,
            ]
        )
    if image_set == "val":
        return T.Compose([T.RandomResize([800], max_size=1333), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")


def coco_paths(root, image_set: str, flag: str = "--coco_path") -> Tuple[Path, Path]:
    """(image folder, instances annotation file) of `image_set` under a COCO-layout `root`; raises
    FileNotFoundError naming `flag` and the expected layout when either is missing."""
    if image_set not in ("train", "val"):
        raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
    if root is None:
        raise FileNotFoundError(f"{flag} is required: a folder holding {LAYOUT}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {root} does not exist; it must be a folder holding {LAYOUT}")
    img_folder = root / f"{image_set}2017"
    ann_file = root / "annotations" / f"instances_{image_set}2017.json"
    for path in (img_folder, ann_file):
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {flag} {root} must hold {LAYOUT}")
    return img_folder, ann_file


def build_from_folder(root, image_set: str, transforms, args, flag: str = "--coco_path") -> CocoDetection:
    """CocoDetection over the COCO-layout folder `root` (named by `flag` in errors), with masks when
    `args.masks`, its category ids checked against `args.num_classes` when that is set."""
    img_folder, ann_file = coco_paths(root, image_set, flag)
    dataset = CocoDetection(img_folder, ann_file, transforms=transforms, return_masks=args.masks)
    check_category_ids(dataset.coco.dataset, ann_file, args.num_classes)
    return dataset


def build(image_set: str, args) -> CocoDetection:
    """COCO `image_set` ('train' or 'val') from `args.coco_path`, with masks when `args.masks`."""
    return build_from_folder(args.coco_path, image_set, make_coco_transforms(image_set), args)
