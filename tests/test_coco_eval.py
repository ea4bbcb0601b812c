"""datasets/coco_eval.py: batch-wise, multi-process evaluation on faster-coco-eval gives pycocotools' numbers."""

import contextlib
import copy
import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

import datasets.coco_eval as coco_eval_module
from datasets.coco_eval import CocoEvaluator, box_ious_by_pair, ground_truth_arrays, per_category_ap
from faster_coco_eval import COCOeval_faster
from util.plot_utils import load_coco_eval

HEIGHT, WIDTH = 80, 96
NO_DETECTIONS, NO_GROUND_TRUTH, CROWDED = 5, 7, 3  # image ids with a special role in the generated cases

# pycocotools' precision is tp / (tp + fp + eps), faster-coco-eval's tp / (tp + fp). For tp + fp >= 2 the eps is
# lost in rounding, so the two differ only where a category's best-scored detection is a true positive and no
# later prefix is all true positives: 1 - 2.2e-16 against 1.0. Everything else must be bit for bit equal.
ONE_BELOW_ONE = 1.0 / (1.0 + np.spacing(1))


def polygon_mask(polygon):
    return mask_util.decode(mask_util.frPyObjects([polygon], HEIGHT, WIDTH))[..., 0]


def rectangle(x0, y0, w, h):
    return [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]


def make_ground_truth_and_predictions(
    num_images=12, seed=0, num_categories=3, crowded_image=False, tied_scores=False, unseen_category=False
):
    """A random COCO ground truth (rectangles and triangles, a few crowd) and predictions near it: jittered
    copies with random scores, missed objects, false positives, an image without detections (5) and one
    without ground truth (7). crowded_image: image 3 also gets 150 false positives of the class of one of
    its objects, more than maxDets=100. tied_scores: scores rounded to sixteenths, so ranks tie across and
    within images. unseen_category: one more category, given to false positives only (no ground truth)."""
    detected_categories = num_categories + int(unseen_category)
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": HEIGHT, "width": WIDTH})
        boxes, scores, labels, masks = [], [], [], []
        num_objects = 0 if image_id == NO_GROUND_TRUTH else rng.integers(0, 5)
        crowded = crowded_image and image_id == CROWDED
        for _ in range(max(num_objects, 1) if crowded else num_objects):
            w, h = rng.uniform(4, 56, 2)  # small (< 32^2 px) and medium objects
            x0, y0 = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            polygon = [x0, y0, x0 + w, y0, x0 + w, y0 + h] + ([x0, y0 + h] if rng.random() < 0.6 else [])
            category = int(rng.integers(1, num_categories + 1))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [x0, y0, w, h],
                    "area": float(polygon_mask(polygon).sum()),
                    "iscrowd": int(rng.random() < 0.1),
                    "segmentation": [polygon],
                }
            )
            if rng.random() < 0.8:  # detected, a little off
                dx, dy = rng.normal(0, 1.5, 2)
                moved = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(polygon)]
                boxes.append([x0 + dx, y0 + dy, x0 + w + dx, y0 + h + dy])
                labels.append(category if rng.random() < 0.9 else int(rng.integers(1, num_categories + 1)))
                scores.append(rng.uniform(0.2, 1.0))
                masks.append(polygon_mask(moved))
        for _ in range(150 if crowded else rng.integers(0, 3)):
            x0, y0 = rng.uniform(0, WIDTH - 10), rng.uniform(0, HEIGHT - 10)
            boxes.append([x0, y0, x0 + 8, y0 + 8])
            # The crowded image's false positives take the class of its last object: a pair to rank and cut.
            label = annotations[-1]["category_id"] if crowded else int(rng.integers(1, detected_categories + 1))
            labels.append(label)
            scores.append(rng.uniform(0.0, 0.6))
            masks.append(polygon_mask(rectangle(x0, y0, 8, 8)))
        if image_id == NO_DETECTIONS:
            boxes, scores, labels, masks = [], [], [], []
        if tied_scores:
            scores = [round(s * 16) / 16 for s in scores]
        probabilities = [m * rng.uniform(0.55, 1.0) + (1 - m) * rng.uniform(0, 0.45) for m in masks]
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.tensor(np.array(probabilities), dtype=torch.float32).reshape(-1, 1, HEIGHT, WIDTH),
        }
    coco_gt = COCO()
    coco_gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": f"c{i}"} for i in range(1, detected_categories + 1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, predictions


