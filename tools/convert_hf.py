"""Convert between DETR checkpoints (the original's layout: main.py's and the published files) and Hugging Face
`transformers` model folders (config.json + model.safetensors). The direction follows from SRC:

    python tools/convert_hf.py detr-resnet-50/ detr-r50.pth         # an HF folder -> a checkpoint
    python tools/convert_hf.py outputs/checkpoint.pth my-detr-hf/   # a checkpoint (path or URL) -> an HF folder

The HF folder's config comes from the checkpoint's args and weights; its id2label from the class names the
checkpoint carries, or those of --coco_path's annotations, or COCO's for 91- and 250-class COCO models; its
preprocessor_config.json resizes images as tools/predict.py does for the checkpoint (the synthetic datasets' native
size, else COCO's shorter side 800).
--backbone_layout picks the folder's ResNet names: timm's (as the hub's facebook/detr-resnet-50) or
transformers' own. --check IMAGE runs both models on the image and prints the largest difference of their
outputs (it needs `transformers`; the conversion does not). Nothing is written when the conversion fails.
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, wherever this runs from

from models import build_model
from tools.detector import checkpoint_args, dataset_names, read_image, resize_transform
from util.checkpoint import CheckpointError, load_checkpoint, model_state_from
from util.config import complete_args
from util.hf import CONFIG_NAME, HFFolderError, args_of_checkpoint, is_hf_folder, read_hf_folder, write_hf_folder
from util.misc import NestedTensor

PROG = "tools/convert_hf.py"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="an HF model folder (with config.json), or a checkpoint: a .pth path or URL")
    parser.add_argument("destination", help="the checkpoint file (.pth) or the new HF model folder to write")
    parser.add_argument(
        "--backbone_layout",
        default="timm",
        choices=("timm", "transformers"),
        help="checkpoint -> HF: the ResNet names of the folder",
    )
    parser.add_argument(
        "--coco_path",
        help="checkpoint -> HF: a COCO-format dataset root whose "
        "annotations/instances_val2017.json names the classes (id2label)",
    )
    parser.add_argument(
        "--check",
        metavar="IMAGE",
        help="run both models on IMAGE and print the largest difference (needs transformers)",
    )
    parser.add_argument("--size", default=800, type=int, help="--check: the image's shorter side")
    return parser


def full_args(checkpoint: dict, source: str) -> argparse.Namespace:
    """main.py's flags that rebuild the checkpoint's model: its args, with the architecture its weights show
    (a published or plain checkpoint may carry no args)."""
    state = model_state_from(checkpoint, source)
    return checkpoint_args({"args": args_of_checkpoint(checkpoint, state, source)}, state, source)


def class_names(checkpoint: dict, args: argparse.Namespace, coco_path) -> dict:
    """{class id: name} for id2label: --coco_path's, the checkpoint's own, else those of its dataset (COCO's
    for 91- and 250-class COCO models)."""
    if coco_path:
        names = dataset_names(argparse.Namespace(**{**vars(args), "coco_path": coco_path, "dataset_file": "coco"}))
        if not names:
            raise SystemExit(
                f"--coco_path {coco_path}: no annotations/instances_val2017.json there to name the classes"
            )
        return names
    if checkpoint.get("class_names"):
        return checkpoint["class_names"]
    if args.dataset_file == "coco" and args.num_classes == 250:
        args = argparse.Namespace(**{**vars(args), "dataset_file": "coco_panoptic"})  # a published panoptic model
    return dataset_names(args)


def validation_resize(args: argparse.Namespace) -> Tuple[int, int]:
    """(shorter side, cap of the longer side) of the images the checkpoint's model was evaluated on, which
    tools/predict.py resizes to and the HF folder's pipelines must too: the synthetic datasets' native size
    (datasets/synthetic.py's val transform), else COCO evaluation's 800 and 1333."""
    if args.dataset_file in ("synthetic", "synthetic_panoptic"):
        # The synthetic val transform caps nothing, where transformers' processor needs a cap: one that binds only
        # past an aspect ratio of 1000.
        return args.synthetic_image_size, 1000 * args.synthetic_image_size
    return 800, 1333


def project_model(checkpoint: dict, source: str) -> torch.nn.Module:
    """The project's DETR with the checkpoint's weights, in eval mode on the CPU."""
    args = full_args(checkpoint, source)
    args.device = "cpu"
    model = build_model(args)[0]
    model.load_state_dict(model_state_from(checkpoint, source))
    return model.eval()


@torch.no_grad()
def largest_differences(checkpoint: dict, source: str, hf_folder: Path, image_path: str, size: int) -> dict:
    """{output name: largest absolute difference} of the project's model and transformers' on one image."""
    try:
        import transformers  # only here: the conversion itself needs no transformers
    except ImportError as e:
        raise SystemExit(
            "--check compares with Hugging Face transformers, which is not installed: "
            "pip install -r requirements-dev.txt (or pip install transformers timm)"
        ) from e

    masks = any(k.startswith("mask_head.") for k in model_state_from(checkpoint, source))
    hf_class = transformers.DetrForSegmentation if masks else transformers.DetrForObjectDetection
    hf_model = hf_class.from_pretrained(str(hf_folder)).eval()
    ours = project_model(checkpoint, source)
    image = resize_transform(size)(read_image(Path(image_path)), None)[0][None]
    theirs = hf_model(pixel_values=image, pixel_mask=torch.ones(image.shape[0], *image.shape[-2:], dtype=torch.long))
    out = ours(NestedTensor(image, torch.zeros(image.shape[0], *image.shape[-2:], dtype=torch.bool)))
    pairs = {"pred_logits": theirs.logits, "pred_boxes": theirs.pred_boxes}
    if masks:
        pairs["pred_masks"] = theirs.pred_masks
    return {name: (out[name] - value).abs().max().item() for name, value in pairs.items()}


def save_checkpoint_file(checkpoint: dict, destination: Path) -> None:
    """torch.save through a temporary file in the same folder: an interrupted write leaves nothing behind."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=destination.name + ".tmp.", dir=destination.parent)
    os.close(handle)
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def main(argv=None) -> dict:
    """Convert SRC to DST; returns {output name: largest difference} with --check, else {}."""
    args = get_args_parser().parse_args(argv)
    destination = Path(args.destination)
    try:
        if is_hf_folder(args.source):
            if destination.is_dir() or destination.suffix != ".pth":
                raise SystemExit(f"{args.destination}: an HF folder converts to a checkpoint file; give a .pth path")
            if args.coco_path:
                raise SystemExit(
                    "--coco_path names the classes of an HF folder written from a checkpoint; an HF "
                    "folder carries its own (id2label)"
                )
            checkpoint = read_hf_folder(args.source)
            checkpoint.pop("hf_backbone_layout", None)
            # config.json's flags with main.py's defaults for the rest, as a checkpoint main.py writes carries them.
            checkpoint["args"] = complete_args(checkpoint["args"])
            hf_folder, source = Path(args.source), args.source
            save_checkpoint_file(checkpoint, destination)
            print(f"wrote {destination} ({len(checkpoint['model'])} tensors)")
        else:
            if os.path.isfile(args.source) is False and not args.source.startswith(("http://", "https://")):
                raise SystemExit(
                    f"{args.source}: no such file or folder (a checkpoint .pth, its URL, or an HF "
                    f"model folder with {CONFIG_NAME})"
                )
            checkpoint = load_checkpoint(args.source)
            if not isinstance(checkpoint, dict) or "model" not in checkpoint:
                checkpoint = {"model": model_state_from(checkpoint, args.source)}  # a plain state_dict
            model_args = full_args(checkpoint, args.source)
            names = class_names(checkpoint, model_args, args.coco_path)
            resize = validation_resize(model_args)
            write_hf_folder(checkpoint, destination, args.source, args.backbone_layout, names or None, resize)
            hf_folder, source = destination, args.source
            print(f"wrote {destination}/{CONFIG_NAME} and model.safetensors ({args.backbone_layout} backbone names)")
    except (CheckpointError, HFFolderError, ValueError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"{PROG}: {e}") from None
    if not args.check:
        return {}
    differences = largest_differences(checkpoint, source, hf_folder, args.check, args.size)
    for name, value in differences.items():
        print(f"--check {args.check}: largest difference of {name}: {value:.3g}")
    return differences


if __name__ == "__main__":
    main()
