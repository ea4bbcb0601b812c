"""datasets/coco_eval.py: batch-wise, multi-process evaluation gives exactly pycocotools' own numbers."""
import contextlib
import io

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import datasets.coco_eval as coco_eval_module
from datasets.coco_eval import CocoEvaluator

HEIGHT, WIDTH = 80, 96


def polygon_mask(polygon):
    return mask_util.decode(mask_util.frPyObjects([polygon], HEIGHT, WIDTH))[..., 0]


def make_ground_truth_and_predictions(num_images=12, seed=0):
    """A random COCO ground truth (rectangles and triangles of 3 categories, a few crowd) and predictions
    near it: jittered copies with random scores, missed objects, false positives, and an image with none."""
    rng = np.random.default_rng(seed)
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "height": HEIGHT, "width": WIDTH})
        boxes, scores, labels, masks = [], [], [], []
        for _ in range(rng.integers(0, 5)):
            w, h = rng.uniform(4, 56, 2)  # small (< 32^2 px) and medium objects
            x0, y0 = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            polygon = [x0, y0, x0 + w, y0, x0 + w, y0 + h] + ([x0, y0 + h] if rng.random() < 0.6 else [])
            category = int(rng.integers(1, 4))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x0, y0, w, h], "area": float(polygon_mask(polygon).sum()),
                                "iscrowd": int(rng.random() < 0.1), "segmentation": [polygon]})
            if rng.random() < 0.8:  # detected, a little off
                dx, dy = rng.normal(0, 1.5, 2)
                moved = [v + (dx if i % 2 == 0 else dy) for i, v in enumerate(polygon)]
                boxes.append([x0 + dx, y0 + dy, x0 + w + dx, y0 + h + dy])
                labels.append(category if rng.random() < 0.9 else int(rng.integers(1, 4)))
                scores.append(rng.uniform(0.2, 1.0))
                masks.append(polygon_mask(moved))
        for _ in range(rng.integers(0, 3)):  # false positives
            x0, y0 = rng.uniform(0, WIDTH - 10), rng.uniform(0, HEIGHT - 10)
            boxes.append([x0, y0, x0 + 8, y0 + 8])
            labels.append(int(rng.integers(1, 4)))
            scores.append(rng.uniform(0.0, 0.6))
            masks.append(polygon_mask([x0, y0, x0 + 8, y0, x0 + 8, y0 + 8, x0, y0 + 8]))
        if image_id == 5:
            boxes, scores, labels, masks = [], [], [], []
        probabilities = [m * rng.uniform(0.55, 1.0) + (1 - m) * rng.uniform(0, 0.45) for m in masks]
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.tensor(np.array(probabilities), dtype=torch.float32).reshape(-1, 1, HEIGHT, WIDTH),
        }
    coco_gt = COCO()
    coco_gt.dataset = {"images": images, "annotations": annotations,
                       "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}
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
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), iou_type)
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


def assert_identical(evaluator, coco_gt, predictions):
    for iou_type in ("bbox", "segm"):
        expected = direct_cocoeval(coco_gt, predictions, iou_type)
        got = evaluator.coco_eval[iou_type]
        # AP, AP small and AP medium: the test case should be neither trivial nor hopeless.
        assert all(0.05 < ap < 0.95 for ap in expected.stats[[0, 3, 4]]), expected.stats
        assert np.array_equal(got.stats, expected.stats), (iou_type, got.stats, expected.stats)
        for key in ("precision", "recall", "scores"):
            assert np.array_equal(got.eval[key], expected.eval[key]), (iou_type, key)


def test_batched_updates_match_pycocotools_exactly():
    coco_gt, predictions = make_ground_truth_and_predictions()
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    ids = sorted(predictions)
    for batch in (ids[:3], ids[3:8], ids[8:]):  # image 5, without detections, sits in the middle batch
        evaluator.update({i: predictions[i] for i in batch})
    finish(evaluator)
    # pycocotools marks ground truth as it evaluates: the evaluator must do that on its own copy.
    assert all("ignore" not in ann for ann in coco_gt.anns.values()), "the dataset's COCO must be left as is"
    assert_identical(evaluator, coco_gt, predictions)


def test_repeated_images_count_once():
    # A DistributedSampler pads the last batch with images seen before.
    coco_gt, predictions = make_ground_truth_and_predictions(seed=1)
    evaluator = CocoEvaluator(coco_gt, ["bbox", "segm"])
    ids = sorted(predictions)
    evaluator.update({i: predictions[i] for i in ids[:7]})
    evaluator.update({i: predictions[i] for i in ids[5:] + ids[:2]})
    assert_identical(finish(evaluator), coco_gt, predictions)


def test_two_processes_match_pycocotools_exactly(monkeypatch):
    coco_gt, predictions = make_ground_truth_and_predictions(seed=2)
    ids = sorted(predictions)
    first, second = CocoEvaluator(coco_gt, ["bbox", "segm"]), CocoEvaluator(coco_gt, ["bbox", "segm"])
    first.update({i: predictions[i] for i in ids[1::2]})  # interleaved, as a DistributedSampler splits
    second.update({i: predictions[i] for i in ids[0::2]})
    # Record what the second process contributes to each all_gather, then replay it to the first.
    sent = []
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: sent.append(data) or [data])
    finish(second)
    replay = iter(sent)
    monkeypatch.setattr(coco_eval_module, "all_gather", lambda data: [data, next(replay)])
    assert_identical(finish(first), coco_gt, predictions)


def test_prepare_for_coco_formats():
    prediction = {"boxes": torch.tensor([[1.0, 2.0, 4.0, 8.0]]), "scores": torch.tensor([0.5]),
                  "labels": torch.tensor([3]), "masks": torch.zeros(1, 4, 5)}
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
