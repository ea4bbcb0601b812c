"""Pictures of results: predicted boxes beside the ground truth, and training curves."""
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only: no display is needed or assumed
    import matplotlib.pyplot as plt
    return plt


def color_for(label: int):
    """A distinct, stable colour per class id."""
    plt = _pyplot()
    return plt.get_cmap("tab10")(label % 10)


def unnormalize(image: torch.Tensor) -> torch.Tensor:
    """A normalized [3, H, W] tensor back to RGB in [0, 1], [H, W, 3]."""
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0)


def draw_boxes(ax, boxes, labels, scores: Optional[Sequence[float]], names: Dict[int, str]) -> None:
    """Draw xyxy pixel boxes with 'name score' labels on a matplotlib axis."""
    from matplotlib.patches import Rectangle
    for i, (box, label) in enumerate(zip(boxes, labels)):
        x0, y0, x1, y1 = [float(v) for v in box]
        c = color_for(int(label))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=c, linewidth=2))
        text = names.get(int(label), str(int(label)))
        if scores is not None:
            text += f" {float(scores[i]):.2f}"
        ax.text(x0, y0, text, fontsize=7, color="white", va="bottom",
                bbox=dict(facecolor=c, alpha=0.8, pad=1, edgecolor="none"))


@torch.no_grad()
def save_predictions_picture(model, postprocessor, dataset, path, device, names: Dict[int, str],
                             num_images: int = 4, threshold: float = 0.5) -> None:
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
        rgb = unnormalize(image)
        from util.box_ops import box_cxcywh_to_xyxy
        gt = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
        for col, (title, boxes, labels, scores) in enumerate([
                ("ground truth", gt, target["labels"], None),
                (f"prediction (score > {threshold})", result["boxes"][keep].cpu(), result["labels"][keep].cpu(),
                 result["scores"][keep].cpu())]):
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
    ax_ap.set_ylim(0, 1)
    ax_ap.legend()
    ax_ap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def category_names(dataset) -> Dict[int, str]:
    """{category id: name} from a COCO-style dataset, or {} when it has none."""
    coco = getattr(dataset, "coco", None)
    if coco is None or not hasattr(coco, "cats"):
        return {}
    return {int(k): v["name"] for k, v in coco.cats.items()}


def save_training_pictures(model, postprocessors, dataset_val, output_dir, device) -> None:
    """predictions.png and curves.png in output_dir, refreshed after each epoch."""
    output_dir = Path(output_dir)
    save_predictions_picture(model, postprocessors["bbox"], dataset_val, output_dir / "predictions.png", device,
                             category_names(dataset_val))
    if (output_dir / "log.txt").exists():
        save_curves_picture(output_dir / "log.txt", output_dir / "curves.png")
