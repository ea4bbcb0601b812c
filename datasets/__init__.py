"""Datasets: what each --dataset_file brings, in one table (DATASETS), and the functions main.py asks of it:
build_dataset, num_classes, thing_classes, box_ground_truth, and the flags' defaults it brings (its recipe:
parse_args_with_recipe, show_recipe). A new dataset is one more entry."""

import argparse
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch.utils.data
import torchvision

from util.amp import automatic_choice_is_reduced
from util.misc import COCO_NUM_CLASSES, coco_panoptic_is_thing_map

from . import coco, synthetic
from .transforms import output_image_size


def _build_coco_panoptic(image_set: str, args):
    from .coco_panoptic import build  # imported here: panopticapi is optional

    return build(image_set, args)


@dataclass(frozen=True)
class DatasetFile:
    """What one --dataset_file brings: how to build it, its class-head size, its thing classes (panoptic data
    only), the instance dataset its box AP is measured against (panoptic data only, else its own), and the flag
    defaults it sets (its recipe: (masks, two_stage, reduced_precision) -> {flag: value})."""

    build: Callable[[str, Any], Any]
    num_classes: Callable[[Any], int]
    thing_classes: Optional[Callable[[Any], List[int]]] = None
    build_instances: Optional[Callable[[str, Any], Any]] = None
    recipe: Optional[Callable[[bool, bool, bool], Dict[str, Any]]] = None


DATASETS: Dict[str, DatasetFile] = {
    # The original's class heads (util.misc.COCO_NUM_CLASSES); COCO panoptic's things are the ids up to 90.
    "coco": DatasetFile(build=coco.build, num_classes=lambda args: COCO_NUM_CLASSES["coco"]),
    "coco_panoptic": DatasetFile(
        build=_build_coco_panoptic,
        num_classes=lambda args: COCO_NUM_CLASSES["coco_panoptic"],
        thing_classes=lambda args: sorted(i for i, thing in coco_panoptic_is_thing_map().items() if thing),
        build_instances=coco.build,
    ),
    # Generated here; class counts and thing classes read from the annotations it writes (datasets/synthetic.py).
    "synthetic": DatasetFile(
        build=synthetic.build, num_classes=synthetic.num_classes, recipe=synthetic.detection_recipe
    ),
    "synthetic_panoptic": DatasetFile(
        build=synthetic.build_panoptic,
        num_classes=lambda args: synthetic.num_classes(args, panoptic=True),
        thing_classes=synthetic.thing_classes,
        build_instances=synthetic.build,
        recipe=synthetic.panoptic_recipe,
    ),
}
DATASET_FILES = tuple(DATASETS)


def dataset_file(name: str) -> DatasetFile:
    """The DATASETS entry of --dataset_file `name`; an unknown name raises, listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"--dataset_file {name!r} is not supported; choose one of {', '.join(DATASET_FILES)}")
    return DATASETS[name]


def build_dataset(image_set: str, args):
    """The dataset of `image_set` ('train' or 'val') named by `args.dataset_file`."""
    return dataset_file(args.dataset_file).build(image_set, args)


def get_coco_api_from_dataset(dataset):
    """The pycocotools COCO object behind `dataset` (through any Subset wrappers), or None if it has none."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, torchvision.datasets.CocoDetection):
        return dataset.coco
    return None


def num_classes(args) -> int:
    """The class-head size (max category id + 1): --num_classes when given, else the dataset's own (91 for
    COCO and 250 for COCO panoptic as in the original; read from the annotations for the synthetic datasets)."""
    if args.num_classes is not None:
        return args.num_classes
    return dataset_file(args.dataset_file).num_classes(args)


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


def thing_classes(args) -> Optional[List[int]]:
    """The sorted thing category ids of a panoptic dataset (for the panoptic post-processor, and the proposals'
    classes with --learned_queries); None for a dataset without panoptic categories."""
    things = dataset_file(args.dataset_file).thing_classes
    return None if things is None else things(args)


