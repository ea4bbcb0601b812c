"""Tests of datasets/coco_panoptic.py and datasets/panoptic_eval.py on a tiny COCO panoptic set made here."""

import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets.coco_panoptic import CocoPanoptic, build
from datasets.panoptic_eval import PanopticEvaluator
from models.segmentation import PostProcessPanoptic
from util.panoptic import rgb2id
from util.config import complete_args

H, W = 6, 8
CATEGORIES = [
    {"id": 1, "name": "thing-a", "isthing": 1, "color": [220, 20, 60]},
    {"id": 3, "name": "stuff-b", "isthing": 0, "color": [0, 80, 100]},
    {"id": 7, "name": "thing-c", "isthing": 1, "color": [119, 11, 32]},
]
STUFF_ID = 70300  # = 124 + 256 * 18 + 65536 * 1: exercises all three color channels


def to_rgb(ids):
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], -1).astype(np.uint8)


def gt_id_maps():
    """image id -> (segment id map, segments_info); image 5: thing left half, stuff right half; image 2:
    a thing on the top half, a thing bottom-left and void (id 0) bottom-right."""
    a = np.zeros((H, W), dtype=np.int64)
    a[:, :4] = 1
    a[:, 4:] = STUFF_ID
    b = np.zeros((H, W), dtype=np.int64)
    b[:3] = 2
    b[3:, :4] = 5

    def seg(i, c, m, crowd=0):
        return {"id": i, "category_id": c, "area": int((m == i).sum()), "iscrowd": crowd, "bbox": [0, 0, 1, 1]}

    return {5: (a, [seg(1, 1, a), seg(STUFF_ID, 3, a)]), 2: (b, [seg(2, 1, b), seg(5, 7, b, crowd=0)])}


def write_split(img_dir, png_dir, ann_file, maps=None):
    """Images (.jpg), panoptic PNGs and the JSON of one split; annotations deliberately not in image order."""
    os.makedirs(img_dir, exist_ok=True)
    os.makedirs(png_dir, exist_ok=True)
    os.makedirs(os.path.dirname(ann_file), exist_ok=True)
    maps = maps or gt_id_maps()
    images, annotations = [], []
    for image_id, (ids, segments) in maps.items():
        name = f"{image_id:012d}"
        Image.fromarray(np.full((H, W, 3), 40 * image_id, dtype=np.uint8)).save(os.path.join(img_dir, name + ".jpg"))
        Image.fromarray(to_rgb(ids)).save(os.path.join(png_dir, name + ".png"))
        images.append({"id": image_id, "file_name": name + ".jpg", "height": H, "width": W})
        annotations.append({"image_id": image_id, "file_name": name + ".png", "segments_info": segments})
    with open(ann_file, "w") as f:
        json.dump({"images": images, "annotations": annotations[::-1], "categories": CATEGORIES}, f)


@pytest.fixture
def panoptic_root(tmp_path):
    """COCO layout: coco/{train2017,val2017}, panoptic/annotations/panoptic_*.json, panoptic/panoptic_*2017."""
    for split in ("train2017", "val2017"):
        write_split(
            tmp_path / "coco" / split,
            tmp_path / "panoptic" / f"panoptic_{split}",
            str(tmp_path / "panoptic" / "annotations" / f"panoptic_{split}.json"),
        )
    return tmp_path


