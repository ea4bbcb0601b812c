"""Export a DETR to ONNX with a dynamic batch size, height and width, then check it against PyTorch.

    python tools/export_onnx.py --resume outputs/synthetic/checkpoint.pth --output detr.onnx
    python tools/export_onnx.py --hub detr_resnet50 --pretrained detr-r50-e632da11.pth --check photo.jpg

The ONNX model takes `images`, a float32 batch [B, 3, H, W] resized and normalized as tools/predict.py does
(ImageNet mean and std) and all of one size (there is no padding mask), and returns `pred_logits` [B, Q, classes + 1]
and `pred_boxes` [B, Q, 4] (cx, cy, w, h relative to the image), DETR's own outputs; of a segmentation model,
the detection part is exported. The exporter is torch.onnx's dynamo one (torch.export with dynamic shapes).

The check runs the file with onnxruntime on the --check images (each at the size the model's preprocessing gives
it), or on random images when none are given, always at sizes other than the export example's, prints the
largest absolute difference from PyTorch and exits with status 1 when it exceeds --tolerance.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, wherever this runs from

from models.position_encoding import PositionEmbeddingLearned
from tools.detector import add_model_source_args, list_images, load_detector, read_image

PROG = "tools/export_onnx.py"

EXAMPLE_SIZE = (2, 3, 224, 288)  # batch, channels, height, width of the example the exporter traces
OUTPUT_NAMES = ("pred_logits", "pred_boxes")


class DetectionOutputs(nn.Module):
    """DETR's forward on a plain image batch, as the tuple (pred_logits, pred_boxes) ONNX outputs need."""

    def __init__(self, detr: nn.Module):
        super().__init__()
        self.detr = detr

    def forward(self, images: Tensor) -> Tuple[Tensor, Tensor]:
        outputs = self.detr(images)
        return outputs["pred_logits"], outputs["pred_boxes"]


def detection_module(model: nn.Module) -> DetectionOutputs:
    """The detection part of a DETR or DETRsegm, wrapped for export, in eval mode."""
    detr = model.detr if hasattr(model, "detr") else model
    return DetectionOutputs(detr).eval()


# Older torch.export refuses the model's dynamic height and width, or has no dynamic_shapes (docs/versions.md).
ONNX_MIN_TORCH = (2, 10)


def torch_exports_onnx(version: str = torch.__version__) -> bool:
    """Whether this torch (a version string like '2.14.1+cpu') is one whose exporter handles DETR's dynamic sizes."""
    major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    return (major, minor) >= ONNX_MIN_TORCH


def export(module: DetectionOutputs, path, example_size: Sequence[int] = EXAMPLE_SIZE) -> None:
    """Write `module` to the ONNX file `path`, batch, height and width left dynamic."""
    if not torch_exports_onnx():
        need = ".".join(map(str, ONNX_MIN_TORCH))
        raise RuntimeError(f"ONNX export needs torch {need} or newer (this is torch {torch.__version__})")
    position = module.detr.backbone[1]
    # Learned position embeddings have a fixed number of rows and columns (one per feature cell, stride 32).
    max_side = 32 * position.row_embed.num_embeddings if isinstance(position, PositionEmbeddingLearned) else 4096
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = torch.export.Dim("height", min=32, max=max_side)
    width = torch.export.Dim("width", min=32, max=max_side)
    device = next(module.parameters()).device
    example = torch.randn(*example_size, device=device)
    # onnxscript's optimizer warns once per multi-output Split it leaves unfolded (dozens): noise, not news.
    logging.getLogger("onnxscript.optimizer").setLevel(logging.ERROR)
    torch.onnx.export(
        module,
        (example,),
        str(path),
        dynamo=True,
        input_names=["images"],
        output_names=list(OUTPUT_NAMES),
        dynamic_shapes={"images": {0: batch, 2: height, 3: width}},
        verbose=False,
    )


@torch.no_grad()
def largest_difference(module: DetectionOutputs, path, batches: Sequence[Tensor]) -> float:
    """The largest absolute difference between onnxruntime running the file `path` and PyTorch running
    `module`, over all outputs of all `batches`."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    device = next(module.parameters()).device
    worst = 0.0
    for batch in batches:
        expected = module(batch.to(device))
        got = session.run(list(OUTPUT_NAMES), {"images": batch.cpu().numpy()})
        for name, e, g in zip(OUTPUT_NAMES, expected, got):
            if tuple(g.shape) != tuple(e.shape):
                raise RuntimeError(f"ONNX output {name} has shape {g.shape}, PyTorch's {tuple(e.shape)}")
            difference = (torch.from_numpy(g) - e.cpu()).abs().max().item()
            print(f"  batch {list(batch.shape)}: {name} differs by at most {difference:.3g}")
            worst = max(worst, difference)
    return worst


def check_batches(transform, images: Sequence[str]) -> List[Tensor]:
    """Batches to check with: each of `images` alone, preprocessed by `transform`; without images, random
    ones of two sizes other than the export example's, one of them a batch of 3."""
    if images:
        return [transform(read_image(path), None)[0][None] for path in list_images(images)]
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(1, 3, 200, 150, generator=generator), torch.randn(3, 3, 128, 320, generator=generator)]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        PROG, description="Export DETR to ONNX and check it against PyTorch with onnxruntime."
    )
    add_model_source_args(parser)
    parser.add_argument("--output", default="detr.onnx", help="the ONNX file to write")
    parser.add_argument(
        "--check",
        nargs="*",
        default=[],
        metavar="IMAGE",
        help="images (or folders) to compare onnxruntime and PyTorch on (default: random images)",
    )
    parser.add_argument(
        "--tolerance",
        default=1e-4,
        type=float,
        help="largest absolute output difference accepted (exit status 1 above it)",
    )
    parser.add_argument("--device", default="cpu", help="device PyTorch runs on for the export and the check")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        detector = load_detector(args.resume, args.hub, args.pretrained, args.device)
        batches = check_batches(detector.transform, args.check)
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    module = detection_module(detector.model)
    if not torch_exports_onnx():
        need = ".".join(map(str, ONNX_MIN_TORCH))
        raise SystemExit(f"{PROG}: error: ONNX export needs torch {need} or newer (this is torch {torch.__version__})")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    export(module, output)
    print(f"wrote {output}; checking it against PyTorch with onnxruntime:")
    worst = largest_difference(module, output, batches)
    verdict = "within" if worst <= args.tolerance else "ABOVE"
    print(f"largest difference {worst:.3g}, {verdict} the tolerance {args.tolerance:g}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
