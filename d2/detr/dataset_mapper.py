"""DETR's data augmentation inside detectron2's data pipeline.

The augmentations below are detectron2 Augmentations that draw their random numbers exactly as
datasets/transforms.py does (Python's `random` for the flip, the branch, the sizes and the crop's extent;
torch's generator for the crop's position), and size images with its rounding; masks are drawn at the original
size and follow the image as bitmaps, as there. So with the same seeds a training image gets the very same
pixels, boxes and masks from DetrDatasetMapper as from main.py's make_coco_transforms("train").
"""

import copy
import random
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torchvision.transforms as TV
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BitMasks
from fvcore.transforms.transform import CropTransform, HFlipTransform, NoOpTransform, Transform, TransformList
from PIL import Image

from datasets.coco import convert_coco_poly_to_mask
from datasets.transforms import get_size_with_aspect_ratio
from util.misc import interpolate


class DetrRandomFlip(T.Augmentation):
    """Mirror left-right with probability p (datasets.transforms.RandomHorizontalFlip)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = p

    def get_transform(self, image: np.ndarray) -> Transform:
        if random.random() < self.p:
            return HFlipTransform(image.shape[1])
        return NoOpTransform()


class DetrResize(T.Augmentation):
    """Resize the shorter side to one of `sizes`, the longer side capped near `max_size`
    (datasets.transforms.RandomResize, with its rounding, which detectron2's ResizeShortestEdge does not share)."""

    def __init__(self, sizes: Sequence[int], max_size: Optional[int] = None):
        super().__init__()
        self.sizes = list(sizes)
        self.max_size = max_size

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        new_h, new_w = get_size_with_aspect_ratio((w, h), random.choice(self.sizes), self.max_size)
        # PIL bilinear on uint8, as torchvision's resize of a PIL image in main.py's pipeline.
        return T.ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)


class DetrRandomSizeCrop(T.Augmentation):
    """Crop a region whose width and height are drawn in [min_size, max_size] (bounded by the image), at a
    random place (datasets.transforms.RandomSizeCrop)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        crop_w = random.randint(min(self.min_size, w), min(w, self.max_size))
        crop_h = random.randint(min(self.min_size, h), min(h, self.max_size))
        # torchvision's own draw of the position (it only reads the image's size), so that it consumes torch's
        # generator as main.py's crop does.
        top, left, _, _ = TV.RandomCrop.get_params(torch.empty((0, h, w)), [crop_h, crop_w])
        return CropTransform(left, top, crop_w, crop_h)


class DetrRandomSelect(T.Augmentation):
    """Apply the augmentations `first` with probability p, else `second` (datasets.transforms.RandomSelect)."""

    def __init__(self, first: List[T.Augmentation], second: List[T.Augmentation], p: float = 0.5):
        super().__init__()
        self.first = T.AugmentationList(first)
        self.second = T.AugmentationList(second)
        self.p = p

    def __call__(self, aug_input: T.AugInput) -> Transform:
        # Each branch applies its augmentations in turn (each sees the image the previous one produced).
        return self.first(aug_input) if random.random() < self.p else self.second(aug_input)


def transform_masks(masks: torch.Tensor, transforms: TransformList) -> torch.Tensor:
    """Apply the flips, crops and resizes of `transforms` to boolean masks [N, H, W] as datasets/transforms.py
    does: masks are drawn at the original size and the bitmaps follow the image (resized with torch's nearest
    interpolation, not PIL's, which picks other pixels)."""
    for t in transforms.transforms:
        if isinstance(t, HFlipTransform):
            masks = masks.flip(-1)
        elif isinstance(t, CropTransform):
            masks = masks[:, t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w]
        elif isinstance(t, T.ResizeTransform):
            masks = interpolate(masks[:, None].float(), size=(t.new_h, t.new_w), mode="nearest")[:, 0] > 0.5
        elif not isinstance(t, NoOpTransform):
            raise TypeError(f"DetrDatasetMapper cannot apply {type(t).__name__} to masks")
    return masks


def build_detr_augmentation(cfg, is_train: bool) -> List[T.Augmentation]:
    """main.py's augmentation from the INPUT keys. Training: a flip, then either a multi-scale resize
    (MIN_SIZE_TRAIN, MAX_SIZE_TRAIN) or, with INPUT.CROP.ENABLED, with probability 1/2 a resize to
    CROP.RESIZE_BEFORE, a crop of CROP.SIZE = (min, max) and the same multi-scale resize. Test: MIN_SIZE_TEST."""
    if not is_train:
        return [DetrResize([cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)]
    resize = DetrResize(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN)
    if not cfg.INPUT.CROP.ENABLED:
        return [DetrRandomFlip(), resize]
    if cfg.INPUT.CROP.TYPE != "absolute_range":
        raise ValueError(
            f"INPUT.CROP.TYPE must be 'absolute_range' for DETR's crop (CROP.SIZE = (min, max) "
            f"pixels), got {cfg.INPUT.CROP.TYPE!r}"
        )
    min_crop, max_crop = cfg.INPUT.CROP.SIZE
    crop_branch = [
        DetrResize(cfg.INPUT.CROP.RESIZE_BEFORE),
        DetrRandomSizeCrop(min_crop, max_crop),
        DetrResize(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN),
    ]
    return [DetrRandomFlip(), DetrRandomSelect([resize], crop_branch)]


class DetrDatasetMapper:
    """A detectron2 dataset dict -> the model's input: "image" [3, H, W] (0-255, INPUT.FORMAT) augmented as
    main.py does, and in training "instances" (gt_boxes, gt_classes, and gt_masks with MODEL.MASK_ON).
    Crowd annotations are dropped for training, as main.py does."""

    def __init__(self, cfg, is_train: bool = True):
        self.augmentation = T.AugmentationList(build_detr_augmentation(cfg, is_train))
        self.image_format = cfg.INPUT.FORMAT
        self.mask_on = cfg.MODEL.MASK_ON
        self.is_train = is_train

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)  # the dataset's own dict is reused every epoch
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        original_height, original_width = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentation(aug_input)
        image = aug_input.image
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        annotations = [obj for obj in dataset_dict.pop("annotations", []) if obj.get("iscrowd", 0) == 0]
        # Segmentations are drawn before augmenting, as main.py does, rather than transformed as polygons
        # (detectron2 would need shapely to crop those).
        segmentations = [obj.pop("segmentation", None) for obj in annotations]
        annotations = [utils.transform_instance_annotations(obj, transforms, image_shape) for obj in annotations]
        instances = utils.annotations_to_instances(annotations, image_shape)
        if self.mask_on:
            if any(segmentation is None for segmentation in segmentations):
                raise ValueError(
                    f"MODEL.MASK_ON needs a 'segmentation' on every annotation; image "
                    f"{dataset_dict['file_name']} has an annotation without one"
                )
            masks = convert_coco_poly_to_mask(segmentations, original_height, original_width)
            instances.gt_masks = BitMasks(transform_masks(masks, transforms))
        # Objects a crop left without a box are dropped, as datasets/transforms.py's crop drops them.
        dataset_dict["instances"] = utils.filter_empty_instances(instances, by_mask=False)
        return dataset_dict
