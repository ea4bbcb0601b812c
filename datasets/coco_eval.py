"""COCO evaluation (bbox and segm AP) that can be fed batch by batch and merged across processes.

`update` only converts each batch's predictions to compact arrays (boxes, scores, labels, mask RLEs);
`synchronize_between_processes` gathers the detections of every process, and `accumulate` runs one
evaluation over all of them in faster-coco-eval's C++ COCOeval: pycocotools' 12 stats, over 10x faster
than pycocotools itself (tools/benchmark.py measures it). The one known difference: where a category's
highest-scored detection is a true positive followed by a false positive, pycocotools' precision
tp / (tp + fp + eps) is 1 - 2.2e-16 and the C++ one is 1.0, so a stat can differ in its 16th digit.

`.coco_eval[iou_type]` is the COCOeval with `.stats` (the 12 numbers), `.params` and `.eval`; `.eval` has
pycocotools' keys and a pycocotools `Params`, so files saved from it read as before.
"""

import contextlib
import copy
import gc
from typing import Any, Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.cocoeval import Params

from util.misc import all_gather


class CocoEvaluator:
    """Evaluate predictions against `coco_gt` (a pycocotools COCO, or any object with a COCO `.dataset`
    dict) for each of `iou_types` ('bbox', 'segm'); `.coco_eval[iou_type]` holds `.stats` and `.eval`."""

    def __init__(self, coco_gt, iou_types: Sequence[str]):
        if coco_gt is None:
            raise ValueError(
                "CocoEvaluator needs the ground-truth COCO object; got None (get_coco_api_from_dataset "
                "returns None for datasets without COCO instance annotations, e.g. panoptic ones: "
                "use the instances dataset of the same images)"
            )
        for iou_type in iou_types:
            if iou_type not in ("bbox", "segm"):
                raise ValueError(f"CocoEvaluator: unsupported iou_type {iou_type!r}; expected 'bbox' or 'segm'")
        self.coco_gt = ground_truth_copy(coco_gt)
        self.iou_types = list(iou_types)
        self.coco_eval = {
            iou_type: BatchedIoUCOCOeval(self.coco_gt, iouType=iou_type, print_function=print)
            for iou_type in self.iou_types
        }
        self.img_ids: List[int] = []
        self.known_img_ids = set(self.coco_gt.imgs)
        self.detections: List[Dict[str, Any]] = []  # one entry per update: arrays over its detections

    def update(self, predictions: Dict[int, Dict[str, torch.Tensor]]) -> None:
        """Record one batch: {image_id: {'boxes' (xyxy, absolute), 'scores', 'labels', optional 'masks'
        ([N, 1, H, W] or [N, H, W] probabilities at the original image size)}}."""
        img_ids = sorted({int(image_id) for image_id in predictions})
        unknown = [i for i in img_ids if i not in self.known_img_ids]
        if unknown:
            raise ValueError(
                f"CocoEvaluator.update: image ids {unknown[:10]} are not in the ground truth; "
                "predictions must be keyed by the dataset's image ids"
            )
        first_entry = len(self.img_ids)
        self.img_ids.extend(img_ids)
        by_id = {int(image_id): prediction for image_id, prediction in predictions.items()}
        ordered = [by_id[i] for i in img_ids]
        counts = [len(p["scores"]) for p in ordered]
        batch = empty_detections(self.iou_types)
        # Which entry of self.img_ids each detection belongs to: after the gather, the detections of an image
        # seen twice (DistributedSampler padding) are kept from its first entry only.
        batch["entry"] = np.repeat(np.arange(first_entry, first_entry + len(img_ids)), counts)
        # One copy to the CPU per batch, not per image. Scores and boxes become float64 holding exactly their
        # float32 (or bfloat16) values: what the Python floats of a COCO results list hold.
        if ordered:
            batch["scores"] = torch.cat([p["scores"].detach().reshape(-1) for p in ordered]).cpu().double().numpy()
            batch["labels"] = torch.cat([p["labels"].detach().reshape(-1) for p in ordered]).cpu().long().numpy()
            if "bbox" in self.iou_types:
                boxes = [xyxy_to_xywh(p["boxes"].detach().reshape(-1, 4)) for p in ordered]
                batch["boxes"] = torch.cat(boxes).cpu().double().numpy()
        if "segm" in self.iou_types:
            batch["rles"] = [rle for p in ordered for rle in encode_masks(p["masks"])]
        self.detections.append(batch)

    def synchronize_between_processes(self) -> None:
        """Gather the detections of every process (on one process: of every batch), keep each image id
        once, and hand them to each COCOeval with the evaluated image ids, sorted as COCOeval sorts them."""
        local = concatenate_detections([empty_detections(self.iou_types)] + self.detections)
        gathered = all_gather({"img_ids": self.img_ids, "detections": local})
        all_img_ids = np.concatenate([np.asarray(g["img_ids"], dtype=np.int64) for g in gathered])
        # A DistributedSampler pads the last batch with repeated images: count each image once.
        img_ids, first = np.unique(all_img_ids, return_index=True)
        is_first = np.zeros(len(all_img_ids), dtype=bool)
        is_first[first] = True
        offset, kept = 0, []
        for g in gathered:
            detections = g["detections"]
            entry = detections["entry"] + offset  # this process's entries, as indices into all_img_ids
            keep = is_first[entry]
            kept.append(
                {
                    key: ([v for v, k in zip(value, keep) if k] if isinstance(value, list) else value[keep])
                    for key, value in detections.items()
                    if key != "entry"
                }
            )
            kept[-1]["image_id"] = all_img_ids[entry[keep]]
            offset += len(g["img_ids"])
        merged = concatenate_detections(kept)
        for iou_type in self.iou_types:
            coco_eval = self.coco_eval[iou_type]
            with gc_paused():
                coco_eval.cocoDt = detections_to_coco(self.coco_gt, merged, iou_type)
            if iou_type == "bbox":
                coco_eval.detection_arrays = {
                    "image_id": merged["image_id"],
                    "category_id": merged["labels"],
                    "boxes": merged["boxes"],
                    "scores": merged["scores"],
                }
            coco_eval.params.imgIds = [int(i) for i in img_ids]

    def accumulate(self) -> None:
        """Evaluate every image and accumulate precision and recall (one C++ pass per iou type)."""
        for coco_eval in self.coco_eval.values():
            with gc_paused():
                coco_eval.evaluate()
                coco_eval.accumulate()
            # evaluate() leaves numpy integers in imgIds; keep them plain ints as pycocotools does.
            coco_eval.params.imgIds = [int(i) for i in coco_eval.params.imgIds]
            coco_eval.eval = as_pycocotools_eval(coco_eval.eval, coco_eval.params)

    def summarize(self) -> None:
        """Print the summary (the 12 AP/AR numbers, as pycocotools prints them) for every iou type and fill
        `.stats`."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            coco_eval.summarize()


class BatchedIoUCOCOeval(COCOeval_faster):
    """faster-coco-eval's COCOeval, with the box IoUs of all (image, category) pairs computed in one numpy
    pass before evaluating rather than in one call per pair (on COCO-sized sets those calls cost a tenth of
    the evaluation). It needs `detection_arrays` (image_id, category_id, boxes xywh, scores: one row per
    annotation of cocoDt, in order); without them, and for masks, the library computes the IoUs."""

    detection_arrays = None

    def evaluate(self) -> None:
        """COCOeval_faster.evaluate, its box IoUs computed up front."""
        p = self.params
        self._box_ious = None
        if p.iouType == "bbox" and p.useCats and self.detection_arrays is not None:
            self._box_ious = box_ious_by_pair(
                ground_truth_arrays(self.cocoGt.dataset["annotations"]),
                self.detection_arrays,
                np.unique(p.imgIds),
                np.unique(p.catIds),
                max(p.maxDets),
            )
        try:
            super().evaluate()
        finally:
            self._box_ious = None

    def computeIoU(self, imgId: int, catId: int):
        """The IoU matrix of one pair [detections by descending score, ground truths], as the library's."""
        if self._box_ious is None:
            return super().computeIoU(imgId, catId)
        return self._box_ious.get((int(imgId), int(catId)), [])


