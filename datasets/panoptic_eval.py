"""Panoptic quality (PQ, SQ, RQ; Kirillov et al. 2019) of predictions, computed by panopticapi's pq_compute."""
import json
import os

import util.misc as utils


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

    def update(self, predictions) -> None:
        """predictions: dicts with png_string, segments_info, image_id and file_name (the PNG's name)."""
        for p in predictions:
            with open(os.path.join(self.output_dir, p["file_name"]), "wb") as f:
                f.write(p["png_string"])
            self.predictions.append({k: v for k, v in p.items() if k != "png_string"})

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
            raise ImportError("panoptic evaluation needs panopticapi: pip install panopticapi-lite "
                              "(or git+https://github.com/cocodataset/panopticapi.git)") from e
        predictions_json = os.path.join(self.output_dir, "predictions.json")
        with open(predictions_json, "w") as f:
            json.dump({"annotations": self.predictions}, f)
        return pq_compute(self.gt_json, predictions_json, gt_folder=self.gt_folder, pred_folder=self.output_dir)
