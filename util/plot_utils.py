"""Plots of training runs: curves from main.py's log.txt files, and precision/recall curves from the COCO
evaluations it saves (eval/latest.pth, eval/000.pth, ...).

    from pathlib import Path
    from util.plot_utils import plot_logs, plot_precision_recall
    fig, axs = plot_logs([Path("outputs/run_a"), Path("outputs/run_b")])
    fig, axs = plot_precision_recall(sorted(Path("outputs/run_a/eval").glob("*.pth")))

Both return the matplotlib figure and its axes and leave the figure open (a notebook shows it); give
`save_path=` to also write a PNG. `python tools/plot_logs.py OUTPUT_DIR ...` draws both into files.
"""

import codecs
from pathlib import Path, PurePath
from typing import Dict, List, Optional, Sequence, Tuple, Union

import matplotlib.pyplot as plt
import numpy as np
import torch

from util.checkpoint import safe_globals
from util.visualize import read_log

PathLike = Union[str, PurePath]


def ewm_mean(values: Sequence[float], com: float) -> np.ndarray:
    """Exponentially weighted moving average with centre of mass `com` (0: no smoothing), the same as pandas'
    `Series(values).ewm(com=com).mean()`: y_t = sum_i (1 - a)^(t - i) x_i / sum_i (1 - a)^(t - i), a = 1 / (1 + com)."""
    if com < 0:
        raise ValueError(f"ewm_col (the centre of mass of the smoothing) must be >= 0, got {com}")
    decay = 1.0 - 1.0 / (1.0 + com)
    smoothed = np.empty(len(values))
    numerator = denominator = 0.0
    for t, value in enumerate(values):
        numerator = value + decay * numerator
        denominator = 1.0 + decay * denominator
        smoothed[t] = numerator / denominator
    return smoothed


def _as_paths(paths, what: str) -> List[Path]:
    """A path, or an iterable of them (a list, Path.glob(...)), as a non-empty list of Paths."""
    if isinstance(paths, (str, PurePath)):
        paths = [paths]
    try:
        paths = [Path(p) for p in paths]
    except TypeError:
        paths = []
    if not paths:
        raise ValueError(f"{what} must be a path or a non-empty list of paths")
    return paths


