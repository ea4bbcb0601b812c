"""Datasets: `build_dataset(image_set, args)` picks one from --dataset_file."""
import json
from pathlib import Path
from typing import Dict, List, Tuple

import torch.utils.data
import torchvision

from util.misc import COCO_NUM_CLASSES, coco_panoptic_is_thing_map

from . import coco, synthetic
from .transforms import output_image_size

DATASET_FILES = ("coco", "coco_panoptic", "synthetic", "synthetic_panoptic")


def _unknown_dataset(dataset_file: str) -> ValueError:
    return ValueError(f"--dataset_file {dataset_file!r} is not supported; choose one of {', '.join(DATASET_FILES)}")


def build_dataset(image_set: str, args):
    """The dataset of `image_set` ('train' or 'val') named by `args.dataset_file`."""
    if args.dataset_file == "coco":
        return coco.build(image_set, args)
    if args.dataset_file == "coco_panoptic":
        from .coco_panoptic import build as build_coco_panoptic  # imported here: panopticapi is optional
        return build_coco_panoptic(image_set, args)
    if args.dataset_file == "synthetic":
        return synthetic.build(image_set, args)
    if args.dataset_file == "synthetic_panoptic":
        return synthetic.build_panoptic(image_set, args)
    raise _unknown_dataset(args.dataset_file)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind `dataset` (through any Subset wrappers), or None if it has none."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, torchvision.datasets.CocoDetection):
        return dataset.coco
    return None


def transformed_image_sizes(dataset) -> List[Tuple[int, int]]:
    """(w, h) of every image of `dataset` as its transforms deliver it, from the sizes its annotations record
    (no image is read): what --eval_batching size groups the val images by. Raises ValueError when the dataset's
    transforms give no fixed size (random scales) or it records no image sizes."""
    indices = None
    while isinstance(dataset, torch.utils.data.Subset):
        indices = [dataset.indices[i] for i in indices] if indices is not None else list(dataset.indices)
        dataset = dataset.dataset
    if isinstance(dataset, torchvision.datasets.CocoDetection):
        records, transforms = [dataset.coco.imgs[i] for i in dataset.ids], getattr(dataset, "_transforms", None)
    elif isinstance(getattr(dataset, "coco", None), dict):  # the panoptic datasets keep the raw json
        records, transforms = dataset.coco["images"], dataset.transforms
    else:
        raise ValueError(f"{type(dataset).__name__} records no image sizes")
    sizes = []
    for record in records:
        size = (int(record["width"]), int(record["height"]))
        sizes.append(output_image_size(transforms, size) if transforms is not None else size)
    return sizes if indices is None else [sizes[i] for i in indices]


def default_num_classes(args) -> int:
    """Classifier size when --num_classes is not given: the original's for COCO and COCO panoptic (91 and 250,
    util.misc.COCO_NUM_CLASSES), otherwise max category id + 1 of the training annotations."""
    if args.dataset_file in COCO_NUM_CLASSES:
        return COCO_NUM_CLASSES[args.dataset_file]
    if args.dataset_file in ("synthetic", "synthetic_panoptic"):
        return max(_categories(args)) + 1
    raise _unknown_dataset(args.dataset_file)


def default_is_thing_map(args) -> Dict[int, bool]:
    """{category id: is a thing} for the panoptic post-processor: ids <= 90 for COCO panoptic (as in the
    original), the `isthing` flags of the training annotations for synthetic_panoptic."""
    if args.dataset_file == "coco_panoptic":
        return coco_panoptic_is_thing_map()
    if args.dataset_file == "synthetic_panoptic":
        return {i: bool(isthing) for i, isthing in _categories(args).items()}
    raise ValueError(f"--dataset_file {args.dataset_file!r} has no panoptic categories; "
                     "use coco_panoptic or synthetic_panoptic")


def _categories(args) -> Dict[int, int]:
    """{category id: isthing} read from the synthetic training annotations (generated first if needed):
    the instances file for 'synthetic', the panoptic one (things and stuff) for 'synthetic_panoptic'."""
    root = synthetic.prepare_root(args)
    kind = "panoptic" if args.dataset_file == "synthetic_panoptic" else "instances"
    ann_file = Path(root) / "annotations" / f"{kind}_train2017.json"
    try:
        data = json.loads(ann_file.read_text())
        return {int(cat["id"]): int(cat.get("isthing", 1)) for cat in data["categories"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the categories of {ann_file}: {e}") from e


def recipe(dataset_file: str, masks: bool = False, two_stage: bool = True,
           reduced_precision: bool = True) -> Dict[str, object]:
    """The flag defaults a dataset brings with it (main.py applies them with parser.set_defaults, so flags given
    on the command line win): the synthetic datasets' CPU recipes, sized by whether --amp computes in 16 bits on
    this machine (`reduced_precision`); none for COCO, which keeps the original's."""
    if dataset_file not in DATASET_FILES:
        raise _unknown_dataset(dataset_file)
    return synthetic.recipe(dataset_file, masks, two_stage, reduced_precision)
