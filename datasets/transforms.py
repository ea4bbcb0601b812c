"""Data augmentation on (image, target) pairs.

Every transform takes and returns `(image, target)` so that boxes, masks and areas move with the pixels.
`image` is a PIL image until `ToTensor`; `target` is None or a dict holding per-object fields
(`boxes` in absolute xyxy, `labels`, `area`, `iscrowd`, optional `masks` [N, H, W]) and per-image fields
(`size` as (h, w), `orig_size`, `image_id`). Transforms never modify the dict they are given.
"""

import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import PIL.Image
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from util.box_ops import box_xyxy_to_cxcywh
from util.misc import interpolate

Target = Optional[Dict[str, Any]]

# Fields with one entry per object: they are filtered together when a crop removes objects.
PER_OBJECT_FIELDS = ("boxes", "masks", "labels", "area", "iscrowd")


def crop(image: PIL.Image.Image, target: Target, region: Tuple[int, int, int, int]):
    """Crop to `region` = (top, left, height, width); boxes are shifted and clamped into the crop, their area
    recomputed, masks cropped, and objects left with an empty box (or empty mask, when there are no boxes)
    are dropped from every per-object field."""
    top, left, height, width = region
    cropped = F.crop(image, top, left, height, width)
    if target is None:
        return cropped, None
    target = target.copy()
    target["size"] = torch.tensor([height, width])

    if "boxes" in target:
        boxes = target["boxes"] - torch.as_tensor([left, top, left, top], dtype=torch.float32)
        corners = boxes.reshape(-1, 2, 2)  # [N, (x0y0, x1y1), (x, y)]
        corners = torch.min(corners, torch.as_tensor([width, height], dtype=torch.float32)).clamp(min=0)
        target["boxes"] = corners.reshape(-1, 4)
        # The area follows the clamped box, as in the original, also when masks are present.
        target["area"] = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
    if "masks" in target:
        target["masks"] = target["masks"][:, top : top + height, left : left + width]
        if "boxes" not in target:
            keep = target["masks"].flatten(1).any(1)
    if "boxes" in target or "masks" in target:
        for field in PER_OBJECT_FIELDS:
            if field in target:
                target[field] = target[field][keep]
    return cropped, target


def hflip(image: PIL.Image.Image, target: Target):
    """Mirror the image left-right; box x-coordinates become (w - x1, w - x0), masks are mirrored."""
    flipped = F.hflip(image)
    if target is None:
        return flipped, None
    width, _ = image.size
    target = target.copy()
    if "boxes" in target:
        x0, y0, x1, y1 = target["boxes"].unbind(-1)
        target["boxes"] = torch.stack([width - x1, y0, width - x0, y1], dim=-1)
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    return flipped, target


def get_size_with_aspect_ratio(
    image_size: Tuple[int, int], size: int, max_size: Optional[int] = None
) -> Tuple[int, int]:
    """Output (h, w) whose shorter side is `size`, shrunk so the longer side stays near `max_size`.

    Rounds exactly as the original DETR (int() truncation of the longer side), so that the resulting
    image sizes, and hence trained models, match it; the longer side can exceed max_size by a pixel or two.
    """
    width, height = image_size
    if max_size is not None:
        shorter, longer = float(min(width, height)), float(max(width, height))
        if longer / shorter * size > max_size:
            size = int(round(max_size * shorter / longer))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


def get_size(
    image_size: Tuple[int, int], size: Union[int, Sequence[int]], max_size: Optional[int] = None
) -> Tuple[int, int]:
    """Output (h, w) for `resize`: a sequence `size` is read as (w, h); an int is the shorter side."""
    if isinstance(size, (list, tuple)):
        return tuple(size[::-1])
    return get_size_with_aspect_ratio(image_size, size, max_size)


def resize(image: PIL.Image.Image, target: Target, size: Union[int, Sequence[int]], max_size: Optional[int] = None):
    """Resize the image (see `get_size`), scaling boxes and area by the same ratios; masks are resized with
    nearest interpolation and thresholded at 0.5 so they stay binary."""
    out_size = get_size(image.size, size, max_size)
    resized = F.resize(image, list(out_size))
    if target is None:
        return resized, None
    ratio_w, ratio_h = (float(new) / float(old) for new, old in zip(resized.size, image.size))
    target = target.copy()
    if "boxes" in target:
        target["boxes"] = target["boxes"] * torch.as_tensor([ratio_w, ratio_h, ratio_w, ratio_h])
    if "area" in target:
        target["area"] = target["area"] * (ratio_w * ratio_h)
    height, width = out_size
    target["size"] = torch.tensor([height, width])
    if "masks" in target:
        masks = target["masks"]
        scaled = interpolate(masks[:, None].float(), size=(height, width), mode="nearest")[:, 0] > 0.5
        target["masks"] = scaled.to(masks.dtype)
    return resized, target


def pad(image: PIL.Image.Image, target: Target, padding: Tuple[int, int]):
    """Pad `padding` = (pad_x, pad_y) zero pixels on the right and bottom; boxes do not move."""
    pad_x, pad_y = padding
    padded = F.pad(image, [0, 0, pad_x, pad_y])  # left, top, right, bottom
    if target is None:
        return padded, None
    target = target.copy()
    target["size"] = torch.tensor(padded.size[::-1])
    if "masks" in target:
        target["masks"] = torch.nn.functional.pad(target["masks"], (0, pad_x, 0, pad_y))
    return padded, target


