"""COCO evaluation (bbox and segm AP) that can be fed batch by batch and merged across processes.

Each `update` runs pycocotools' per-image evaluation on the images of that batch and keeps only its
per-image results; `synchronize_between_processes` gathers them from every process, and `accumulate`
and `summarize` are pycocotools' own. The final `.stats` are exactly those of a single COCOeval run on
all detections at once.
"""
import contextlib
import copy
import io
from typing import Any, Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from util.misc import all_gather


class CocoEvaluator:
    """Evaluate predictions against `coco_gt` (a pycocotools COCO) for each of `iou_types`
    ('bbox', 'segm'); `.coco_eval[iou_type]` is the pycocotools COCOeval holding `.stats` and `.eval`."""

    def __init__(self, coco_gt: COCO, iou_types: Sequence[str]):
        if coco_gt is None:
            raise ValueError("CocoEvaluator needs the ground-truth COCO object; got None (get_coco_api_from_dataset "
                             "returns None for datasets without COCO instance annotations, e.g. panoptic ones: "
                             "use the instances dataset of the same images)")
        for iou_type in iou_types:
            if iou_type not in ("bbox", "segm"):
                raise ValueError(f"CocoEvaluator: unsupported iou_type {iou_type!r}; expected 'bbox' or 'segm'")
        # pycocotools writes into the ground truth annotations while evaluating ('ignore' flags, RLEs):
        # work on a copy so the dataset's COCO object stays as loaded.
        self.coco_gt = copy.deepcopy(coco_gt)
        self.iou_types = list(iou_types)
        self.coco_eval = {iou_type: COCOeval(self.coco_gt, iouType=iou_type) for iou_type in self.iou_types}
        self.img_ids: List[int] = []
        self.eval_imgs: Dict[str, List[np.ndarray]] = {iou_type: [] for iou_type in self.iou_types}

    def update(self, predictions: Dict[int, Dict[str, torch.Tensor]]) -> None:
        """Evaluate one batch: {image_id: {'boxes' (xyxy, absolute), 'scores', 'labels', optional 'masks'
        ([N, 1, H, W] or [N, H, W] probabilities at the original image size)}}."""
        img_ids = sorted({int(image_id) for image_id in predictions})
        self.img_ids.extend(img_ids)
        for iou_type in self.iou_types:
            results = prepare_for_coco(predictions, iou_type)
            coco_eval = self.coco_eval[iou_type]
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints on every call
                coco_eval.cocoDt = self.coco_gt.loadRes(results) if results else empty_results_like(self.coco_gt)
                coco_eval.params.imgIds = img_ids
                coco_eval.evaluate()
            # evalImgs is ordered [category][area range][image]; keep it as such an array so batches
            # concatenate along the image axis.
            shape = (len(coco_eval.params.catIds), len(coco_eval.params.areaRng), len(img_ids))
            self.eval_imgs[iou_type].append(np.asarray(coco_eval.evalImgs, dtype=object).reshape(shape))

    def synchronize_between_processes(self) -> None:
        """Gather the per-image results of every process (on one process: of every batch), keep one entry
        per image id, sorted by id as COCOeval.evaluate would, and hand them to each COCOeval."""
        for iou_type in self.iou_types:
            coco_eval = self.coco_eval[iou_type]
            num_cats, num_areas = len(coco_eval.params.catIds), len(coco_eval.params.areaRng)
            local = self.eval_imgs[iou_type]
            local = np.concatenate(local, axis=2) if local else np.empty((num_cats, num_areas, 0), dtype=object)
            all_img_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids in all_gather(self.img_ids)])
            all_eval_imgs = np.concatenate(all_gather(local), axis=2)
            # A DistributedSampler pads the last batch with repeated images: count each image once.
            img_ids, first = np.unique(all_img_ids, return_index=True)
            coco_eval.evalImgs = list(all_eval_imgs[..., first].flatten())
            coco_eval.params.imgIds = [int(i) for i in img_ids]
            coco_eval._paramsEval = copy.deepcopy(coco_eval.params)

    def accumulate(self) -> None:
        """pycocotools' accumulate for every iou type."""
        for coco_eval in self.coco_eval.values():
            coco_eval.accumulate()

    def summarize(self) -> None:
        """Print pycocotools' summary (the 12 AP/AR numbers) for every iou type and fill `.stats`."""
        for iou_type, coco_eval in self.coco_eval.items():
            print(f"IoU metric: {iou_type}")
            coco_eval.summarize()


def empty_results_like(coco_gt: COCO) -> COCO:
    """A detections COCO object with the images and categories of `coco_gt` and no detections
    (pycocotools' loadRes refuses an empty list)."""
    coco_dt = COCO()
    coco_dt.dataset = {"images": coco_gt.dataset.get("images", []), "categories": coco_gt.dataset.get("categories", []),
                       "annotations": []}
    coco_dt.createIndex()
    return coco_dt


def prepare_for_coco(predictions: Dict[int, Dict[str, torch.Tensor]], iou_type: str) -> List[Dict[str, Any]]:
    """Predictions to a COCO results list: 'bbox' results carry [x, y, w, h] boxes, 'segm' results carry
    RLE-encoded masks (thresholded at 0.5)."""
    results = []
    for image_id, prediction in predictions.items():
        if len(prediction["scores"]) == 0:
            continue
        scores = prediction["scores"].tolist()
        labels = prediction["labels"].tolist()
        if iou_type == "bbox":
            x0, y0, x1, y1 = prediction["boxes"].unbind(-1)
            boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], dim=-1).tolist()
            results.extend({"image_id": int(image_id), "category_id": label, "bbox": box, "score": score}
                           for box, label, score in zip(boxes, labels, scores))
        elif iou_type == "segm":
            masks = prediction["masks"]
            if masks.dim() == 4:  # PostProcessSegm gives [N, 1, H, W]
                masks = masks[:, 0]
            binary = (masks > 0.5).cpu().numpy().astype(np.uint8)
            # pycocotools wants Fortran order; encode takes [H, W, N] and returns one RLE per mask.
            rles = mask_util.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
            for rle, label, score in zip(rles, labels, scores):
                rle["counts"] = rle["counts"].decode("utf-8")  # str, so results can be saved as JSON
                results.append({"image_id": int(image_id), "category_id": label, "segmentation": rle,
                                "score": score})
        else:
            raise ValueError(f"unsupported iou_type {iou_type!r}; expected 'bbox' or 'segm'")
    return results
