"""Where DETR looks, for one image, as in the figures of the DETR paper: the decoder's cross-attention of each
detected object, and the encoder's self-attention at a few points of the image.

    python tools/attention.py --resume outputs/synthetic/checkpoint.pth data/synthetic/val2017/000001000001.jpg
    python tools/attention.py --hub detr_resnet50 --pretrained detr-r50-e632da11.pth photo.jpg --points 200,150 400,300

Writes to --output_dir:
    <name>_decoder_attention.png   per object scoring above --threshold: the last decoder layer's attention of
                                   its query over the image (all heads averaged), with its box
    <name>_encoder_attention.png   the image with the points marked, then per point the last encoder layer's
                                   attention of the feature cell under it over the image
Points (--points X,Y in pixels of the image) default to the centres of the detected boxes.

The weights are captured with forward hooks on the nn.MultiheadAttention modules of the last encoder and decoder
layers; those return their weights, averaged over heads, because the transformer calls them with
need_weights=True (the default).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, wherever this runs from

from tools.detector import add_model_source_args, load_detector, read_image
from util.misc import choose_device
from util.visualize import color_for, draw_boxes, keep_texts_inside, text_color_on

PROG = "tools/attention.py"
MAX_POINTS = 6


@dataclass
class AttentionMaps:
    """Attention weights of one image over its h x w feature map (the backbone's output, stride 32)."""

    decoder: Tensor  # [num_queries, h, w]: each query's cross-attention in the last decoder layer
    encoder: Optional[Tensor]  # [h, w, h, w]: each cell's self-attention in the last encoder layer (None: no layers)
    outputs: Dict[str, Tensor]  # the model's outputs (pred_logits, pred_boxes, ...)


@torch.no_grad()
def capture_attention(model: nn.Module, image: Tensor) -> AttentionMaps:
    """Run `model` (DETR or DETRsegm, in eval mode) on one normalized image [3, H, W] and keep the attention
    weights of its last encoder and decoder layers (a model without encoder layers, --enc_layers 0, gets None
    for the encoder's). The hooks are removed afterwards."""
    detr = model.detr if hasattr(model, "detr") else model
    captured = {}

    def keep(name):
        def hook(module, inputs, output):
            captured[name] = output

        return hook

    encoder_layers = detr.transformer.encoder.layers
    hooks = [
        detr.input_proj.register_forward_hook(keep("features")),
        detr.transformer.decoder.layers[-1].multihead_attn.register_forward_hook(keep("decoder")),
    ]
    if len(encoder_layers):
        hooks.append(encoder_layers[-1].self_attn.register_forward_hook(keep("encoder")))
    try:
        outputs = model([image])
    finally:
        for hook in hooks:
            hook.remove()
    if captured["decoder"][1] is None or (len(encoder_layers) and captured["encoder"][1] is None):
        raise RuntimeError(
            "the attention layers returned no weights: the transformer must call "
            "nn.MultiheadAttention with need_weights=True"
        )
    h, w = captured["features"].shape[-2:]
    # nn.MultiheadAttention's weights: [batch, target length, source length], averaged over heads.
    decoder = captured["decoder"][1][0].reshape(-1, h, w)
    encoder = captured["encoder"][1][0].reshape(h, w, h, w).cpu() if len(encoder_layers) else None
    return AttentionMaps(decoder.cpu(), encoder, outputs)


def feature_cell(point: Tuple[float, float], image_size: Tuple[int, int], feature_size: Tuple[int, int]):
    """(row, column) of the feature cell that covers pixel `point` = (x, y) of an image of (height, width)."""
    (x, y), (height, width), (h, w) = point, image_size, feature_size
    return min(int(y / height * h), h - 1), min(int(x / width * w), w - 1)


def _panels(count: int, max_columns: int = 4, size: float = 3.2):
    """A figure of `count` panels in rows of at most `max_columns`, the rows as even as possible."""
    rows = -(-count // max_columns)
    cols = -(-count // rows)
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, (size + 0.3) * rows + 0.4), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, list(axes.flat[:count])


def _show_map(ax, rgb: np.ndarray, attention: Tensor) -> None:
    """The image in grey under an attention map stretched over it (bright: much attention)."""
    height, width = rgb.shape[:2]
    ax.imshow(rgb.mean(-1), extent=(0, width, height, 0), cmap="gray", vmin=0, vmax=255)
    ax.imshow(attention.numpy(), extent=(0, width, height, 0), cmap="inferno", alpha=0.7, interpolation="bilinear")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")


def save_decoder_attention_picture(
    image,
    maps: AttentionMaps,
    queries: Sequence[int],
    boxes,
    labels,
    scores,
    names: Dict[int, str],
    path,
    title: str = "",
) -> None:
    """One panel per query of `queries`: its decoder attention over the image, with its box and label."""
    rgb = np.asarray(image)
    fig, axes = _panels(max(len(queries), 1))
    if not queries:
        axes[0].imshow(rgb)
        axes[0].set_title("no object above the threshold", fontsize=10)
        axes[0].axis("off")
    for ax, query, box, label, score in zip(axes, queries, boxes, labels, scores):
        _show_map(ax, rgb, maps.decoder[query])
        draw_boxes(ax, [box], [label], [score], names, fontsize=9)
        keep_texts_inside(ax)
        ax.set_title(f"query {query}", fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def save_encoder_attention_picture(
    image, maps: AttentionMaps, points: Sequence[Tuple[float, float]], path, title: str = ""
) -> None:
    """The image with numbered points, then per point the encoder self-attention of its feature cell."""
    rgb = np.asarray(image)
    height, width = rgb.shape[:2]
    feature_size = tuple(maps.encoder.shape[:2])
    fig, axes = _panels(len(points) + 1)
    axes[0].imshow(rgb, extent=(0, width, height, 0))
    axes[0].set_title("points", fontsize=10)
    axes[0].axis("off")
    for k, ((x, y), ax) in enumerate(zip(points, axes[1:])):
        color = color_for(k)
        for target in (axes[0], ax):
            target.plot(
                [x], [y], marker="o", markersize=9, markerfacecolor=color, markeredgecolor="white", markeredgewidth=1.5
            )
        axes[0].annotate(
            str(k + 1),
            (x, y),
            xytext=(6, 6),
            textcoords="offset points",
            color=text_color_on(color),
            fontsize=10,
            fontweight="bold",
            bbox=dict(facecolor=color, alpha=0.8, pad=1, edgecolor="none"),
        )
        row, col = feature_cell((x, y), (height, width), feature_size)
        _show_map(ax, rgb, maps.encoder[row, col])
        ax.set_title(f"point {k + 1} ({x:.0f}, {y:.0f})", fontsize=10)
    axes[0].set_xlim(0, width)
    axes[0].set_ylim(height, 0)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def parse_point(text: str) -> Tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is X,Y in pixels, e.g. 120,80; got {text!r}") from None
    return x, y


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Draw DETR's decoder and encoder attention maps for one image.")
    parser.add_argument("image", help="an image file")
    add_model_source_args(parser)
    parser.add_argument("--output_dir", default="attention", help="where the two pictures go")
    parser.add_argument("--threshold", default=0.7, type=float, help="objects scoring above this are shown")
    parser.add_argument("--max_objects", default=8, type=int, help="show at most this many objects, best first")
    parser.add_argument(
        "--points",
        nargs="+",
        type=parse_point,
        default=None,
        metavar="X,Y",
        help=f"pixels whose encoder attention to draw (default: the detected boxes' centres, "
        f"one per feature cell, at most {MAX_POINTS}; or four points spread over the image)",
    )
    parser.add_argument(
        "--size",
        default=None,
        type=int,
        help="resize the shorter side to this (default: as the model's validation images)",
    )
    parser.add_argument("--device", default="cuda", help="falls back to the CPU when CUDA is absent")
    return parser


def default_points(boxes: Tensor, width: int, height: int, feature_size: Tuple[int, int]) -> List[Tuple[float, float]]:
    """Centres of `boxes` (xyxy), one per feature cell (two points of one cell have the same map), at most
    MAX_POINTS; four points spread over the image when there is no box."""
    points, cells = [], set()
    for x0, y0, x1, y1 in boxes.tolist():
        point = ((x0 + x1) / 2, (y0 + y1) / 2)
        cell = feature_cell(point, (height, width), feature_size)
        if cell not in cells and len(points) < MAX_POINTS:
            points.append(point)
            cells.add(cell)
    return points or [(width * fx, height * fy) for fy in (0.3, 0.7) for fx in (0.3, 0.7)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        image = read_image(Path(args.image))
    except (OSError, ValueError) as e:
        raise SystemExit(f"{PROG}: error: cannot read image {args.image}: {e}") from None
    width, height = image.size
    for x, y in args.points or []:
        if not (0 <= x < width and 0 <= y < height):
            raise SystemExit(
                f"{PROG}: error: --points {x:g},{y:g} lies outside {args.image} ({width}x{height} pixels)"
            ) from None
    try:
        detector = load_detector(args.resume, args.hub, args.pretrained, choose_device(args.device), args.size)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None

    tensor = detector.transform(image, None)[0].to(detector.device)
    maps = capture_attention(detector.model, tensor)
    result = detector.postprocessors["bbox"](maps.outputs, torch.tensor([[height, width]], device=detector.device))[0]
    order = result["scores"].argsort(descending=True)
    queries = [int(q) for q in order if result["scores"][q] > args.threshold][: args.max_objects]
    boxes = result["boxes"][queries].cpu()

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    decoder_path = output_dir / f"{stem}_decoder_attention.png"
    encoder_path = output_dir / f"{stem}_encoder_attention.png"
    h, w = maps.decoder.shape[-2:]
    save_decoder_attention_picture(
        image,
        maps,
        queries,
        boxes,
        result["labels"][queries].cpu(),
        result["scores"][queries].cpu(),
        detector.names,
        decoder_path,
        title=f"decoder cross-attention, last layer ({h}x{w} feature map)",
    )
    if maps.encoder is None:
        print(
            f"{len(queries)} object(s) above {args.threshold}: {decoder_path}; no encoder picture: the model has "
            f"no encoder layers (--enc_layers 0)"
        )
        return 0
    points = args.points or default_points(boxes, width, height, (h, w))
    save_encoder_attention_picture(
        image, maps, points, encoder_path, title=f"encoder self-attention, last layer ({h}x{w} feature map)"
    )
    print(f"{len(queries)} object(s) above {args.threshold}: {decoder_path}; {len(points)} point(s): {encoder_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