class RandomCrop:
    """Crop a random region of fixed `size` (h, w)."""

    def __init__(self, size: Sequence[int]):
        self.size = size

    def __call__(self, image, target):
        return crop(image, target, T.RandomCrop.get_params(image, self.size))


class RandomSizeCrop:
    """Crop a random region whose width and height are drawn uniformly in [min_size, max_size]
    (bounded by the image)."""

    def __init__(self, min_size: int, max_size: int):
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: PIL.Image.Image, target: Target):
        # min() on the lower bound only matters for images smaller than min_size, which would otherwise
        # make randint raise; for all other images the draws are those of the original.
        width = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        height = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        return crop(image, target, T.RandomCrop.get_params(image, [height, width]))


class CenterCrop:
    """Crop the central region of `size` (h, w)."""

    def __init__(self, size: Sequence[int]):
        self.size = size

    def __call__(self, image, target):
        image_width, image_height = image.size
        crop_height, crop_width = self.size
        top = int(round((image_height - crop_height) / 2.0))
        left = int(round((image_width - crop_width) / 2.0))
        return crop(image, target, (top, left, crop_height, crop_width))


class RandomHorizontalFlip:
    """Mirror left-right with probability `p`."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize to one of `sizes` (shorter side, or (w, h)) picked at random, longer side capped by `max_size`."""

    def __init__(self, sizes: Sequence[Union[int, Sequence[int]]], max_size: Optional[int] = None):
        if not isinstance(sizes, (list, tuple)):
            raise TypeError(f"RandomResize expects a list or tuple of sizes, got {type(sizes).__name__}")
        self.sizes = sizes
        self.max_size = max_size

    def __call__(self, image, target=None):
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomPad:
    """Pad right and bottom by random amounts in [0, max_pad]."""

    def __init__(self, max_pad: int):
        self.max_pad = max_pad

    def __call__(self, image, target):
        pad_x = random.randint(0, self.max_pad)
        pad_y = random.randint(0, self.max_pad)
        return pad(image, target, (pad_x, pad_y))


class RandomSelect:
    """Apply `transforms1` with probability `p`, otherwise `transforms2`."""

    def __init__(self, transforms1, transforms2, p: float = 0.5):
        self.transforms1 = transforms1
        self.transforms2 = transforms2
        self.p = p

    def __call__(self, image, target):
        if random.random() < self.p:
            return self.transforms1(image, target)
        return self.transforms2(image, target)


class ToTensor:
    """PIL image to a float tensor in [0, 1]; the target is unchanged."""

    def __call__(self, image, target):
        return F.to_tensor(image), target


class RandomErasing:
    """torchvision's RandomErasing on the image tensor (same arguments); the target is unchanged."""

    def __init__(self, *args, **kwargs):
        self.eraser = T.RandomErasing(*args, **kwargs)

    def __call__(self, image, target):
        return self.eraser(image), target


class Normalize:
    """Normalize the image tensor with `mean`/`std` and turn boxes into (cx, cy, w, h) divided by the image
    (w, h, w, h): the form the model predicts and the loss compares against."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = mean
        self.std = std

    def __call__(self, image: torch.Tensor, target: Target = None):
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = target.copy()
        height, width = image.shape[-2:]
        if "boxes" in target:
            scale = torch.tensor([width, height, width, height], dtype=torch.float32)
            target["boxes"] = box_xyxy_to_cxcywh(target["boxes"]) / scale
        return image, target


# The transforms that never change the image size.
SIZE_PRESERVING = (RandomHorizontalFlip, ToTensor, Normalize, RandomErasing)


def output_image_size(transforms, image_size: Tuple[int, int]) -> Tuple[int, int]:
    """(w, h) of an image of `image_size` (w, h) after `transforms` (a Compose, nested ones too, or one transform),
    computed without the image; raises ValueError naming the transform when the output size is not determined (a
    random scale, crop size or padding)."""
    if isinstance(transforms, Compose):
        for transform in transforms.transforms:
            image_size = output_image_size(transform, image_size)
        return image_size
    if isinstance(transforms, SIZE_PRESERVING) or (isinstance(transforms, RandomPad) and transforms.max_pad == 0):
        return image_size
    if isinstance(transforms, (CenterCrop, RandomCrop)):  # a region of that size, wherever it is
        height, width = transforms.size
        return width, height
    if isinstance(transforms, RandomResize):
        outcomes = {get_size(image_size, size, transforms.max_size)[::-1] for size in transforms.sizes}
        if len(outcomes) == 1:
            return outcomes.pop()
        raise ValueError(
            f"RandomResize with {len(transforms.sizes)} sizes picks one at random: the output size is not determined"
        )
    if isinstance(transforms, RandomSelect):
        chances = ((transforms.transforms1, transforms.p), (transforms.transforms2, 1 - transforms.p))
        outcomes = {output_image_size(branch, image_size) for branch, chance in chances if chance > 0}
        if len(outcomes) == 1:
            return outcomes.pop()
        raise ValueError(f"RandomSelect's two branches give {sorted(outcomes)}: the output size is not determined")
    raise ValueError(f"{type(transforms).__name__} may change the image size: the output size is not determined")


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: List):
        self.transforms = transforms

    def __call__(self, image, target):
        for transform in self.transforms:
            image, target = transform(image, target)
        return image, target

    def __repr__(self) -> str:
        lines = [f"    {transform}" for transform in self.transforms]
        return "\n".join([f"{type(self).__name__}(", *lines, ")"])
