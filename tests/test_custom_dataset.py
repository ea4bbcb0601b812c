"""The README's "Train or fine-tune on your own data", step by step, on the synthetic shapes written as a
custom COCO folder: train with --dataset_file coco --coco_path --num_classes, fine-tune with another class
count, evaluate, predict, plot."""

import contextlib
import io
import json

import pytest
import torch
from pycocotools.coco import COCO

from helpers import TINY_FLAGS, run_main
from datasets import synthetic
from tools import plot_logs, predict
from tools.detector import load_detector

pytestmark = pytest.mark.slow  # three short main.py runs at COCO's image sizes (~1 minute)

# The tiny model with the 8 queries of the main.py runs, 2 images a batch.
TINY_MODEL = TINY_FLAGS + ["--num_queries", "8", "--batch_size", "2", "--num_workers", "0"]


def test_train_finetune_evaluate_predict_plot(tmp_path):
    # A custom dataset in the COCO layout: train2017/, val2017/, annotations/instances_{train,val}2017.json.
    root = synthetic.generate(tmp_path / "my_dataset", seed=3, num_train=4, num_val=2, image_size=64)
    categories = json.loads((root / "annotations" / "instances_train2017.json").read_text())["categories"]
    num_classes = max(c["id"] for c in categories) + 1  # max category id + 1
    assert num_classes == 6
    data = ["--dataset_file", "coco", "--coco_path", str(root)]

    # 1. Train from scratch.
    first = tmp_path / "first"
    stats, _ = run_main(
        data + TINY_MODEL + ["--num_classes", str(num_classes), "--epochs", "1", "--output_dir", str(first)]
    )
    assert len(stats["coco_eval_bbox"]) == 12
    for name in ("checkpoint.pth", "log.txt", "eval/latest.pth"):
        assert (first / name).exists()
    trained = torch.load(first / "checkpoint.pth", weights_only=False)["model"]
    assert trained["class_embed.weight"].shape[0] == num_classes + 1

    # 2. Fine-tune it for a dataset of more classes: the class head is re-initialized and named; the rest is
    #    loaded (the frozen stem equals the first run's although this run's seed differs).
    second = tmp_path / "second"
    _, printed = run_main(
        data
        + TINY_MODEL
        + [
            "--num_classes",
            "9",
            "--finetune",
            str(first / "checkpoint.pth"),
            "--epochs",
            "1",
            "--seed",
            "7",
            "--output_dir",
            str(second),
        ]
    )
    assert "re-initialized" in printed and "class_embed.weight" in printed
    tuned = torch.load(second / "checkpoint.pth", weights_only=False)["model"]
    assert tuned["class_embed.weight"].shape[0] == 10
    assert torch.equal(tuned["backbone.0.body.conv1.weight"], trained["backbone.0.body.conv1.weight"])

    # 3. Evaluate the fine-tuned checkpoint.
    evaluation = tmp_path / "evaluation"
    stats, _ = run_main(
        data
        + TINY_MODEL
        + ["--num_classes", "9", "--eval", "--resume", str(second / "checkpoint.pth"), "--output_dir", str(evaluation)]
    )
    assert len(stats["coco_eval_bbox"]) == 12 and (evaluation / "eval.pth").exists()

    # 4. Predict on the validation images: names from the dataset, results pycocotools reads.
    predictions = tmp_path / "predictions"
    with contextlib.redirect_stdout(io.StringIO()):
        status = predict.main(
            [
                "--resume",
                str(second / "checkpoint.pth"),
                str(root / "val2017"),
                "--output_dir",
                str(predictions),
                "--threshold",
                "0",
                "--device",
                "cpu",
            ]
        )
    assert status == 0
    assert len(list(predictions.glob("*_detections.png"))) == 2
    detector = load_detector(resume=str(second / "checkpoint.pth"))
    assert detector.names == {c["id"]: c["name"] for c in categories}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val2017.json"))
        results = gt.loadRes(str(predictions / "results.json"))
    assert set(results.getImgIds()) == set(gt.getImgIds())

    # 5. Plot both runs.
    with contextlib.redirect_stdout(io.StringIO()):
        assert plot_logs.main([str(first), str(second), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "logs.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "precision_recall.png").stat().st_size > 10_000