def direct_cocoeval(coco_gt, predictions, iou_type):
    """pycocotools alone, on all detections at once; the results list is built here independently."""
    results = []
    for image_id, p in predictions.items():
        xywh = torch.cat([p["boxes"][:, :2], p["boxes"][:, 2:] - p["boxes"][:, :2]], 1)
        for k in range(len(p["scores"])):
            result = {"image_id": image_id, "category_id": int(p["labels"][k]), "score": float(p["scores"][k])}
            if iou_type == "bbox":
                result["bbox"] = [float(v) for v in xywh[k]]
            else:
                rle = mask_util.encode(np.asfortranarray((p["masks"][k, 0] > 0.5).numpy().astype(np.uint8)))
                result["segmentation"] = rle
            results.append(result)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes refuses an empty list
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": coco_gt.dataset["images"],
                "categories": coco_gt.dataset["categories"],
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def finish(evaluator):
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def assert_same_results(got, expected, label):
    """The 12 stats to 1e-12 (in practice equal or one rounding apart), recall and scores bit for bit, and
    precision bit for bit except for the 1 - 2.2e-16 entries explained at ONE_BELOW_ONE."""
    assert len(got.stats) == 12
    np.testing.assert_allclose(got.stats, expected.stats, rtol=0, atol=1e-12, err_msg=label)
    assert got.eval["counts"] == expected.eval["counts"], label
    for key in ("recall", "scores"):
        assert np.array_equal(got.eval[key], expected.eval[key]), (label, key)
    precision, reference = got.eval["precision"], expected.eval["precision"]
    differs = precision != reference
    assert np.all(precision[differs] == 1.0) and np.all(reference[differs] == ONE_BELOW_ONE), label


def assert_identical(evaluator, coco_gt, predictions, check_range=True):
    for iou_type in ("bbox", "segm"):
        expected = direct_cocoeval(coco_gt, predictions, iou_type)
        if check_range:  # AP, AP small and AP medium: the case should be neither trivial nor hopeless.
            assert all(0.05 < ap < 0.95 for ap in expected.stats[[0, 3, 4]]), expected.stats
        assert_same_results(evaluator.coco_eval[iou_type], expected, iou_type)


def test_batched_updates_match_pycocotools():
    coco_gt, predictions = make_ground_truth_and_predictions()
    as_loaded = copy.deepcopy(coco_gt.dataset)
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    ids = sorted(predictions)
    for batch in (ids[:3], ids[3:8], ids[8:]):  # image 5, without detections, sits in the middle batch
        evaluator.update({i: predictions[i] for i in batch})
    finish(evaluator)
    # The evaluation marks ground truth as it goes ('ignore', 'rle'): it must do that on its own copy.
    assert coco_gt.dataset == as_loaded, "the dataset's COCO must be left as is"
    assert_identical(evaluator, coco_gt, predictions)


def test_hard_cases_match_pycocotools():
    # Crowd regions, 150 detections of one category in image 3 (maxDets 1, 10 and 100 all cut), an image
    # without ground truth, one without detections, tied scores, and 5 categories of which one has
    # detections but no ground truth.
    coco_gt, predictions = make_ground_truth_and_predictions(
        num_images=16, seed=3, num_categories=4, crowded_image=True, tied_scores=True, unseen_category=True
    )
    assert sum(ann["iscrowd"] for ann in coco_gt.anns.values()) >= 2
    assert predictions[CROWDED]["labels"].bincount().max() > 100
    assert not coco_gt.imgToAnns[NO_GROUND_TRUTH] and len(predictions[NO_GROUND_TRUTH]["scores"]) > 0
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    ids = sorted(predictions)
    for i in range(0, len(ids), 4):
        evaluator.update({j: predictions[j] for j in ids[i : i + 4]})
    finish(evaluator)
    assert_identical(evaluator, coco_gt, predictions, check_range=False)
    precision = evaluator.coco_eval["bbox"].eval["precision"]
    assert (precision[:, :, :, 0, -1] > -1).any() and (precision[:, :, :, 0, -1] == -1).any()