def val_dataset(root, **kwargs):
    return CocoPanoptic(
        root / "coco" / "val2017",
        root / "panoptic" / "panoptic_val2017",
        root / "panoptic" / "annotations" / "panoptic_val2017.json",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------- dataset


def test_coco_panoptic_targets(panoptic_root):
    ds = val_dataset(panoptic_root)
    assert len(ds) == 2 and ds.get_height_and_width(0) == (H, W)
    img, t = ds[0]  # sorted by image id: image 2 first
    assert img.size == (W, H)
    assert t["image_id"].tolist() == [2]
    assert t["labels"].tolist() == [1, 7] and t["labels"].dtype == torch.int64
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (2, H, W)
    assert t["masks"][0, :3].all() and t["masks"][0].sum() == 24
    assert t["masks"][1, 3:, :4].all() and t["masks"][1].sum() == 12
    assert t["boxes"].tolist() == [[0, 0, 7, 2], [0, 3, 3, 5]]  # xyxy pixel indices, as masks_to_boxes gives
    assert t["area"].tolist() == [24, 12] and t["iscrowd"].tolist() == [0, 0]
    assert t["size"].tolist() == [H, W] and t["orig_size"].tolist() == [H, W]

    _, t = ds[1]
    assert t["image_id"].tolist() == [5] and t["labels"].tolist() == [1, 3]
    assert t["masks"][1, :, 4:].all() and t["masks"][1].sum() == 24  # the id spanning all three channels

    _, t = val_dataset(panoptic_root, return_masks=False)[1]
    assert "masks" not in t and t["boxes"].tolist() == [[0, 0, 3, 5], [4, 0, 7, 5]]


def test_build_with_val_transforms(panoptic_root):
    args = complete_args(
        argparse.Namespace(
            coco_path=str(panoptic_root / "coco"), coco_panoptic_path=str(panoptic_root / "panoptic"), masks=True
        )
    )
    ds = build("val", args)
    img, t = ds[1]
    assert img.shape == (3, 800, 1066)  # shorter side resized to 800
    assert t["masks"].shape == (2, 800, 1066) and t["size"].tolist() == [800, 1066]
    # the left-half mask stays the left half, and the boxes move with it (normalized cx, cy, w, h)
    assert t["masks"][0, :, :533].all() and not t["masks"][0, :, 533:].any()
    torch.testing.assert_close(t["boxes"][0], torch.tensor([1.5 / 8, 2.5 / 6, 3 / 8, 5 / 6]), atol=1e-3, rtol=0)
    assert len(build("train", args)) == 2


def test_build_names_the_missing_flag_and_layout(panoptic_root):
    args = complete_args(argparse.Namespace(coco_path=str(panoptic_root / "coco"), coco_panoptic_path=None, masks=True))
    with pytest.raises(ValueError, match="--coco_panoptic_path"):
        build("val", args)
    args.coco_panoptic_path = str(panoptic_root / "nowhere")
    with pytest.raises(FileNotFoundError, match="--coco_panoptic_path.*panoptic_"):
        build("val", args)
    args.coco_panoptic_path, args.num_classes = str(panoptic_root / "panoptic"), 5
    with pytest.raises(ValueError, match="category id 7"):
        build("val", args)


def test_missing_png_fails_before_training(panoptic_root):
    os.remove(panoptic_root / "panoptic" / "panoptic_val2017" / "000000000005.png")
    args = complete_args(
        argparse.Namespace(
            coco_path=str(panoptic_root / "coco"), coco_panoptic_path=str(panoptic_root / "panoptic"), masks=True
        )
    )
    with pytest.raises(FileNotFoundError, match="000000000005.png"):
        build("val", args)


def test_segment_missing_from_png(tmp_path):
    maps = gt_id_maps()
    ids, segments = maps[5]
    maps[5] = (ids, segments + [{"id": 99, "category_id": 7, "area": 3, "iscrowd": 0, "bbox": [0, 0, 1, 1]}])
    write_split(tmp_path / "img", tmp_path / "png", str(tmp_path / "ann.json"), maps)
    ds = CocoPanoptic(tmp_path / "img", tmp_path / "png", tmp_path / "ann.json")
    ds.validate()  # files are all there
    with pytest.raises(ValueError, match=r"000000000005.png.*\[99\]"):
        ds[1]
    with pytest.raises(ValueError, match=r"\[99\]"):
        ds.validate(check_segments=True)


def test_mismatched_file_names(tmp_path):
    write_split(tmp_path / "img", tmp_path / "png", str(tmp_path / "ann.json"))
    data = json.load(open(tmp_path / "ann.json"))
    data["annotations"][0]["file_name"] = "other.png"
    json.dump(data, open(tmp_path / "ann.json", "w"))
    with pytest.raises(ValueError, match="other.png"):
        CocoPanoptic(tmp_path / "img", tmp_path / "png", tmp_path / "ann.json")


# ---------------------------------------------------------------------------------------------- evaluation


def predicted_outputs():
    """Model outputs that PostProcessPanoptic turns into (query order = segment id):
    image 5: thing 1 on cols 0-3 (IoU 1), stuff 3 on cols 5-7 (IoU 18/24), thing 7 on col 4 (a false positive);
    image 2: thing 1 on rows 0-2 (IoU 1), thing 7 on rows 3-5 cols 0-5 (IoU 1: the void part does not count),
    stuff 3 on rows 3-5 cols 6-7 (entirely void: ignored)."""
    regions = {
        5: [(1, np.s_[:, :4]), (3, np.s_[:, 5:]), (7, np.s_[:, 4:5])],
        2: [(1, np.s_[:3, :]), (7, np.s_[3:, :6]), (3, np.s_[3:, 6:])],
    }
    num_classes = 8  # category ids are class indices; 8 is no-object
    logits, masks = [], []
    for image_id in (5, 2):
        lg, mk = torch.zeros(4, num_classes + 1), torch.full((4, H, W), -5.0)
        lg[3, num_classes] = 10.0  # a fourth query predicting no-object
        for q, (cat, region) in enumerate(regions[image_id]):
            lg[q, cat] = 10.0
            mk[q][region] = 5.0
        logits.append(lg)
        masks.append(mk)
    post = PostProcessPanoptic({i: i in (1, 7) for i in range(num_classes + 1)})
    preds = post({"pred_logits": torch.stack(logits), "pred_masks": torch.stack(masks)}, [(H, W), (H, W)])
    for p, image_id in zip(preds, (5, 2)):
        p["image_id"], p["file_name"] = image_id, f"{image_id:012d}.png"
    return preds


def test_panoptic_evaluator_equals_pq_compute(panoptic_root, tmp_path):
    from panopticapi.evaluation import pq_compute

    ann_file = str(panoptic_root / "panoptic" / "annotations" / "panoptic_val2017.json")
    gt_folder = str(panoptic_root / "panoptic" / "panoptic_val2017")
    preds = predicted_outputs()

    evaluator = PanopticEvaluator(ann_file, gt_folder, output_dir=str(tmp_path / "out" / "panoptic_eval"))
    evaluator.update(preds[:1])
    evaluator.update(preds[1:])
    evaluator.synchronize_between_processes()
    result = evaluator.summarize()
    assert "png_string" in preds[0]  # the caller's dicts are left alone
    written = json.load(open(tmp_path / "out" / "panoptic_eval" / "predictions.json"))
    assert [a["image_id"] for a in written["annotations"]] == [5, 2]

    # the same predictions written by hand and scored by panopticapi directly
    direct_dir = tmp_path / "direct"
    direct_dir.mkdir()
    for p in preds:
        (direct_dir / p["file_name"]).write_bytes(p["png_string"])
    direct_json = tmp_path / "direct.json"
    json.dump(
        {"annotations": [{k: v for k, v in p.items() if k != "png_string"} for p in preds]}, open(direct_json, "w")
    )
    direct = pq_compute(ann_file, str(direct_json), gt_folder=gt_folder, pred_folder=str(direct_dir))
    assert result == direct

    # hand-computed: category 1: 2 TP at IoU 1; category 3: 1 TP at IoU .75; category 7: 1 TP at IoU 1, 1 FP
    assert result["per_class"][1] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0})
    assert result["per_class"][3] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0})
    assert result["per_class"][7] == pytest.approx({"pq": 2 / 3, "sq": 1.0, "rq": 2 / 3})
    assert result["All"] == pytest.approx({"pq": (1 + 0.75 + 2 / 3) / 3, "sq": 2.75 / 3, "rq": (2 + 2 / 3) / 3, "n": 3})
    assert result["Things"] == pytest.approx({"pq": 5 / 6, "sq": 1.0, "rq": 5 / 6, "n": 2})
    assert result["Stuff"] == pytest.approx({"pq": 0.75, "sq": 0.75, "rq": 1.0, "n": 1})


