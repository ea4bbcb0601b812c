"""The two-stage panoptic recipe through main.py on the synthetic panoptic data: boxes first, then the mask head
on the frozen detector, evaluated with box AP, segm AP and PQ."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import MASK_HEAD_FLAGS, load_checkpoint_safely, run_main, tensorboard_scalars, tiny_flags

# The mask head's group norms need hidden_dim + nheads and hidden_dim / 2..16 to be multiples of 8.
PANOPTIC_FLAGS = ["--dataset_file", "synthetic_panoptic", *MASK_HEAD_FLAGS, "--epochs", "1"]


@pytest.fixture(scope="module")
def two_stage(tmp_path_factory, synthetic_root):
    out = tmp_path_factory.mktemp("panoptic")
    boxes, masks = out / "boxes", out / "masks"
    run_main(tiny_flags(synthetic_root, boxes, *PANOPTIC_FLAGS))
    stats, printed = run_main(
        tiny_flags(synthetic_root, masks, *PANOPTIC_FLAGS, "--masks", "--frozen_weights", str(boxes / "checkpoint.pth"))
    )
    return boxes, masks, stats, printed


@pytest.mark.slow
def test_mask_stage_logs_box_segm_and_panoptic_metrics(two_stage):
    _, masks, stats, printed = two_stage
    line = json.loads((masks / "log.txt").read_text().splitlines()[-1])
    assert len(line["test_coco_eval_bbox"]) == 12 and len(line["test_coco_eval_masks"]) == 12
    for key in ("PQ_all", "PQ_th", "PQ_st"):
        assert set(line[f"test_{key}"]) == {"pq", "sq", "rq", "n"}
    # 5 thing and 3 stuff categories exist; the 8 val images hold every stuff class and some things.
    assert line["test_PQ_st"]["n"] == 3 and 1 <= line["test_PQ_th"]["n"] <= 5
    assert line["test_PQ_all"]["n"] == line["test_PQ_th"]["n"] + line["test_PQ_st"]["n"]
    assert "PQ" in printed and "Stuff" in printed
    pngs = list((masks / "panoptic_eval").glob("*.png"))
    assert len(pngs) == 8


@pytest.mark.slow
def test_mask_stage_writes_pq_per_class_the_best_pq_and_tensorboard(two_stage):
    _, masks, _, _ = two_stage
    line = json.loads((masks / "log.txt").read_text().splitlines()[-1])
    per_class = json.loads((masks / "eval" / "per_class.json").read_text())
    assert set(per_class) == {"epoch", "bbox", "segm", "panoptic"}
    panoptic = {row["name"]: row for row in per_class["panoptic"]}
    assert {"sky", "water", "ground"} <= set(panoptic)  # the stuff classes, by their names in the annotations
    # PQ of all classes is the mean of the per-class PQ over the n classes that occur (pq_compute's average; it
    # gives the others 0).
    assert len(per_class["panoptic"]) == 8
    assert sum(row["PQ"] for row in per_class["panoptic"]) / line["test_PQ_all"]["n"] == pytest.approx(
        line["test_PQ_all"]["pq"], rel=1e-9
    )
    assert all(row["PQ"] == pytest.approx(row["SQ"] * row["RQ"], rel=1e-9) for row in per_class["panoptic"])
    best = load_checkpoint_safely(masks / "checkpoint_best.pth")["best"]
    assert best == {"metric": "test_PQ_all.pq", "value": line["test_PQ_all"]["pq"], "epoch": 0}
    scalars = tensorboard_scalars(masks / "tensorboard")
    assert scalars["test/PQ_all/pq"][0][1] == pytest.approx(line["test_PQ_all"]["pq"], rel=1e-6)
    assert [v for _, v in scalars["test/segm/AP"]] == pytest.approx([line["test_coco_eval_masks"][0]], abs=1e-7)
    assert (masks / "per_class.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_mask_stage_trains_only_the_mask_head(two_stage):
    boxes, masks, _, _ = two_stage
    detector = load_checkpoint_safely(boxes / "checkpoint.pth")["model"]
    segm = load_checkpoint_safely(masks / "checkpoint.pth")["model"]
    assert set(segm) == {f"detr.{k}" for k in detector} | {k for k in segm if not k.startswith("detr.")}
    assert any(k.startswith("mask_head.") for k in segm) and any(k.startswith("bbox_attention.") for k in segm)
    for k, v in detector.items():
        assert torch.equal(segm[f"detr.{k}"], v), k


@pytest.mark.slow
def test_panoptic_picture_shows_ground_truth_beside_prediction(two_stage):
    _, masks, _, _ = two_stage
    picture = Image.open(masks / "panoptic.png")
    assert picture.size[0] > 300 and picture.size[1] > 600
    colours = np.unique(np.asarray(picture.convert("RGB")).reshape(-1, 3), axis=0)
    assert len(colours) > 50  # images with tinted segments, not a blank canvas


def test_frozen_weights_of_another_architecture_is_refused(tmp_path, synthetic_root):
    box_run = tmp_path / "boxes"
    run_main(tiny_flags(synthetic_root, box_run, *PANOPTIC_FLAGS))
    # The same flags but another number of queries: the detector's query embeddings do not fit.
    with pytest.raises(ValueError, match=r"(?s)--frozen_weights .*query_embed.weight: checkpoint \[8, 128\]"):
        run_main(
            tiny_flags(
                synthetic_root,
                tmp_path / "masks",
                *PANOPTIC_FLAGS,
                "--num_queries",
                "12",
                "--masks",
                "--frozen_weights",
                str(box_run / "checkpoint.pth"),
            )
        )
    assert not (tmp_path / "masks" / "checkpoint.pth").exists()


@pytest.mark.slow
def test_two_stage_recipe_with_learned_queries(tmp_path, synthetic_root):
    """The synthetic_panoptic recipe, tiny: a two-stage detector whose last 2 queries are learned, then the mask
    head on it, frozen, with the amplified attention weights and the lower panoptic threshold."""
    boxes, masks = tmp_path / "boxes", tmp_path / "masks"
    recipe = ["--two_stage", "--feature_stride", "8", "--enc_layers", "0", "--learned_queries", "2"]
    run_main(tiny_flags(synthetic_root, boxes, *PANOPTIC_FLAGS, *recipe))
    box_line = json.loads((boxes / "log.txt").read_text().splitlines()[-1])
    assert box_line["train_loss_ce_enc"] > 0 and len(box_line["test_coco_eval_bbox"]) == 12
    detector = load_checkpoint_safely(boxes / "checkpoint.pth")
    assert detector["model"]["query_embed.weight"].shape == (2, 128)
    assert detector["args"].thing_classes == [1, 2, 3, 4, 5]  # what the proposals learnt
    run_main(
        tiny_flags(
            synthetic_root,
            masks,
            *PANOPTIC_FLAGS,
            *recipe,
            "--masks",
            "--frozen_weights",
            str(boxes / "checkpoint.pth"),
            "--mask_attention_gain",
            "100",
            "--panoptic_threshold",
            "0.5",
        )
    )
    line = json.loads((masks / "log.txt").read_text().splitlines()[-1])
    assert line["test_PQ_st"]["n"] == 3 and line["test_PQ_all"]["n"] == line["test_PQ_th"]["n"] + 3
    assert len(line["test_coco_eval_masks"]) == 12
    segm = load_checkpoint_safely(masks / "checkpoint.pth")
    for k, v in detector["model"].items():
        assert torch.equal(segm["model"][f"detr.{k}"], v), k
    assert segm["args"].mask_attention_gain == 100 and segm["args"].panoptic_threshold == 0.5
    # Another number of learned queries is another detector: refused before training.
    with pytest.raises(ValueError, match=r"(?s)--frozen_weights .*query_embed.weight: checkpoint \[2, 128\]"):
        run_main(
            tiny_flags(
                synthetic_root,
                tmp_path / "other",
                *PANOPTIC_FLAGS,
                *recipe[:-1],
                "3",
                "--masks",
                "--frozen_weights",
                str(boxes / "checkpoint.pth"),
            )
        )
    assert not (tmp_path / "other" / "checkpoint.pth").exists()