def test_repeated_images_count_once():
    # A DistributedSampler pads the last batch with images seen before.
    coco_gt, predictions = make_ground_truth_and_predictions(seed=1)
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    ids = sorted(predictions)
    evaluator.update({i: predictions[i] for i in ids[:7]})
    evaluator.update({i: predictions[i] for i in ids[5:] + ids[:2]})
    assert_identical(finish(evaluator), coco_gt, predictions)


def test_two_processes_match_pycocotools(monkeypatch):
    coco_gt, predictions = make_ground_truth_and_predictions(seed=2)
    ids = sorted(predictions)
    first, second = CocoEvaluator(coco_gt, ["bbox", "segm"]), CocoEvaluator(coco_gt, ["bbox", "segm"])
    first.update({i: predictions[i] for i in ids[1::2]})  # interleaved, as a DistributedSampler splits
    second.update({i: predictions[i] for i in ids[0::2]})
    second.update({ids[1]: predictions[ids[1]]})  # the sampler's padding: an image the first process has
    # Record what the second process contributes to each all_gather, then replay it to the first.
    sent = []
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: sent.append(data) or [data])
    finish(second)
    replay = iter(sent)
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: [data, next(replay)])
    assert_identical(finish(first), coco_gt, predictions)
    assert first.coco_eval["bbox"].params.imgIds == ids and sorted(first.img_ids) == ids[1::2]


def library_box_ious(evaluator):
    """faster-coco-eval's own IoU matrices for the evaluator's bbox detections, one call per pair."""
    ours = evaluator.coco_eval["bbox"]
    library = COCOeval_faster(ours.cocoGt, ours.cocoDt, "bbox")
    library.params.imgIds = ours.params.imgIds
    library.evaluate()
    return {pair: np.asarray(iou) for pair, iou in library.ious.items() if len(iou)}


@pytest.mark.parametrize("seed", [0, 3])
def test_batched_box_ious_equal_the_library_bit_for_bit(seed):
    coco_gt, predictions = make_ground_truth_and_predictions(
        num_images=16, seed=seed, num_categories=4, crowded_image=True, tied_scores=True, unseen_category=True
    )
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(predictions)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.synchronize_between_processes()
    ours = evaluator.coco_eval["bbox"]
    p = ours.params
    batched = box_ious_by_pair(
        ground_truth_arrays(ours.cocoGt.dataset["annotations"]),
        ours.detection_arrays,
        np.unique(p.imgIds),
        np.unique(p.catIds),
        100,
    )
    library = library_box_ious(evaluator)
    assert sorted(batched) == sorted(library) and any(
        crowd for crowd in ground_truth_arrays(ours.cocoGt.dataset["annotations"])["iscrowd"]
    )
    for pair, iou in library.items():
        assert batched[pair].shape == iou.shape and np.array_equal(batched[pair], iou), pair
    assert max(iou.shape[0] for iou in library.values()) == 100  # image 3's 150 detections of a class, cut

    # Detections only where there is no ground truth of their category: no pair to compute.
    no_pairs = dict(ours.detection_arrays, category_id=np.full_like(ours.detection_arrays["category_id"], 5))
    assert (
        box_ious_by_pair(
            ground_truth_arrays(ours.cocoGt.dataset["annotations"]),
            no_pairs,
            np.unique(p.imgIds),
            np.unique(p.catIds),
            100,
        )
        == {}
    )


def test_no_detections_at_all():
    coco_gt, predictions = make_ground_truth_and_predictions(seed=4)
    empty = {
        i: {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, HEIGHT, WIDTH),
        }
        for i in predictions
    }
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    evaluator.update(empty)
    assert_identical(finish(evaluator), coco_gt, empty, check_range=False)
    assert evaluator.coco_eval["bbox"].stats[0] == 0.0


def test_bfloat16_predictions():
    # Outputs of a bfloat16 forward: numpy has no such dtype, the evaluator must still read them exactly.
    coco_gt, predictions = make_ground_truth_and_predictions(seed=6)
    for p in predictions.values():
        p["boxes"], p["scores"] = p["boxes"].bfloat16(), p["scores"].bfloat16()
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(predictions)
    assert_same_results(finish(evaluator).coco_eval["bbox"], direct_cocoeval(coco_gt, predictions, "bbox"), "bf16")