def test_segments_of_classes_that_are_no_category_are_left_void(panoptic_root, tmp_path):
    """Class 0 (and 2, 4, 5, 6) is no category of the tiny set; a model early in training may still predict it."""
    ann_file = str(panoptic_root / "panoptic" / "annotations" / "panoptic_val2017.json")
    gt_folder = str(panoptic_root / "panoptic" / "panoptic_val2017")
    preds = predicted_outputs()
    evaluator = PanopticEvaluator(ann_file, gt_folder, output_dir=str(tmp_path / "clean"))
    evaluator.update(predicted_outputs())
    clean = evaluator.summarize()
    # Image 5's false positive (category 7 on column 4) relabelled as class 0: it is dropped, its pixels void.
    preds[0]["segments_info"][2]["category_id"] = 0
    evaluator = PanopticEvaluator(ann_file, gt_folder, output_dir=str(tmp_path / "unknown"))
    evaluator.update(preds)
    result = evaluator.summarize()
    assert result["per_class"][7] == pytest.approx({"pq": 1.0, "sq": 1.0, "rq": 1.0})  # no false positive now
    assert clean["per_class"][7]["rq"] == pytest.approx(2 / 3)
    assert result["per_class"][1] == clean["per_class"][1] and result["per_class"][3] == clean["per_class"][3]
    written = json.load(open(tmp_path / "unknown" / "predictions.json"))
    assert [s["category_id"] for s in written["annotations"][0]["segments_info"]] == [1, 3]
    ids = rgb2id(np.asarray(Image.open(tmp_path / "unknown" / "000000000005.png").convert("RGB")))
    assert (ids[:, 4] == 0).all() and (ids[:, :4] == 1).all() and (ids[:, 5:] == 2).all()