def box_ground_truth(dataset_val, args):
    """The COCO ground truth box AP is measured against: that of `dataset_val`, or for panoptic data that of the
    instance annotations of the same images."""
    instances = dataset_file(args.dataset_file).build_instances
    return get_coco_api_from_dataset(dataset_val if instances is None else instances("val", args))


def has_recipe(name: str) -> bool:
    """Whether --dataset_file `name` sets flag defaults of its own."""
    return dataset_file(name).recipe is not None


def recipe(name: str, masks: bool = False, two_stage: bool = True, reduced_precision: bool = True) -> Dict[str, Any]:
    """The flag defaults --dataset_file `name` brings (main.py applies them with parser.set_defaults, so flags
    given on the command line win): the synthetic datasets' CPU recipes, sized by whether --amp computes in 16
    bits on this machine (`reduced_precision`); none for COCO, which keeps the original's."""
    make = dataset_file(name).recipe
    return {} if make is None else make(masks, two_stage, reduced_precision)


def recipe_for_device(name: str, masks: bool, two_stage: bool, device: str) -> Dict[str, Any]:
    """recipe(), sized by what --amp computes in on `device` (a --device flag)."""
    # The device is asked only for a dataset with a recipe: a COCO run starts no CUDA while parsing its flags.
    reduced = automatic_choice_is_reduced(device) if has_recipe(name) else True
    return recipe(name, masks, two_stage, reduced)


def parse_args_with_recipe(
    parser: argparse.ArgumentParser, argv: Sequence[str], defaults: Optional[Dict[str, Any]] = None
) -> argparse.Namespace:
    """Parse argv with the recipe of the dataset it names as the parser's defaults, so that every flag given still
    wins, abbreviated or not, and --help shows the defaults in effect; `defaults` (a launcher's) win over the
    recipe's. The recipe depends on --dataset_file, --masks, --two_stage and --device and may itself turn
    --two_stage on, so argv is read for them (without --help) until the recipe they give stays the same."""
    probe = [a for a in argv if a not in ("-h", "--help")]
    own = {}  # the parser's own defaults of the flags a recipe set, restored where the next recipe has none
    applied = None
    for _ in range(3):
        known, _ = parser.parse_known_args(probe)
        flags = recipe_for_device(known.dataset_file, known.masks, known.two_stage, known.device)
        if flags == applied:
            break
        own.update({name: parser.get_default(name) for name in flags if name not in own})
        parser.set_defaults(**{**own, **flags})
        applied = flags
    if applied:
        listing = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in applied.items())
        parser.epilog = (
            f"--dataset_file {known.dataset_file} sets these defaults (shown above; flags given win): {listing}"
        )
    parser.set_defaults(**(defaults or {}))
    return parser.parse_args(argv)


def show_recipe(args, device: str, printed: bool = True) -> Optional[Dict[str, Any]]:
    """Print on one line the flags the dataset's recipe sets, with the values this run uses (and the recipe's
    where a flag given replaced it), so that what a demo runs is seen without reading code; returns the same as
    written to output_dir/recipe.json, None for a dataset without a recipe (COCO)."""
    flags = recipe_for_device(args.dataset_file, args.masks, args.two_stage, device)
    if not flags:
        return None
    source = dataset_file(args.dataset_file).recipe.__module__.replace(".", "/") + ".py"
    used = {name: getattr(args, name) for name in flags}
    replaced = {name: value for name, value in flags.items() if used[name] != value}
    listing = " ".join(
        f"{name}={value}" + (f" (recipe {replaced[name]})" if name in replaced else "") for name, value in used.items()
    )
    if printed:
        print(f"Recipe of --dataset_file {args.dataset_file} ({source}; flags given win): {listing}")
    return {
        "dataset_file": args.dataset_file,
        "defined_in": source,
        "flags": used,
        "recipe_values_replaced_by_flags_given": replaced,
    }
