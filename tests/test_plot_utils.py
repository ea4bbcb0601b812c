"""util/plot_utils.py and tools/plot_logs.py: curves that hold the logged values, AP read back from saved COCO
evaluations equal to COCOeval's own, PNGs that are real pictures, clear errors for bad input."""

import contextlib
import io
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from tool_checkpoints import run_tool
from tools import plot_logs
from util.plot_utils import ewm_mean, load_coco_eval, plot_logs as plot_logs_fn, plot_precision_recall
from util.plot_utils import precision_recall_curves


def write_run(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.txt").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def run_rows(offset=0.0, epochs=3):
    return [
        {
            "epoch": e,
            "train_class_error": 50.0 - 10 * e + offset,
            "test_class_error": 60.0 - 10 * e + offset,
            "train_loss_bbox_unscaled": 0.5 / (e + 1),
            "test_loss_bbox_unscaled": 0.6 / (e + 1),
            "test_coco_eval_bbox": [0.1 * e + offset / 100, 0.2 * e + offset / 100] + [0.0] * 10,
        }
        for e in range(epochs)
    ]


def saved_evaluation(path):
    """A real COCOeval of a few boxes, its .eval saved as main.py saves it; returns the COCOeval."""
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "width": 100, "height": 100}, {"id": 2, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 40, 20], "area": 800, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
        ],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        detections = gt.loadRes(
            [
                {"image_id": 1, "category_id": 1, "bbox": [12, 11, 30, 28], "score": 0.9},
                {"image_id": 1, "category_id": 2, "bbox": [60, 50, 40, 20], "score": 0.6},
                {"image_id": 2, "category_id": 1, "bbox": [20, 20, 50, 50], "score": 0.8},
                {"image_id": 2, "category_id": 2, "bbox": [5, 5, 20, 20], "score": 0.7},
            ]
        )
        evaluation = COCOeval(gt, detections, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(evaluation.eval, path)
    return evaluation


def is_picture(path) -> bool:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    return pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels.std() > 5


def test_ewm_mean_matches_the_pandas_definition():
    assert np.allclose(ewm_mean([1.0, 2.0, 3.0], 0), [1, 2, 3])
    # com 1: weights 1/2 per step back, normalized by their sum (pandas' adjust=True).
    assert np.allclose(ewm_mean([1.0, 2.0, 3.0], 1), [1, 2.5 / 1.5, 4.25 / 1.75])
    with pytest.raises(ValueError, match="ewm_col"):
        ewm_mean([1.0], -1)


def test_plot_logs_draws_the_logged_values(tmp_path):
    runs = [write_run(tmp_path / "run_a", run_rows()), write_run(tmp_path / "run_b", run_rows(offset=5))]
    fig, axs = plot_logs_fn(runs, save_path=tmp_path / "logs.png")
    assert len(axs) == 3
    class_error, loss_bbox, ap = ({line.get_label(): line.get_ydata() for line in ax.lines} for ax in axs)
    assert np.allclose(class_error["run_a train"], [50, 40, 30])
    assert np.allclose(class_error["run_b test"], [65, 55, 45])
    assert np.allclose(loss_bbox["run_a test"], [0.6, 0.3, 0.2])
    assert np.allclose(ap["run_a AP"], [0.0, 0.1, 0.2])  # test_coco_eval_bbox[0]
    assert np.allclose(ap["run_b AP50"], [0.05, 0.25, 0.45])  # test_coco_eval_bbox[1]
    assert is_picture(tmp_path / "logs.png")
    plt.close(fig)

    fig, axs = plot_logs_fn(runs[0], fields=("class_error",), ewm_col=1)
    assert np.allclose(axs[0].lines[0].get_ydata(), [50, (40 + 25) / 1.5, (30 + 20 + 12.5) / 1.75])
    plt.close(fig)


def test_plot_logs_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="log.txt does not exist"):
        plot_logs_fn(tmp_path / "nowhere")
    write_run(tmp_path / "run", run_rows())
    with pytest.raises(ValueError, match="'loss_giou' is in none of the logs.*train_class_error"):
        plot_logs_fn(tmp_path / "run", fields=("loss_giou",))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "log.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plot_logs_fn([tmp_path / "empty"])
    with pytest.raises(ValueError, match="non-empty list"):
        plot_logs_fn([])


def test_precision_recall_reads_saved_evaluations(tmp_path):
    evaluation = saved_evaluation(tmp_path / "run" / "eval" / "latest.pth")
    data = load_coco_eval(tmp_path / "run" / "eval" / "latest.pth")
    curves = precision_recall_curves(data)
    assert curves["ap"] == pytest.approx(evaluation.stats[0], abs=1e-12)
    assert curves["ap50"] == pytest.approx(evaluation.stats[1], abs=1e-12)
    assert curves["recall"] == pytest.approx(evaluation.stats[8], abs=1e-12)  # AR@100, all areas
    assert len(curves["precision"]) == 101 and curves["recall_points"][-1] == 1.0

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        fig, axs = plot_precision_recall(
            [tmp_path / "run" / "eval" / "latest.pth"], naming_scheme="exp_id", save_path=tmp_path / "pr.png"
        )
    assert f"run: AP {evaluation.stats[0]:.3f}" in printed.getvalue()
    assert [line.get_label() for line in axs[0].lines][0].startswith("run AP")
    assert np.allclose(axs[0].lines[0].get_ydata(), curves["precision"])
    assert is_picture(tmp_path / "pr.png")
    plt.close(fig)

    torch.save({"model": {}}, tmp_path / "not_eval.pth")
    with pytest.raises(ValueError, match="not a COCOeval"):
        load_coco_eval(tmp_path / "not_eval.pth")
    with pytest.raises(ValueError, match="naming_scheme"):
        plot_precision_recall([tmp_path / "run" / "eval" / "latest.pth"], naming_scheme="epoch")


def test_command_writes_both_plots(tmp_path):
    a = write_run(tmp_path / "a", run_rows())
    b = write_run(tmp_path / "b", run_rows(offset=3))
    saved_evaluation(a / "eval" / "latest.pth")
    saved_evaluation(b / "eval.pth")  # what an --eval run leaves
    # As a user runs it, from another folder than the repository root.
    command = run_tool("plot_logs.py", a, b, "--out", tmp_path / "plots", cwd=tmp_path)
    assert command.returncode == 0, command.stderr
    assert is_picture(tmp_path / "plots" / "logs.png")
    assert is_picture(tmp_path / "plots" / "precision_recall.png")
    assert "a: AP" in command.stdout and "b: AP" in command.stdout

    c = write_run(tmp_path / "c", run_rows())
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert plot_logs.main([str(c), "--out", str(tmp_path / "plots_c")]) == 0
    assert (tmp_path / "plots_c" / "logs.png").exists()
    assert not (tmp_path / "plots_c" / "precision_recall.png").exists()
    assert "no saved evaluation" in printed.getvalue()
    with pytest.raises(SystemExit, match="does not exist"):
        plot_logs.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "plots_x")])
