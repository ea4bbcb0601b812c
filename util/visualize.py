"""Pictures of results: predicted boxes beside the ground truth, and training curves."""

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from util.panoptic import rgb2id

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt

    return plt


def color_for(label: int) -> Tuple[float, float, float]:
    """A stable RGB colour (floats in [0, 1]) per class id (or any index): tab10's ten colours for 0-9, then hues
    stepped by the golden ratio, so that ids up to COCO's 90 do not repeat tab10's cycle and nearby ids differ."""
    import colorsys

    label = int(label)
    if label < 10:
        return tuple(float(v) for v in _pyplot().get_cmap("tab10")(label)[:3])
    return colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.8, 0.85)


def text_color_on(color) -> str:
    """'black' or 'white', whichever reads better on the background `color` (by its luminance)."""
    r, g, b = color[:3]
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.6 else "white"


def unnormalize(image: torch.Tensor) -> torch.Tensor:
    """A normalized [3, H, W] tensor back to RGB in [0, 1], [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def draw_boxes(
    ax, boxes, labels, scores: Optional[Sequence[float]], names: Dict[int, str], fontsize: float = 7
) -> None:
    """Draw xyxy pixel boxes with 'name score' labels on a matplotlib axis."""
    from matplotlib.patches import Rectangle

    for i, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = [float(v) for v in box]
        c = color_for(int(label))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=c, linewidth=2))
        text = names.get(int(label), str(int(label)))
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        ax.text(
            x0,
            y0,
            text,
            fontsize=fontsize,
            color=text_color_on(c),
            va="bottom",
            bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"),
        )


@torch.no_grad()
def save_predictions_picture(
    model, postprocessor, dataset, path, device, names: Dict[int, str], num_images: int = 4, threshold: float = 0.5
) -> None:
    """Ground truth (left) beside predictions above `threshold` (right) for the first val images."""
    plt = _pyplot()
    n = min(num_images, len(dataset))
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    was_training = model.training
    model.eval()
    for row in range(n):
        image, target = dataset[row]
        h, w = image.shape[-2:]
        outputs = model([image.to(device)])
        result = postprocessor(outputs, torch.tensor([[h, w]], device=device))[0]
        keep = result["scores"] > threshold
        prediction_title = f"prediction (score > {threshold})"
        if not keep.any():
            # An early model is rarely that confident: show its best guesses rather than an empty panel.
            keep = result["scores"] >= result["scores"].topk(min(3, len(result["scores"])))[0][-1]
            prediction_title = f"top {int(keep.sum())} predictions (all scores <= {threshold})"
        rgb = unnormalize(image)
        from util.box_ops import box_cxcywh_to_xyxy

        gt = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
        for col, (title, boxes, labels, scores) in enumerate(
            [
                ("ground truth", gt, target["labels"], None),
                (
                    prediction_title,
                    result["boxes"][keep].cpu(),
                    result["labels"][keep].cpu(),
                    result["scores"][keep].cpu(),
                ),
            ]
        ):
            ax = axes[row][col]
            ax.imshow(rgb)
            draw_boxes(ax, boxes, labels, scores, names)
            ax.set_title(title, fontsize=9)
            ax.axis("off")
    if was_training:
        model.train()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_log(log_path) -> List[dict]:
    """The JSON lines of a main.py log.txt."""
    with open(log_path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_curves_picture(log_path, path) -> None:
    """Train/val loss and box AP / AP50 per epoch, from log.txt."""
    plt = _pyplot()
    rows = read_log(log_path)
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], marker="o", label="train loss")
    if all("test_loss" in r for r in rows):
        ax_loss.plot(epochs, [r["test_loss"] for r in rows], marker="o", label="val loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("weighted loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if all("test_coco_eval_bbox" in r for r in rows):
        ax_ap.plot(epochs, [r["test_coco_eval_bbox"][0] for r in rows], marker="o", label="box AP (.50:.95)")
        ax_ap.plot(epochs, [r["test_coco_eval_bbox"][1] for r in rows], marker="o", label="box AP50")
    ax_ap.set_xlabel("epoch")
    ax_ap.set_ylabel("AP")
    best = max([r["test_coco_eval_bbox"][1] for r in rows if "test_coco_eval_bbox" in r] or [0.0])
    ax_ap.set_ylim(0, min(1.0, max(0.05, 1.2 * best)))
    ax_ap.legend()
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_per_class_picture(per_class_path, path) -> None:
    """A bar chart per class from eval/per_class.json: box AP and AP50 (mask AP with masks, PQ for panoptic
    results), one panel per kind, so that the classes that fail stand out."""
    plt = _pyplot()
    with open(per_class_path) as f:
        per_class = json.load(f)
    panels = [
        (kind, stats)
        for kind, stats in (("bbox", ("AP", "AP50")), ("segm", ("AP", "AP50")), ("panoptic", ("PQ", "SQ", "RQ")))
        if per_class.get(kind)
    ]
    titles = {"bbox": "box", "segm": "mask", "panoptic": "panoptic"}
    rows = max([len(per_class[kind]) for kind, _ in panels] + [1])
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5 * max(len(panels), 1), 1.2 + 0.3 * rows), squeeze=False)
    for ax, (kind, stats) in zip(axes[0], panels):
        entries = per_class[kind]
        names = [e["name"] for e in entries]
        height = 0.8 / len(stats)
        for j, stat in enumerate(stats):
            values = [e[stat] if e[stat] is not None else 0.0 for e in entries]
            positions = [i + (j - (len(stats) - 1) / 2) * height for i in range(len(entries))]
            ax.barh(positions, values, height=height, label=stat)
        ax.set_yticks(range(len(entries)))
        ax.set_yticklabels(names)
        ax.invert_yaxis()  # the first category on top
        ax.set_xlim(0, 1)
        ax.set_title(
            f"{titles[kind]} per class"
            + (f" (epoch {per_class['epoch']})" if per_class.get("epoch") is not None else "")
        )
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def category_names(dataset) -> Dict[int, str]:
    """{category id: name} from a COCO-style dataset, or {} when it has none."""
    coco = getattr(dataset, "coco", None)
    if isinstance(coco, dict):  # a panoptic dataset keeps the raw json
        return {int(c["id"]): c["name"] for c in coco.get("categories", [])}
    if coco is None or not hasattr(coco, "cats"):
        return {}
    return {int(k): v["name"] for k, v in coco.cats.items()}


def tint_by_category(rgb, segment_ids, categories: Dict[int, int]):
    """`rgb` [H, W, 3] floats with every segment (id -> category id) tinted in its category's colour."""
    import numpy as np

    tinted = rgb.copy()
    for segment_id, category in categories.items():
        inside = segment_ids == segment_id
        tinted[inside] = 0.35 * rgb[inside] + 0.65 * np.asarray(color_for(category)[:3])
    return tinted