def test_saved_evaluation_reads_like_pycocotools(tmp_path):
    # main.py saves .coco_eval["bbox"].eval; util.plot_utils reads it back allowing pycocotools' Params only.
    coco_gt, predictions = make_ground_truth_and_predictions(seed=5)
    evaluator = CocoEvaluator(coco_gt, ["bbox"])
    evaluator.update(predictions)
    saved = finish(evaluator).coco_eval["bbox"].eval
    expected = direct_cocoeval(coco_gt, predictions, "bbox").eval
    assert sorted(saved) == sorted(expected)
    assert isinstance(saved["params"], Params)
    for name, value in vars(expected["params"]).items():
        assert np.array_equal(getattr(saved["params"], name), value), name
    torch.save(saved, tmp_path / "latest.pth")
    loaded = load_coco_eval(tmp_path / "latest.pth")
    assert np.array_equal(loaded["recall"], expected["recall"])
    assert loaded["params"].imgIds == sorted(predictions)


def test_unknown_image_ids_are_refused():
    coco_gt, predictions = make_ground_truth_and_predictions(num_images=3)
    with pytest.raises(ValueError, match=r"image ids \[99\] are not in the ground truth"):
        CocoEvaluator(coco_gt, ["bbox"]).update({99: predictions[1]})


def test_prepare_for_coco_formats():
    prediction = {
        "boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([3]),
        "masks": torch.zeros(1, 4, 5),
    }
    prediction["masks"][0, 1:3, 2:4] = 0.9
    (bbox,) = coco_eval_module.prepare_for_coco({7: prediction}, "bbox")
    assert bbox == {"image_id": 7, "category_id": 3, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}
    (segm,) = coco_eval_module.prepare_for_coco({7: prediction}, "segm")
    assert isinstance(segm["segmentation"]["counts"], str)
    assert mask_util.area(dict(segm["segmentation"], counts=segm["segmentation"]["counts"].encode())) == 4
    with pytest.raises(ValueError, match="iou_type"):
        CocoEvaluator(COCO(), ["keypoints"])
    with pytest.raises(ValueError, match="ground-truth COCO object; got None"):
        CocoEvaluator(None, ["bbox"])


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_per_category_ap_is_cocoeval_precision_averaged_per_category(iou_type):
    # Three categories with ground truth and a fourth with false positives only.
    coco_gt, predictions = make_ground_truth_and_predictions(
        num_images=12, seed=1, num_categories=3, unseen_category=True
    )
    evaluator = CocoEvaluator(coco_gt, [iou_type])
    evaluator.update(predictions)
    finish(evaluator)
    per_category = per_category_ap(evaluator.coco_eval[iou_type].eval)
    assert sorted(per_category) == [1, 2, 3, 4]
    assert per_category[4] == {"AP": None, "AP50": None, "AP75": None}

    reference = direct_cocoeval(coco_gt, predictions, iou_type)
    precision = reference.eval["precision"]  # [10 IoU thresholds, 101 recalls, K categories, 4 areas, 3 maxDets]
    for k, category in enumerate(reference.params.catIds[:3]):
        # By hand: the mean of the valid precisions (> -1) of area 'all' at 100 detections, over all IoU
        # thresholds (AP), at IoU 0.5 (index 0) and at IoU 0.75 (index 5).
        expected = {}
        for name, thresholds in (("AP", slice(None)), ("AP50", 0), ("AP75", 5)):
            values = np.asarray(precision[thresholds, :, k, 0, 2])
            expected[name] = float(values[values > -1].mean())
        assert per_category[category] == pytest.approx(expected, rel=1e-9, abs=1e-12), category
        assert 0.05 < expected["AP"] < 0.95 and expected["AP50"] > expected["AP"], expected  # not a trivial case
        # The same numbers as pycocotools' own summary of a COCOeval restricted to this category.
        with contextlib.redirect_stdout(io.StringIO()):
            alone = COCOeval(coco_gt, reference.cocoDt, iou_type)
            alone.params.catIds = [category]
            alone.evaluate()
            alone.accumulate()
            alone.summarize()
        assert [per_category[category][n] for n in ("AP", "AP50", "AP75")] == pytest.approx(
            alone.stats[:3].tolist(), rel=1e-9, abs=1e-12
        )
    # The mean over the categories with ground truth is the overall AP: each has as many valid entries.
    assert np.mean([per_category[c]["AP"] for c in (1, 2, 3)]) == pytest.approx(reference.stats[0], rel=1e-9)
