"""Tests of models/matcher.py: the Hungarian matching is the cheapest one-to-one assignment (checked by brute force)."""

import itertools

import pytest
import torch
import torchvision

from helpers import tiny_args
from models.matcher import HungarianMatcher, build_matcher


def random_problem(seed, batch=2, queries=4, num_classes=5, target_counts=(3, 2)):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, num_classes + 1, generator=g),
        "pred_boxes": torch.rand(batch, queries, 4, generator=g) * 0.5 + 0.1,
    }
    targets = [
        {"labels": torch.randint(0, num_classes, (n,), generator=g), "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.1}
        for n in target_counts
    ]
    return outputs, targets


def reference_cost(logits, boxes, labels, tgt_boxes, w_class, w_bbox, w_giou):
    """The matching cost [Q, n] written independently: -p(class), L1 distance, -GIoU (torchvision's)."""
    prob = logits.softmax(-1)
    q, n = len(boxes), len(labels)
    cost = torch.zeros(q, n, dtype=torch.float64)

    def xyxy(b):
        cx, cy, w, h = b.tolist()
        return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]

    giou = (
        torchvision.ops.generalized_box_iou(
            torch.tensor([xyxy(b) for b in boxes]), torch.tensor([xyxy(b) for b in tgt_boxes])
        )
        if n
        else None
    )
    for i in range(q):
        for j in range(n):
            l1 = sum(abs(a - b) for a, b in zip(boxes[i].tolist(), tgt_boxes[j].tolist()))
            cost[i, j] = w_class * -prob[i, labels[j]].item() + w_bbox * l1 + w_giou * -giou[i, j].item()
    return cost


def brute_force_min(cost):
    """The least total cost over every injective assignment of targets (columns) to queries (rows)."""
    q, n = cost.shape
    if n <= q:
        return min(sum(cost[rows[j], j].item() for j in range(n)) for rows in itertools.permutations(range(q), n))
    return min(sum(cost[i, cols[i]].item() for i in range(q)) for cols in itertools.permutations(range(n), q))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("weights", [(1, 5, 2), (2, 1, 0), (0, 1, 1)])
def test_matching_is_optimal_against_brute_force(seed, weights):
    w_class, w_bbox, w_giou = weights
    outputs, targets = random_problem(seed, batch=3, queries=5, target_counts=(4, 1, 5))
    indices = HungarianMatcher(cost_class=w_class, cost_bbox=w_bbox, cost_giou=w_giou)(outputs, targets)
    assert len(indices) == 3
    for b, (rows, cols) in enumerate(indices):
        n = len(targets[b]["labels"])
        assert rows.dtype == cols.dtype == torch.int64
        assert len(rows) == len(cols) == n
        assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))  # one-to-one
        cost = reference_cost(
            outputs["pred_logits"][b],
            outputs["pred_boxes"][b],
            targets[b]["labels"],
            targets[b]["boxes"],
            w_class,
            w_bbox,
            w_giou,
        )
        total = sum(cost[i, j].item() for i, j in zip(rows.tolist(), cols.tolist()))
        assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_more_targets_than_queries_matches_every_query():
    outputs, targets = random_problem(7, batch=1, queries=2, target_counts=(4,))
    ((rows, cols),) = HungarianMatcher(1, 5, 2)(outputs, targets)
    assert sorted(rows.tolist()) == [0, 1] and len(set(cols.tolist())) == 2
    cost = reference_cost(
        outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]["labels"], targets[0]["boxes"], 1, 5, 2
    )
    total = sum(cost[i, j].item() for i, j in zip(rows.tolist(), cols.tolist()))
    assert total == pytest.approx(brute_force_min(cost), abs=1e-5)


def test_exact_predictions_are_matched_to_their_targets():
    # Queries 3, 0, 1 predict targets 0, 1, 2 exactly and confidently; query 2 predicts nothing useful.
    tgt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 0.3, 0.2], [0.8, 0.3, 0.2, 0.4]])
    labels = torch.tensor([4, 1, 2])
    order = [3, 0, 1]
    logits = torch.full((1, 4, 6), -5.0)
    boxes = torch.full((1, 4, 4), 0.5)
    for j, q in enumerate(order):
        logits[0, q, labels[j]] = 5.0
        boxes[0, q] = tgt_boxes[j]
    ((rows, cols),) = HungarianMatcher(1, 5, 2)(
        {"pred_logits": logits, "pred_boxes": boxes}, [{"labels": labels, "boxes": tgt_boxes}]
    )
    assert dict(zip(cols.tolist(), rows.tolist())) == {0: 3, 1: 0, 2: 1}


def test_empty_targets_give_empty_matches():
    outputs, targets = random_problem(0, batch=2, queries=4, target_counts=(0, 2))
    indices = HungarianMatcher(1, 5, 2)(outputs, targets)
    rows, cols = indices[0]
    assert rows.shape == cols.shape == (0,)
    assert rows.dtype == cols.dtype == torch.int64
    assert len(indices[1][0]) == 2
    # No target anywhere in the batch.
    outputs, targets = random_problem(0, batch=2, queries=4, target_counts=(0, 0))
    assert all(len(r) == 0 and len(c) == 0 for r, c in HungarianMatcher(1, 5, 2)(outputs, targets))


def test_all_zero_costs_are_rejected():
    with pytest.raises(ValueError, match="all costs are 0"):
        HungarianMatcher(0, 0, 0)


def test_build_matcher_reads_the_flags():
    matcher = build_matcher(tiny_args("--set_cost_class", "3", "--set_cost_bbox", "4", "--set_cost_giou", "0.5"))
    assert (matcher.cost_class, matcher.cost_bbox, matcher.cost_giou) == (3, 4, 0.5)
    default = build_matcher(tiny_args())
    assert (default.cost_class, default.cost_bbox, default.cost_giou) == (1, 5, 2)