@torch.no_grad()
def save_panoptic_training_picture(
    model, postprocessor, dataset, path, device, names: Dict[int, str], num_images: int = 4
) -> None:
    """Ground-truth panoptic segments (left) beside the predicted ones (right) for the first val images, each
    category in one colour on both sides, with a legend of the categories shown."""
    import io

    import numpy as np
    from matplotlib.patches import Patch
    from PIL import Image

    plt = _pyplot()
    n = min(num_images, len(dataset))
    fig, axes = plt.subplots(n, 2, figsize=(6, 3 * n), squeeze=False)
    was_training = model.training
    model.eval()
    shown = set()
    for row in range(n):
        image, target = dataset[row]
        h, w = image.shape[-2:]
        rgb = unnormalize(image).numpy().astype(np.float64)
        gt_ids = np.zeros((h, w), dtype=np.int64)
        gt_categories = {}
        for k, (mask, label) in enumerate(zip(target["masks"], target["labels"])):
            gt_ids[mask.bool().numpy()] = k + 1
            gt_categories[k + 1] = int(label)
        result = postprocessor(model([image.to(device)]), torch.tensor([[h, w]], device=device))[0]
        pred_rgb = np.asarray(Image.open(io.BytesIO(result["png_string"])).convert("RGB"))
        pred_ids = rgb2id(pred_rgb)
        pred_categories = {s["id"]: int(s["category_id"]) for s in result["segments_info"]}
        for col, (title, ids, categories) in enumerate(
            [("ground truth", gt_ids, gt_categories), ("prediction", pred_ids, pred_categories)]
        ):
            ax = axes[row][col]
            ax.imshow(tint_by_category(rgb, ids, categories))
            ax.set_title(title, fontsize=9)
            ax.axis("off")
            shown.update(categories.values())
    if was_training:
        model.train()
    handles = [Patch(color=color_for(c), label=names.get(c, str(c))) for c in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_training_pictures(model, postprocessors, dataset_val, output_dir, device) -> None:
    """predictions.png (panoptic.png for panoptic models), curves.png and per_class.png (from eval/per_class.json)
    in output_dir, refreshed after each epoch."""
    output_dir = Path(output_dir)
    names = category_names(dataset_val)
    if "panoptic" in postprocessors:
        save_panoptic_training_picture(
            model, postprocessors["panoptic"], dataset_val, output_dir / "panoptic.png", device, names
        )
    else:
        save_predictions_picture(
            model, postprocessors["bbox"], dataset_val, output_dir / "predictions.png", device, names
        )
    if (output_dir / "log.txt").exists():
        save_curves_picture(output_dir / "log.txt", output_dir / "curves.png")
    if (output_dir / "eval" / "per_class.json").exists():
        save_per_class_picture(output_dir / "eval" / "per_class.json", output_dir / "per_class.png")


# Pictures of predictions on arbitrary images (tools/predict.py, tools/attention.py) ------------------------

# COCO's 80 detection categories under their official ids; the gaps (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
# are ids reserved by the dataset but never annotated. DETR's COCO models predict these ids directly (91
# classes: ids 0..90), so a label is looked up here as it is.
COCO_NAMES: Dict[int, str] = {
    1: "person",
    2: "bicycle",
    3: "car",
    4: "motorcycle",
    5: "airplane",
    6: "bus",
    7: "train",
    8: "truck",
    9: "boat",
    10: "traffic light",
    11: "fire hydrant",
    13: "stop sign",
    14: "parking meter",
    15: "bench",
    16: "bird",
    17: "cat",
    18: "dog",
    19: "horse",
    20: "sheep",
    21: "cow",
    22: "elephant",
    23: "bear",
    24: "zebra",
    25: "giraffe",
    27: "backpack",
    28: "umbrella",
    31: "handbag",
    32: "tie",
    33: "suitcase",
    34: "frisbee",
    35: "skis",
    36: "snowboard",
    37: "sports ball",
    38: "kite",
    39: "baseball bat",
    40: "baseball glove",
    41: "skateboard",
    42: "surfboard",
    43: "tennis racket",
    44: "bottle",
    46: "wine glass",
    47: "cup",
    48: "fork",
    49: "knife",
    50: "spoon",
    51: "bowl",
    52: "banana",
    53: "apple",
    54: "sandwich",
    55: "orange",
    56: "broccoli",
    57: "carrot",
    58: "hot dog",
    59: "pizza",
    60: "donut",
    61: "cake",
    62: "chair",
    63: "couch",
    64: "potted plant",
    65: "bed",
    67: "dining table",
    70: "toilet",
    72: "tv",
    73: "laptop",
    74: "mouse",
    75: "remote",
    76: "keyboard",
    77: "cell phone",
    78: "microwave",
    79: "oven",
    80: "toaster",
    81: "sink",
    82: "refrigerator",
    84: "book",
    85: "clock",
    86: "vase",
    87: "scissors",
    88: "teddy bear",
    89: "hair drier",
    90: "toothbrush",
}

# The 53 stuff categories of COCO panoptic (ids 92..200; "-merged" ones merge several COCO-stuff classes).
# Panoptic DETR models predict things (COCO_NAMES) and these with one head of 250 classes.
COCO_PANOPTIC_STUFF_NAMES: Dict[int, str] = {
    92: "banner",
    93: "blanket",
    95: "bridge",
    100: "cardboard",
    107: "counter",
    109: "curtain",
    112: "door-stuff",
    118: "floor-wood",
    119: "flower",
    122: "fruit",
    125: "gravel",
    128: "house",
    130: "light",
    133: "mirror-stuff",
    138: "net",
    141: "pillow",
    144: "platform",
    145: "playingfield",
    147: "railroad",
    148: "river",
    149: "road",
    151: "roof",
    154: "sand",
    155: "sea",
    156: "shelf",
    159: "snow",
    161: "stairs",
    166: "tent",
    168: "towel",
    171: "wall-brick",
    175: "wall-stone",
    176: "wall-tile",
    177: "wall-wood",
    178: "water-other",
    180: "window-blind",
    181: "window-other",
    184: "tree-merged",
    185: "fence-merged",
    186: "ceiling-merged",
    187: "sky-other-merged",
    188: "cabinet-merged",
    189: "table-merged",
    190: "floor-other-merged",
    191: "pavement-merged",
    192: "mountain-merged",
    193: "grass-merged",
    194: "dirt-merged",
    195: "paper-merged",
    196: "food-other-merged",
    197: "building-other-merged",
    198: "rock-merged",
    199: "wall-other-merged",
    200: "rug-merged",
}

PICTURE_DPI = 100


def image_axes(width: int, height: int, min_side: int = 512):
    """(fig, ax, scale): a figure that is nothing but one axis showing data coordinates [0, width] x [0, height]
    (y down, as in images), enlarged by the integer `scale` so its longer side has at least `min_side`
    pixels. A point (x, y) of the image lands at pixel (x * scale, y * scale) of the saved PNG (dpi
    PICTURE_DPI, no bbox_inches): pictures of small images get readable labels and tests can find the boxes."""
    plt = _pyplot()
    scale = max(1, -(-min_side // max(width, height)))  # ceil division
    fig = plt.figure(figsize=(width * scale / PICTURE_DPI, height * scale / PICTURE_DPI), dpi=PICTURE_DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    return fig, ax, scale


def label_fontsize(width: int, height: int, scale: int) -> float:
    """Points for box labels: about 1/50 of the picture's longer side, within 8..16 points."""
    return float(min(16.0, max(8.0, max(width, height) * scale / 50 * 72 / PICTURE_DPI)))


def keep_texts_inside(ax) -> None:
    """Move every text of `ax` (with its background patch) that sticks out of the axis back inside it: the label
    of a box at the top or right border of the image would otherwise be cut off."""
    fig = ax.figure
    fig.canvas.draw()  # lays the texts out, so their extents are known
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for text in ax.texts:
        patch = text.get_bbox_patch()
        extent = (patch if patch is not None else text).get_window_extent(renderer)
        dx = max(0.0, frame.x0 - extent.x0) - max(0.0, extent.x1 - frame.x1)
        dy = max(0.0, frame.y0 - extent.y0) - max(0.0, extent.y1 - frame.y1)
        if dx or dy:
            x, y = ax.transData.transform(text.get_position())
            text.set_position(ax.transData.inverted().transform((x + dx, y + dy)))


def save_detections_picture(image, boxes, labels, scores, names: Dict[int, str], path, min_side: int = 512) -> int:
    """Save `image` (PIL or [H, W, 3] uint8) with xyxy pixel `boxes` and their 'name score' labels drawn on it,
    coloured by class (color_for), as a PNG. Returns the picture's scale factor (see image_axes)."""
    import numpy as np

    plt = _pyplot()
    rgb = np.asarray(image)
    height, width = rgb.shape[:2]
    fig, ax, scale = image_axes(width, height, min_side)
    ax.imshow(rgb, extent=(0, width, height, 0))
    draw_boxes(ax, boxes, labels, scores, names, fontsize=label_fontsize(width, height, scale))
    keep_texts_inside(ax)
    fig.savefig(path, dpi=PICTURE_DPI)
    plt.close(fig)
    return scale


def save_panoptic_picture(
    image, segment_ids, segments_info: List[dict], names: Dict[int, str], path, min_side: int = 512
) -> None:
    """Save `image` with each panoptic segment tinted in its own colour and a legend (name, share of the image)
    beside it. segment_ids [H, W]: the segment id of every pixel; segments_info: [{'id', 'category_id', ...}]."""
    import numpy as np
    from matplotlib.patches import Patch

    plt = _pyplot()
    rgb = np.asarray(image, dtype=np.float64) / 255.0
    height, width = rgb.shape[:2]
    # A colour per segment rather than per category, so that touching objects of one class stay apart.
    colour_of = {}
    handles = []
    for segment in segments_info:
        share = float((segment_ids == segment["id"]).mean())
        if share == 0:  # merged into another segment of the same stuff class
            continue
        colour_of[segment["id"]] = len(colour_of)
        name = names.get(int(segment["category_id"]), str(segment["category_id"]))
        handles.append(Patch(color=color_for(colour_of[segment["id"]]), label=f"{name} {100 * share:.0f}%"))
    fig, ax, scale = image_axes(width, height, min_side)
    ax.imshow(tint_by_category(rgb, segment_ids, colour_of), extent=(0, width, height, 0))
    fontsize = label_fontsize(width, height, scale)
    if handles:
        ax.legend(
            handles=handles,
            loc="upper left",
            bbox_to_anchor=(1.01, 1.0),
            fontsize=fontsize,
            frameon=False,
            ncol=1 + len(handles) // 25,
        )
    else:
        ax.text(
            width / 2,
            height / 2,
            "no segment above the threshold",
            ha="center",
            va="center",
            fontsize=fontsize,
            color="white",
            bbox=dict(facecolor="black", alpha=0.6, edgecolor="none"),
        )
    # The legend sits outside the axis: a tight bounding box keeps all of it in the file.
    fig.savefig(path, dpi=PICTURE_DPI, bbox_inches="tight", pad_inches=0.05)
    plt.close(fig)
