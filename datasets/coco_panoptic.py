"""COCO panoptic segmentation: images, one PNG of segment ids per image, and a JSON of segments.

Layout (as distributed by cocodataset.org):
    --coco_path/{train2017,val2017}/*.jpg
    --coco_panoptic_path/annotations/panoptic_{train,val}2017.json
    --coco_panoptic_path/panoptic_{train,val}2017/*.png
Each PNG encodes segment ids as colors (id = R + 256 G + 256^2 B); the JSON's `segments_info` gives each
segment's category, area and crowd flag. Targets are per-segment binary masks, their boxes and labels.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from util.box_ops import masks_to_boxes
from util.panoptic import rgb2id

from .coco import check_category_ids, check_images_exist, make_coco_transforms


class CocoPanoptic:
    """COCO panoptic dataset: returns (image, target) with target keys image_id, masks (if return_masks),
    labels (category ids), boxes (xyxy, absolute), size, orig_size, iscrowd, area."""

    def __init__(self, img_folder, ann_folder, ann_file, transforms=None, return_masks: bool = True):
        with open(ann_file, "r") as f:
            self.coco = json.load(f)
        # Order by image id, and pair every image with its annotation.
        self.coco["images"] = sorted(self.coco["images"], key=lambda x: x["id"])
        if "annotations" in self.coco:
            by_image = {ann["image_id"]: ann for ann in self.coco["annotations"]}
            annotations = []
            for img in self.coco["images"]:
                ann = by_image.get(img["id"])
                if ann is None:
                    raise ValueError(f"{ann_file}: image {img['file_name']} (id {img['id']}) has no annotation")
                if Path(img["file_name"]).stem != Path(ann["file_name"]).stem:
                    raise ValueError(
                        f"{ann_file}: image {img['file_name']} (id {img['id']}) is annotated by "
                        f"{ann['file_name']}; the file names must match up to the extension"
                    )
                annotations.append(ann)
            self.coco["annotations"] = annotations

        self.img_folder = img_folder
        self.ann_folder = ann_folder
        self.ann_file = ann_file
        self.transforms = transforms
        self.return_masks = return_masks

    def _info(self, idx: int) -> dict:
        return self.coco["annotations"][idx] if "annotations" in self.coco else self.coco["images"][idx]

    def validate(self, check_segments: bool = False) -> None:
        """Check that every image and panoptic PNG exists (and, with check_segments, that every segment of
        the JSON is present in its PNG: this decodes every PNG), so that bad data fails before training."""
        check_images_exist(self.coco["images"], self.img_folder, self.ann_file)
        present = set(os.listdir(self.ann_folder)) if os.path.isdir(self.ann_folder) else set()
        for ann in self.coco.get("annotations", []):
            if ann["file_name"] not in present:
                raise FileNotFoundError(
                    f"panoptic PNG {Path(self.ann_folder) / ann['file_name']} listed in {self.ann_file} is missing"
                )
            if check_segments:
                self._load_masks(ann)

    def _load_masks(self, info: dict) -> torch.Tensor:
        """Binary masks [N, H, W] uint8 of the segments of one annotation, in segments_info order."""
        png_path = Path(self.ann_folder) / info["file_name"]
        if not png_path.exists():
            raise FileNotFoundError(f"panoptic PNG {png_path} listed in {self.ann_file} is missing")
        ids = rgb2id(np.asarray(Image.open(png_path), dtype=np.uint32))
        segment_ids = np.array([seg["id"] for seg in info["segments_info"]], dtype=np.int64)
        masks = ids[None] == segment_ids[:, None, None]
        missing = segment_ids[~masks.reshape(len(segment_ids), -1).any(1)] if len(segment_ids) else []
        if len(missing):
            raise ValueError(
                f"{png_path}: segment ids {[int(i) for i in missing]} of {self.ann_file} do not "
                f"occur in the PNG (the PNG and the JSON do not belong together)"
            )
        return torch.as_tensor(masks, dtype=torch.uint8)

    def __getitem__(self, idx: int):
        info = self._info(idx)
        img_path = Path(self.img_folder) / info["file_name"].replace(".png", ".jpg")
        img = Image.open(img_path).convert("RGB")
        w, h = img.size

        target = {"image_id": torch.tensor([info["image_id"] if "image_id" in info else info["id"]])}
        if "segments_info" in info:
            masks = self._load_masks(info)
            if masks.shape[-2:] != (h, w):
                raise ValueError(
                    f"{Path(self.ann_folder) / info['file_name']} is {masks.shape[-1]}x{masks.shape[-2]}"
                    f" but its image {img_path} is {w}x{h}"
                )
            labels = torch.tensor([seg["category_id"] for seg in info["segments_info"]], dtype=torch.int64)
            if self.return_masks:
                target["masks"] = masks
            target["labels"] = labels
            target["boxes"] = masks_to_boxes(masks)
        target["size"] = torch.as_tensor([int(h), int(w)])
        target["orig_size"] = torch.as_tensor([int(h), int(w)])
        if "segments_info" in info:
            for name in ["iscrowd", "area"]:
                target[name] = torch.tensor([seg[name] for seg in info["segments_info"]])

        if self.transforms is not None:
            img, target = self.transforms(img, target)
        return img, target

    def __len__(self) -> int:
        return len(self.coco["images"])

    def get_height_and_width(self, idx: int):
        img_info = self.coco["images"][idx]
        return img_info["height"], img_info["width"]


def build(image_set: str, args) -> CocoPanoptic:
    """The train or val split of COCO panoptic from --coco_path (images) and --coco_panoptic_path."""
    layout = (
        "expected --coco_path/{train2017,val2017}/ with the images and --coco_panoptic_path/ with "
        "annotations/panoptic_{train,val}2017.json and panoptic_{train,val}2017/ (the PNGs)"
    )
    if args.coco_path is None or args.coco_panoptic_path is None:
        raise ValueError(f"--dataset_file coco_panoptic needs both --coco_path and --coco_panoptic_path; {layout}")
    img_root, ann_root = Path(args.coco_path), Path(args.coco_panoptic_path)
    splits = {"train": "train2017", "val": "val2017"}
    if image_set not in splits:
        raise ValueError(f"unknown image_set {image_set!r}; expected one of {list(splits)}")
    split = splits[image_set]
    img_folder = img_root / split
    ann_folder = ann_root / f"panoptic_{split}"
    ann_file = ann_root / "annotations" / f"panoptic_{split}.json"
    for flag, path in [
        ("--coco_path", img_folder),
        ("--coco_panoptic_path", ann_folder),
        ("--coco_panoptic_path", ann_file),
    ]:
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (check {flag}); {layout}")

    dataset = CocoPanoptic(
        img_folder, ann_folder, ann_file, transforms=make_coco_transforms(image_set), return_masks=args.masks
    )
    dataset.validate()
    segments = [seg for ann in dataset.coco.get("annotations", []) for seg in ann.get("segments_info", [])]
    check_category_ids(
        {"categories": dataset.coco.get("categories", []), "annotations": segments},
        ann_file,
        args.num_classes,
    )
    return dataset
