"""Box conversions and (generalized) IoU between sets of boxes."""

from typing import Tuple

import torch
from torch import Tensor


class DegenerateBoxError(AssertionError, ValueError):
    """Raised for boxes whose corner (x1, y1) is above or left of (x0, y0).

    It is an AssertionError, as callers of the original code expect, and a ValueError, as bad input is.
    """


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """(center x, center y, width, height) -> (x0, y0, x1, y1)."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """(x0, y0, x1, y1) -> (center x, center y, width, height)."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes [..., 4]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tuple[Tensor, Tensor]:
    """Pairwise IoU [..., N, M] of xyxy boxes [..., N, 4] and [..., M, 4] (any leading batch dimensions), and the
    union areas it was divided by."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    top_left = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    bottom_right = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def _check_not_degenerate(boxes1: Tensor, boxes2: Tensor) -> None:
    # A box with x1 < x0 has negative area, which would make GIoU silently wrong rather than fail. Both sets are
    # checked in one reading of a flag to the host, which waits for the GPU.
    if bool((boxes1[:, 2:] >= boxes1[:, :2]).all() & (boxes2[:, 2:] >= boxes2[:, :2]).all()):
        return
    for boxes, name in ((boxes1, "boxes1"), (boxes2, "boxes2")):
        bad = (boxes[:, 2:] < boxes[:, :2]).any(-1).nonzero().flatten()[:5].tolist()
        if bad:
            raise DegenerateBoxError(
                f"generalized_box_iou: {name} holds degenerate boxes (x1 < x0 or y1 < y0) at rows {bad}; "
                "boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0"
            )


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU [N, M] of xyxy boxes (https://giou.stanford.edu/)."""
    _check_not_degenerate(boxes1, boxes2)
    iou, union = box_iou(boxes1, boxes2)
    top_left = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    wh = (bottom_right - top_left).clamp(min=0)
    enclosing = wh[..., 0] * wh[..., 1]
    return iou - (enclosing - union) / enclosing


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes [N, 4] around the nonzero pixels of masks [N, H, W] (pixel indices, inclusive)."""
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device)
    h, w = masks.shape[-2:]
    ys = torch.arange(0, h, dtype=torch.float, device=masks.device)
    xs = torch.arange(0, w, dtype=torch.float, device=masks.device)
    ys, xs = torch.meshgrid(ys, xs, indexing="ij")
    on = masks.bool()
    x_on = masks * xs[None]
    x_max = x_on.flatten(1).max(-1)[0]
    x_min = x_on.masked_fill(~on, 1e8).flatten(1).min(-1)[0]
    y_on = masks * ys[None]
    y_max = y_on.flatten(1).max(-1)[0]
    y_min = y_on.masked_fill(~on, 1e8).flatten(1).min(-1)[0]
    return torch.stack([x_min, y_min, x_max, y_max], 1)