def _run_names(paths: Sequence[Path], name_of) -> List[str]:
    """Short names for the legend, or the full paths when the short ones clash."""
    names = [name_of(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def read_run_log(path: Path) -> List[Dict]:
    """The rows of a main.py log file (util.visualize.read_log), with errors that say what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give output directories of main.py (each with its log file)")
    try:
        rows = read_log(path)
    except ValueError as e:
        raise ValueError(f"{path} is not a main.py log (one JSON dict per line): {e}") from e
    if not rows:
        raise ValueError(f"{path} is empty: the run has not finished an epoch yet")
    return rows


def _series(rows: List[Dict], key: str, index: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(epochs, values) of the rows holding `key` (its element `index` when the value is a list)."""
    picked = [
        (row.get("epoch", i), row[key] if index is None else row[key][index])
        for i, row in enumerate(rows)
        if key in row
    ]
    epochs, values = zip(*picked) if picked else ((), ())
    return np.asarray(epochs, dtype=float), np.asarray(values, dtype=float)


def plot_logs(
    logs,
    fields: Sequence[str] = ("class_error", "loss_bbox_unscaled", "mAP"),
    ewm_col: float = 0,
    log_name: str = "log.txt",
    save_path: Optional[PathLike] = None,
):
    """One panel per field, one colour per run: train_<field> solid and test_<field> dashed, over epochs,
    smoothed by an exponentially weighted mean of centre of mass `ewm_col`. The field 'mAP' draws the COCO box
    AP of test_coco_eval_bbox: AP at IoU .50:.95 solid, AP50 dashed.

    logs: an output directory of main.py, or a list of them, each holding `log_name`. Returns (fig, axs)."""
    dirs = _as_paths(logs, "logs")
    runs = [read_run_log(d / log_name) for d in dirs]
    names = _run_names(dirs, lambda d: d.name or str(d))
    fig, axs = plt.subplots(1, len(fields), figsize=(5 * len(fields), 4), squeeze=False)
    axs = axs[0]
    colors = plt.get_cmap("tab10")
    for ax, field in zip(axs, fields):
        drawn = 0
        for k, (rows, name) in enumerate(zip(runs, names)):
            if field == "mAP":
                curves = [("test_coco_eval_bbox", 0, "-", "AP"), ("test_coco_eval_bbox", 1, "--", "AP50")]
            else:
                curves = [(f"train_{field}", None, "-", "train"), (f"test_{field}", None, "--", "test")]
            for key, index, style, label in curves:
                epochs, values = _series(rows, key, index)
                if len(values):
                    # Markers while there are few epochs: a run of one epoch is a single point.
                    ax.plot(
                        epochs,
                        ewm_mean(values, ewm_col),
                        style,
                        color=colors(k % 10),
                        label=f"{name} {label}",
                        marker="o" if len(values) <= 50 else None,
                        markersize=3,
                    )
                    drawn += 1
        if not drawn:
            known = sorted({key for rows in runs for row in rows for key in row})
            plt.close(fig)
            raise ValueError(
                f"field {field!r} is in none of the logs ({', '.join(str(d / log_name) for d in dirs)}); "
                f"they have: {', '.join(known)}"
            )
        ax.set_title(field if field != "mAP" else "box AP (test)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path, dpi=100)
    return fig, axs


def load_coco_eval(path: PathLike) -> Dict:
    """A COCOeval `.eval` dict saved by main.py with torch.save, loaded safely (weights_only): only numpy arrays
    and pycocotools' Params may be rebuilt from the file, no other code."""
    from numpy.core import multiarray  # under numpy 2 an alias of numpy._core.multiarray
    from pycocotools.cocoeval import Params

    allowed = [Params, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    # Files written under numpy 2 name these functions by their new module.
    allowed += [
        (multiarray._reconstruct, "numpy._core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy._core.multiarray.scalar"),
    ]
    allowed += [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    # The byte strings inside the arrays are pickled through codecs.encode; torch allows it by itself from 2.6 on.
    allowed.append(codecs.encode)
    with safe_globals(allowed):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:
            raise ValueError(f"cannot read {path} as a saved COCO evaluation: {type(e).__name__}: {e}") from e
    if not isinstance(data, dict) or "precision" not in data:
        raise ValueError(
            f"{path} is not a COCOeval .eval dict (it has no 'precision'); main.py writes them to "
            "OUTPUT_DIR/eval/*.pth and OUTPUT_DIR/eval.pth"
        )
    return data


def _mean_over_valid(values: np.ndarray, axes: Tuple[int, ...]) -> np.ndarray:
    """Mean over `axes` of the entries that are not -1 (COCOeval's mark for a class without ground truth)."""
    valid = values > -1
    counts = valid.sum(axis=axes)
    sums = np.where(valid, values, 0.0).sum(axis=axes)
    return np.divide(sums, counts, out=np.full(sums.shape, np.nan), where=counts > 0)


def precision_recall_curves(data: Dict) -> Optional[Dict]:
    """From a COCOeval `.eval` dict, for all object sizes and 100 detections per image, averaged over the
    classes that have ground truth: 'recall_points' [R]; 'precision' (mean over IoU .50:.95) and 'precision50'
    (IoU .50) and 'score' against recall [R]; 'ap', 'ap50' (COCOeval's stats[0] and [1]) and 'recall' (the mean
    recall reached). None when no class has ground truth."""
    # precision, scores: [IoU thresholds T, recall points R, classes K, areas A, max detections M]
    precision = np.asarray(data["precision"])[:, :, :, 0, -1]
    scores = np.asarray(data["scores"])[:, :, :, 0, -1]
    per_iou = _mean_over_valid(precision, (2,))  # [T, R]
    if np.isnan(per_iou).all():
        return None
    params = data.get("params")
    recall_points = np.asarray(getattr(params, "recThrs", np.linspace(0, 1, precision.shape[1])))
    curve = np.nanmean(per_iou, axis=0)
    return {
        "recall_points": recall_points,
        "precision": curve,
        "precision50": per_iou[0],
        "score": np.nanmean(_mean_over_valid(scores, (2,)), axis=0),
        "ap": float(np.nanmean(curve)),
        "ap50": float(np.nanmean(per_iou[0])),
        "recall": float(_mean_over_valid(np.asarray(data["recall"])[:, :, 0, -1], (0, 1))),
    }


def plot_precision_recall(files, naming_scheme: str = "iter", save_path: Optional[PathLike] = None):
    """Precision (left) and detection score (right) against recall, from saved COCO evaluations (see
    precision_recall_curves): solid at IoU .50:.95 (averaged), dashed at IoU .50. Prints AP, AP50 and the
    recall reached for each file.

    files: a path or list of paths of eval .pth files. naming_scheme: 'iter' names a curve by its file
    ('latest', '000', ...), 'exp_id' by its run (OUTPUT_DIR of OUTPUT_DIR/eval/x.pth). Returns (fig, axs)."""
    if naming_scheme not in ("iter", "exp_id"):
        raise ValueError(f"naming_scheme must be 'iter' or 'exp_id', got {naming_scheme!r}")
    paths = _as_paths(files, "files")
    if naming_scheme == "exp_id":
        names = _run_names(paths, lambda p: p.parent.parent.name if p.parent.name == "eval" else p.parent.name)
    else:
        names = _run_names(paths, lambda p: p.stem)
    fig, axs = plt.subplots(1, 2, figsize=(10, 4))
    colors = plt.get_cmap("tab10")
    for k, (path, name) in enumerate(zip(paths, names)):
        curves = precision_recall_curves(load_coco_eval(path))
        if curves is None:
            print(f"{path}: no class has ground truth; nothing to plot")
            continue
        color, recall = colors(k % 10), curves["recall_points"]
        axs[0].plot(recall, curves["precision"], "-", color=color, label=f"{name} AP {curves['ap']:.3f}")
        axs[0].plot(recall, curves["precision50"], "--", color=color, label=f"{name} AP50 {curves['ap50']:.3f}")
        axs[1].plot(recall, curves["score"], "-", color=color, label=name)
        print(f"{name}: AP {curves['ap']:.3f}, AP50 {curves['ap50']:.3f}, recall {curves['recall']:.3f}")
    for ax, title in zip(axs, ("precision / recall", "score / recall")):
        ax.set_title(title)
        ax.set_xlabel("recall")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    axs[0].set_ylabel("precision")
    axs[1].set_ylabel("score")
    fig.tight_layout()
    if save_path is not None:
        fig.savefig(save_path, dpi=100)
    return fig, axs
