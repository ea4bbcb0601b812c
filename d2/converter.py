"""Convert a DETR checkpoint (written by main.py, or a published DETR file) to the detectron2 wrapper's format.

    python d2/converter.py --source outputs/checkpoint.pth --output converted.pth
    python d2/converter.py --source https://.../detr-r50-e632da11.pth --output detr_r50.pth
    cd d2 && python converter.py --source_model ... --output_model converted_model.pth   # the original's flags

The backbone's torchvision ResNet keys become detectron2's (backbone.0.body.layer1.0.bn2 ->
detr.backbone.0.backbone.res2.0.conv2.norm), every other key moves under "detr.", and the class head keeps the
rows of the dataset's categories in detectron2's contiguous order, then the no-object row (--classes).
The output is {"model": state_dict}, which detectron2's DetectionCheckpointer reads through MODEL.WEIGHTS.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

# The repository root, for util/ (this file is also run as a script from anywhere).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.checkpoint import load_checkpoint, model_state_from

# COCO's 80 category ids in the order detectron2 numbers its classes 0-79 (the ids of instances_val2017.json,
# sorted). main.py's COCO class head is indexed by these ids (91 classes + no-object).
COCO_CATEGORY_IDS = [
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
]

# Top-level modules of DETR and DETRsegm that move under "detr." as they are. (A DETRsegm state has the
# detector under "detr." already; it moves under "detr.detr.", where the wrapper's DETRsegm keeps it.)
DETR_MODULES = (
    "transformer",
    "class_embed",
    "bbox_embed",
    "query_embed",
    "input_proj",
    "backbone",
    "bbox_attention",
    "mask_head",
)
# Heads of main.py's --two_stage, which the wrapper does not build.
TWO_STAGE_MODULES = ("enc_output", "enc_output_norm", "enc_class_embed", "enc_bbox_embed")

BACKBONE_BODY = re.compile(r"^(?P<prefix>(detr\.)?backbone\.0\.)body\.(?P<rest>.+)$")
STEM = re.compile(r"^(?P<conv>conv1|bn1)\.(?P<param>.+)$")
BLOCK = re.compile(
    r"^layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<layer>conv[1-3]|bn[1-3]|downsample\.[01])\."
    r"(?P<param>.+)$"
)


class ConversionError(ValueError):
    """A key or value the wrapper has no place for; the message names it."""


def convert_backbone_key(key: str, rest: str) -> str:
    """A torchvision ResNet key (after "body.") -> detectron2's ResNet key; `key` is the full key, for errors."""
    stem = STEM.match(rest)
    if stem:
        return "stem.conv1." + stem["param"] if stem["conv"] == "conv1" else "stem.conv1.norm." + stem["param"]
    block = BLOCK.match(rest)
    if block is None:
        raise ConversionError(
            f"{key}: not a ResNet layer the detectron2 backbone has (expected conv1, bn1 or "
            "layer1-4 blocks; a torchvision 'fc' is not part of DETR's backbone)"
        )
    # torchvision's layer1..4 are detectron2's res2..res5 (named by their stride, 2^2..2^5).
    stage = f"res{int(block['stage']) + 1}.{block['block']}."
    layer, param = block["layer"], block["param"]
    if layer == "downsample.0":
        return stage + "shortcut." + param
    if layer == "downsample.1":
        return stage + "shortcut.norm." + param
    if layer.startswith("bn"):
        return stage + f"conv{layer[2]}.norm." + param
    return stage + f"{layer}.{param}"


def convert_key(key: str) -> str:
    """main.py's DETR (or DETRsegm) state_dict key -> the wrapper's key. Raises ConversionError naming the key
    for anything the wrapper cannot hold."""
    body = BACKBONE_BODY.match(key)
    if body:
        return "detr." + body["prefix"] + "backbone." + convert_backbone_key(key, body["rest"])
    # A DETRsegm key: the detector's own keys under "detr.", the mask head's beside them.
    detector_key = key[len("detr.") :] if key.startswith("detr.") else key
    top = detector_key.split(".", 1)[0]
    if top in TWO_STAGE_MODULES:
        raise ConversionError(
            f"{key}: a --two_stage head; the detectron2 wrapper builds the original's learned "
            "queries only. Convert a checkpoint trained without --two_stage"
        )
    # Besides the ResNet body, the backbone holds only a learned position embedding (backbone.1).
    if top not in DETR_MODULES or top == "backbone" and not detector_key.startswith("backbone.1."):
        raise ConversionError(
            f"{key}: not a key of this project's DETR or DETRsegm (expected "
            f"{', '.join(DETR_MODULES)}, optionally under 'detr.')"
        )
    return "detr." + key