def ground_truth_arrays(annotations: List[Dict[str, Any]]) -> Dict[str, np.ndarray]:
    """COCO annotations as the arrays box_ious_by_pair takes: image_id, category_id, boxes (xywh), iscrowd."""
    return {
        "image_id": np.array([a["image_id"] for a in annotations], dtype=np.int64),
        "category_id": np.array([a["category_id"] for a in annotations], dtype=np.int64),
        "boxes": np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4),
        "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in annotations], dtype=bool),
    }


def box_ious_by_pair(
    gt: Dict[str, np.ndarray], dt: Dict[str, np.ndarray], image_ids: np.ndarray, category_ids: np.ndarray, max_dets: int
) -> Dict[Any, np.ndarray]:
    """{(image id, category id): IoU [detections, ground truths]} for every pair that has both: detections
    sorted by descending score (ties in their given order) and cut at `max_dets`, ground truths in their
    given order, IoU as pycocotools' bbIou computes it (over the detection's own area for crowd regions).

    gt: 'image_id', 'category_id', 'boxes' (xywh), 'iscrowd'; dt: the same with 'scores' for 'iscrowd'.
    image_ids and category_ids: sorted arrays of those evaluated."""

    def pair_keys(image, category):
        position = np.searchsorted(category_ids, category).clip(max=len(category_ids) - 1)
        evaluated = np.isin(image, image_ids) & (category_ids[position] == category)
        return image * len(category_ids) + position, evaluated

    if not len(gt["image_id"]) or not len(dt["image_id"]) or not len(category_ids):
        return {}
    gt_key, gt_evaluated = pair_keys(gt["image_id"], gt["category_id"])
    dt_key, dt_evaluated = pair_keys(dt["image_id"], dt["category_id"])
    gt_boxes, gt_crowd, dt_boxes, dt_scores = gt["boxes"], gt["iscrowd"], dt["boxes"], dt["scores"]

    # Ground truths grouped by pair, in annotation order within each.
    gt_rows = np.flatnonzero(gt_evaluated)
    gt_rows = gt_rows[np.argsort(gt_key[gt_rows], kind="stable")]
    gt_pairs, gt_start, gt_count = np.unique(gt_key[gt_rows], return_index=True, return_counts=True)
    # Detections grouped by pair, by descending score (stable, as computeIoU's mergesort), at most max_dets.
    dt_rows = np.flatnonzero(dt_evaluated)
    dt_rows = dt_rows[np.lexsort((dt_rows, -dt_scores[dt_rows], dt_key[dt_rows]))]
    first = np.r_[True, dt_key[dt_rows][1:] != dt_key[dt_rows][:-1]]
    starts = np.flatnonzero(first)
    rank = np.arange(len(dt_rows)) - np.repeat(starts, np.diff(np.r_[starts, len(dt_rows)]))
    dt_rows = dt_rows[rank < max_dets]
    # Only pairs with ground truth: every kept detection against each ground truth of its pair.
    group = np.searchsorted(gt_pairs, dt_key[dt_rows]).clip(max=max(len(gt_pairs) - 1, 0))
    has_gt = (gt_pairs[group] == dt_key[dt_rows]) if len(gt_pairs) else np.zeros(len(dt_rows), dtype=bool)
    dt_rows, group = dt_rows[has_gt], group[has_gt]
    if not len(dt_rows):
        return {}
    per_detection = gt_count[group]
    offsets = np.repeat(np.cumsum(per_detection) - per_detection, per_detection)
    d = np.repeat(dt_rows, per_detection)
    g = gt_rows[np.repeat(gt_start[group], per_detection) + np.arange(per_detection.sum()) - offsets]

    # pycocotools' bbIou, operation for operation, so the values are the same to the last bit.
    dx, dy, dw, dh = dt_boxes[d].T
    gx, gy, gw, gh = gt_boxes[g].T
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    intersection = w * h
    det_area = dw * dh
    union = np.where(gt_crowd[g], det_area, det_area + gw * gh - intersection)
    iou = np.zeros(len(d))
    np.divide(intersection, union, out=iou, where=overlap)

    # One [detections, ground truths] block per pair: consecutive in `iou`, as the detections of a pair are.
    pair_of_detection = dt_key[dt_rows]
    pair_start = np.flatnonzero(np.r_[True, pair_of_detection[1:] != pair_of_detection[:-1]])
    num_dets = np.diff(np.r_[pair_start, len(dt_rows)])
    num_gts = per_detection[pair_start]
    flat_start = np.r_[0, np.cumsum(num_dets * num_gts)]
    num_categories = len(category_ids)
    return {
        (int(key // num_categories), int(category_ids[key % num_categories])): iou[
            flat_start[k] : flat_start[k + 1]
        ].reshape(nd, ng)
        for k, (key, nd, ng) in enumerate(
            zip(pair_of_detection[pair_start].tolist(), num_dets.tolist(), num_gts.tolist())
        )
    }


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector. Building and indexing a dict per detection (10^5 and more)
    triggers a collection every few hundred allocations, each walking every live object: that took longer
    than the evaluation itself. None of these dicts form cycles, so reference counting frees them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def ground_truth_copy(coco_gt) -> FastCOCO:
    """A faster-coco-eval COCO over a copy of `coco_gt`'s images, annotations and categories.

    The evaluation writes into annotation and image dicts ('ignore', 'rle', ids made int): copying each dict
    (not their polygons, which it only reads) keeps the dataset's COCO object as loaded at a fraction of
    a deep copy's cost."""
    dataset = coco_gt.dataset
    copied = {key: [dict(item) for item in dataset.get(key, [])] for key in ("images", "annotations", "categories")}
    coco = FastCOCO()
    coco.dataset = copied
    coco.createIndex()
    return coco


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """[x0, y0, x1, y1] to COCO's [x, y, w, h], in the boxes' own dtype (so results match the float32
    arithmetic of the COCO results lists written before)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1)


def encode_masks(masks: torch.Tensor) -> List[Dict[str, Any]]:
    """Mask probabilities [N, 1, H, W] or [N, H, W] to one COCO RLE per mask, thresholded at 0.5."""
    if masks.dim() == 4:  # PostProcessSegm gives [N, 1, H, W]
        masks = masks[:, 0]
    if len(masks) == 0:
        return []
    binary = (masks > 0.5).cpu().numpy().astype(np.uint8)
    # pycocotools wants Fortran order; encode takes [H, W, N] and returns one RLE per mask.
    return mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))


def empty_detections(iou_types: Sequence[str]) -> Dict[str, Any]:
    """No detections, in the layout `update` records: 'entry', 'scores', 'labels', and 'boxes' ([N, 4] xywh)
    for bbox, 'rles' for segm."""
    detections = {"entry": np.zeros(0, dtype=np.int64), "scores": np.zeros(0), "labels": np.zeros(0, dtype=np.int64)}
    if "bbox" in iou_types:
        detections["boxes"] = np.zeros((0, 4))
    if "segm" in iou_types:
        detections["rles"] = []
    return detections


def concatenate_detections(parts: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Detections of several `update` calls (or processes) as one, in order."""
    return {
        key: (
            [item for part in parts for item in part[key]]
            if isinstance(parts[0][key], list)
            else np.concatenate([part[key] for part in parts])
        )
        for key in parts[0]
    }


def detections_to_coco(coco_gt: FastCOCO, detections: Dict[str, Any], iou_type: str) -> FastCOCO:
    """The detections as a COCO results object, with the fields pycocotools' loadRes derives (ids from 1 in
    the given order, area, iscrowd 0; for masks the box around each mask), built from whole arrays
    rather than one dict at a time through loadRes."""
    if iou_type == "bbox":
        boxes = detections["boxes"]
        area = boxes[:, 2] * boxes[:, 3]
    else:
        rles = detections["rles"]
        area = mask_util.area(rles) if rles else np.zeros(0)
        boxes = mask_util.toBbox(rles) if rles else np.zeros((0, 4))
    columns = zip(
        range(1, len(boxes) + 1),
        detections["image_id"].tolist(),
        detections["labels"].tolist(),
        detections["scores"].tolist(),
        boxes.tolist(),
        area.tolist(),
    )
    annotations = [
        {"id": k, "image_id": image_id, "category_id": label, "score": score, "bbox": box, "area": a, "iscrowd": 0}
        for k, image_id, label, score, box, a in columns
    ]
    if iou_type == "segm":
        for annotation, rle in zip(annotations, detections["rles"]):
            annotation["segmentation"] = rle
    coco_dt = FastCOCO()
    coco_dt.dataset = {
        "images": coco_gt.dataset["images"],
        "categories": coco_gt.dataset["categories"],
        "annotations": annotations,
    }
    coco_dt.createIndex()
    return coco_dt


def as_pycocotools_eval(eval_result: Dict[str, Any], params) -> Dict[str, Any]:
    """faster-coco-eval's accumulated results with pycocotools' keys and Params: what main.py saves, and
    what util.plot_utils.load_coco_eval reads back safely (it allows pycocotools' Params only)."""
    pycoco_params = Params(iouType=params.iouType)
    for name in ("imgIds", "catIds", "iouThrs", "recThrs", "maxDets", "areaRng", "areaRngLbl", "useCats"):
        setattr(pycoco_params, name, copy.deepcopy(getattr(params, name)))
    return {
        "params": pycoco_params,
        "counts": list(eval_result["counts"]),
        "date": eval_result["date"],
        "precision": eval_result["precision"],
        "recall": eval_result["recall"],
        "scores": eval_result["scores"],
    }


def per_category_ap(eval_result: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
    """{category id: {'AP', 'AP50', 'AP75'}} from an accumulated COCOeval's `.eval`: the first three of the 12
    stats, each restricted to one category and averaged as COCOeval.summarize averages them (over the precision
    entries above -1, area 'all', the largest maxDets). None for a category with no ground truth."""
    precision = eval_result["precision"]  # [IoU thresholds, recall thresholds, categories, areas, maxDets]
    params = eval_result["params"]
    iou_thrs = np.asarray(params.iouThrs)
    selections = {
        "AP": slice(None),
        "AP50": np.flatnonzero(np.isclose(iou_thrs, 0.5)),
        "AP75": np.flatnonzero(np.isclose(iou_thrs, 0.75)),
    }
    area_all = list(params.areaRngLbl).index("all")
    results = {}
    for k, category_id in enumerate(params.catIds):
        row = {}
        for name, thresholds in selections.items():
            values = precision[thresholds, :, k, area_all, -1]
            valid = values[values > -1]
            row[name] = float(np.mean(valid)) if valid.size else None
        results[int(category_id)] = row
    return results


def prepare_for_coco(predictions: Dict[int, Dict[str, torch.Tensor]], iou_type: str) -> List[Dict[str, Any]]:
    """Predictions to a COCO results list (as saved to JSON or given to loadRes): 'bbox' results carry
    [x, y, w, h] boxes, 'segm' results carry RLE-encoded masks (thresholded at 0.5)."""
    results = []
    for image_id, prediction in predictions.items():
        if len(prediction["scores"]) == 0:
            continue
        scores = prediction["scores"].tolist()
        labels = prediction["labels"].tolist()
        if iou_type == "bbox":
            boxes = xyxy_to_xywh(prediction["boxes"]).tolist()
            results.extend(
                {"image_id": int(image_id), "category_id": label, "bbox": box, "score": score}
                for box, label, score in zip(boxes, labels, scores)
            )
        elif iou_type == "segm":
            for rle, label, score in zip(encode_masks(prediction["masks"]), labels, scores):
                rle["counts"] = rle["counts"].decode("utf-8")  # str, so results can be saved as JSON
                results.append({"image_id": int(image_id), "category_id": label, "segmentation": rle, "score": score})
        else:
            raise ValueError(f"unsupported iou_type {iou_type!r}; expected 'bbox' or 'segm'")
    return results
