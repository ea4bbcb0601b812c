"""Panoptic quality (PQ, SQ, RQ; Kirillov et al. 2019) of predictions, computed by panopticapi's pq_compute."""

import io
import json
import os

import numpy as np
from PIL import Image

import util.misc as utils
from util.panoptic import id2rgb, rgb2id


class PanopticEvaluator:
    """Collects PostProcessPanoptic outputs (plus `image_id` and `file_name`), writes them in the COCO
    panoptic format under `output_dir`, and scores them against the ground truth with pq_compute."""

    def __init__(self, ann_file, ann_folder, output_dir: str = "panoptic_eval"):
        self.gt_json = ann_file
        self.gt_folder = ann_folder
        # Every process writes its own PNGs here, so every process makes sure the folder exists.
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.predictions = []
        with open(ann_file) as f:
            categories = json.load(f)["categories"]
        self.category_ids = {c["id"] for c in categories}
        self.category_names = {int(c["id"]): c.get("name", str(c["id"])) for c in categories}

    def update(self, predictions) -> None:
        """predictions: dicts with png_string, segments_info, image_id and file_name (the PNG's name)."""
        for p in predictions:
            png, segments = self.without_unknown_categories(p["png_string"], p["segments_info"])
            with open(os.path.join(self.output_dir, p["file_name"]), "wb") as f:
                f.write(png)
            self.predictions.append({**{k: v for k, v in p.items() if k != "png_string"}, "segments_info": segments})

    def without_unknown_categories(self, png: bytes, segments):
        """A model can predict a class that is no category of the dataset (an unused id, early in training);
        pq_compute would stop on it. Such segments are left out and their pixels made void, so they count
        neither as matches nor as false positives. Void is id 0, which PostProcessPanoptic gives its first
        segment: the others move up by one (only in this case, so other outputs are written as they come)."""
        unknown = [s["id"] for s in segments if s["category_id"] not in self.category_ids]
        if not unknown:
            return png, segments
        ids = rgb2id(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        moved = np.where(np.isin(ids, unknown), 0, ids + 1)
        out = io.BytesIO()
        Image.fromarray(id2rgb(moved)).save(out, format="PNG")
        return out.getvalue(), [{**s, "id": s["id"] + 1} for s in segments if s["id"] not in unknown]

    def synchronize_between_processes(self) -> None:
        merged = []
        for preds in utils.all_gather(self.predictions):
            merged += preds
        self.predictions = merged

    def summarize(self):
        """pq_compute's results ({'All', 'Things', 'Stuff'}: pq, sq, rq, n; 'per_class') on the main
        process, None elsewhere."""
        if not utils.is_main_process():
            return None
        try:
            from panopticapi.evaluation import pq_compute
        except ImportError as e:
            raise ImportError(
                "panoptic evaluation needs panopticapi: pip install panopticapi-lite "
                "(or git+https://github.com/cocodataset/panopticapi.git)"
            ) from e
        predictions_json = os.path.join(self.output_dir, "predictions.json")
        with open(predictions_json, "w") as f:
            json.dump({"annotations": self.predictions}, f)
        return pq_compute(self.gt_json, predictions_json, gt_folder=self.gt_folder, pred_folder=self.output_dir)