def is_class_head(key: str) -> bool:
    return key in ("class_embed.weight", "class_embed.bias", "detr.class_embed.weight", "detr.class_embed.bias")


def remap_class_head(key: str, value: Tensor, category_ids: Sequence[int]) -> Tensor:
    """Keep the rows of `category_ids` (in that order, detectron2's contiguous classes) and the last row,
    no-object."""
    num_classes = value.shape[0] - 1
    too_large = [i for i in category_ids if not 0 <= i < num_classes]
    if too_large:
        raise ConversionError(
            f"{key} has {value.shape[0]} rows ({num_classes} classes + no-object) but the category ids asked for go "
            f"up to {max(too_large)}: pass --classes with the annotation file of the dataset this checkpoint was "
            "trained on, or --classes keep"
        )
    rows = torch.as_tensor(list(category_ids) + [num_classes], device=value.device)
    return value.index_select(0, rows)


def convert_state_dict(state: Dict[str, Tensor], category_ids: Optional[Sequence[int]]) -> Dict[str, Tensor]:
    """A DETR or DETRsegm state_dict in the wrapper's keys; with `category_ids`, the class head reduced to
    those ids (detectron2's class i is category_ids[i]) plus no-object. Raises ConversionError naming the
    first key it cannot convert."""
    converted = {}
    for key, value in state.items():
        new_key = convert_key(key)
        if category_ids is not None and is_class_head(key):
            value = remap_class_head(key, value, category_ids)
        converted[new_key] = value
    return converted


def category_ids_from(classes: str) -> Optional[List[int]]:
    """--classes: 'coco' (the 80 COCO ids), 'keep' (None: no remapping), or a COCO-format annotation file
    whose categories, sorted by id, are detectron2's classes (as register_coco_instances numbers them)."""
    if classes == "coco":
        return list(COCO_CATEGORY_IDS)
    if classes == "keep":
        return None
    if not os.path.isfile(classes):
        raise FileNotFoundError(f"--classes {classes!r}: give 'coco', 'keep' or a COCO annotation file")
    with open(classes) as f:
        try:
            categories = json.load(f)["categories"]
            return sorted(int(c["id"]) for c in categories)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--classes {classes}: not a COCO annotation file with 'categories' ({e})") from e


def convert_checkpoint(source: str, output: str, classes: str = "coco") -> Dict[str, Tensor]:
    """Read `source` (a path or URL, loaded with weights_only=True), write {"model": converted} to `output`,
    and return the converted state_dict."""
    try:
        checkpoint = load_checkpoint(source)
    except (FileNotFoundError, RuntimeError) as e:
        raise type(e)(f"--source: {e}") from None
    state = model_state_from(checkpoint, f"--source {source}")
    try:
        converted = convert_state_dict(state, category_ids_from(classes))
    except ConversionError as e:
        raise ConversionError(f"--source {source}: cannot convert {e}") from None
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": converted}, output)
    return converted


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a DETR checkpoint to the detectron2 wrapper's format")
    # --source_model and --output_model are the original d2/converter.py's names, kept so its commands still run.
    parser.add_argument(
        "--source",
        "--source_model",
        dest="source",
        required=True,
        help="main.py checkpoint or published DETR file (path or URL)",
    )
    parser.add_argument(
        "--output",
        "--output_model",
        dest="output",
        required=True,
        help="where to write the converted checkpoint (.pth)",
    )
    parser.add_argument(
        "--classes",
        default="coco",
        help="how the class head maps to detectron2's contiguous classes: 'coco' (the 80 COCO "
        "categories, for COCO and COCO-panoptic checkpoints), a COCO annotation file (its "
        "categories sorted by id, as detectron2 registers the dataset), or 'keep'",
    )
    args = parser.parse_args(argv)
    try:
        converted = convert_checkpoint(args.source, args.output, args.classes)
    except (ConversionError, FileNotFoundError, RuntimeError, ValueError) as e:  # the message names the flag
        parser.exit(1, f"error: {e}\n")
    print(f"Converted {len(converted)} tensors from {args.source} to {args.output}")


if __name__ == "__main__":
    main()
