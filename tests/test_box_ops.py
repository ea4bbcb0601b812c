"""Tests of util/box_ops.py against hand-computed numbers and torchvision's independent implementations."""

import pytest
import torch
import torchvision

from util.box_ops import (
    DegenerateBoxError,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    masks_to_boxes,
)


def random_xyxy(n, generator, scale=10.0):
    corners = torch.rand(n, 2, generator=generator) * scale
    sizes = torch.rand(n, 2, generator=generator) * scale + 0.1
    return torch.cat([corners, corners + sizes], dim=1)


def test_cxcywh_to_xyxy_hand_computed():
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    expected = torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(boxes), expected)


def test_xyxy_to_cxcywh_hand_computed():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 4.0], [1.0, 3.0, 2.0, 8.0]])
    expected = torch.tensor([[1.0, 2.0, 2.0, 4.0], [1.5, 5.5, 1.0, 5.0]])
    torch.testing.assert_close(box_xyxy_to_cxcywh(boxes), expected)


def test_conversions_round_trip_on_batched_boxes():
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(2, 7, 4, generator=g)  # [batch, queries, 4], as the model outputs them
    assert box_cxcywh_to_xyxy(boxes).shape == (2, 7, 4)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(boxes)), boxes)


def test_box_area():
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 5.0], [2.0, 2.0, 2.0, 4.0]])
    torch.testing.assert_close(box_area(boxes), torch.tensor([6.0, 2.0, 0.0]))


def test_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # overlap 1, union 4 + 4 - 1 = 7
            [4.0, 4.0, 5.0, 5.0],  # disjoint, union 4 + 1 = 5
            [0.0, 0.0, 2.0, 2.0],  # identical
            [0.0, 0.0, 1.0, 2.0],
        ]
    )  # inside, half the area
    iou, union = box_iou(a, b)
    assert iou.shape == union.shape == (1, 4)
    torch.testing.assert_close(iou, torch.tensor([[1 / 7, 0.0, 1.0, 0.5]]))
    torch.testing.assert_close(union, torch.tensor([[7.0, 5.0, 4.0, 4.0]]))


def test_generalized_box_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor(
        [
            [1.0, 1.0, 3.0, 3.0],  # enclosing 3x3 = 9: 1/7 - (9 - 7) / 9
            [4.0, 4.0, 5.0, 5.0],  # enclosing 5x5 = 25: 0 - (25 - 5) / 25
            [0.0, 0.0, 2.0, 2.0],  # identical: 1
            [3.0, 0.0, 5.0, 2.0],
        ]
    )  # side by side, gap 1: enclosing 5x2 = 10: 0 - (10 - 8) / 10
    expected = torch.tensor([[1 / 7 - 2 / 9, -0.8, 1.0, -0.2]])
    torch.testing.assert_close(generalized_box_iou(a, b), expected)


def test_generalized_box_iou_matches_torchvision_on_random_boxes():
    g = torch.Generator().manual_seed(1)
    a, b = random_xyxy(6, g), random_xyxy(9, g)
    ours = generalized_box_iou(a, b)
    assert ours.shape == (6, 9)
    torch.testing.assert_close(ours, torchvision.ops.generalized_box_iou(a, b))
    torch.testing.assert_close(box_iou(a, b)[0], torchvision.ops.box_iou(a, b))
    assert bool((ours <= 1).all()) and bool((ours >= -1).all())


def test_generalized_box_iou_accepts_zero_width_boxes():
    # A box of zero width is a legitimate (if useless) box; only x1 < x0 is degenerate.
    a = torch.tensor([[1.0, 0.0, 1.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    torch.testing.assert_close(generalized_box_iou(a, b), torch.tensor([[0.0]]))


@pytest.mark.parametrize("which", ["boxes1", "boxes2"])
def test_generalized_box_iou_rejects_degenerate_boxes(which):
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.4, 0.9]])  # row 1: x1 < x0
    args = (bad, good) if which == "boxes1" else (good, bad)
    with pytest.raises(AssertionError) as info:
        generalized_box_iou(*args)
    # Callers of the original catch AssertionError; bad input is also a ValueError.
    assert isinstance(info.value, ValueError) and isinstance(info.value, DegenerateBoxError)
    message = str(info.value)
    assert which in message and "[1]" in message and "x1 >= x0" in message


def test_masks_to_boxes_hand_computed():
    masks = torch.zeros(2, 6, 8)
    masks[0, 1:4, 2:6] = 1  # rows 1..3, columns 2..5
    masks[1, 5, 0] = 1  # a single pixel in the bottom-left corner
    expected = torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 5.0, 0.0, 5.0]])
    torch.testing.assert_close(masks_to_boxes(masks), expected)
    torch.testing.assert_close(masks_to_boxes(masks), torchvision.ops.masks_to_boxes(masks.bool()))


def test_masks_to_boxes_of_no_masks_is_empty():
    out = masks_to_boxes(torch.zeros(0, 5, 5))
    assert out.shape == (0, 4)


def test_box_iou_takes_leading_batch_dimensions():
    torch.manual_seed(0)
    top_left = torch.rand(2, 5, 2)
    boxes = torch.cat([top_left, top_left + torch.rand(2, 5, 2) + 0.01], -1)
    batched, union = box_iou(boxes, boxes[:, :3])
    assert batched.shape == union.shape == (2, 5, 3)
    for b in range(2):
        iou, _ = box_iou(boxes[b], boxes[b, :3])
        torch.testing.assert_close(batched[b], iou, rtol=0, atol=0)
    torch.testing.assert_close(torch.diagonal(batched[:, :3], dim1=1, dim2=2), torch.ones(2, 3))
