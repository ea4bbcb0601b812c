"""TensorBoard event files of a run, under OUTPUT_DIR/tensorboard/: the training values of every printed step, and
each evaluation's losses, COCO stats and PQ. Everything shares one axis, the training step, so that a resumed run
can drop at once whatever a stopped run wrote beyond its checkpoint (SummaryWriter's purge_step)."""

from pathlib import Path
from typing import Dict, Mapping

# The 12 numbers of COCOeval.stats, in order.
COCO_STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "AP_small",
    "AP_medium",
    "AP_large",
    "AR1",
    "AR10",
    "AR100",
    "AR_small",
    "AR_medium",
    "AR_large",
)


def open_writer(log_dir: Path, purge_step: int):
    """A SummaryWriter appending to `log_dir` from `purge_step` on: TensorBoard's readers discard the events that
    an earlier, stopped run wrote at this step or later (the part of an epoch its checkpoint does not cover)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(
            "TensorBoard logging (on by default) needs the tensorboard package: pip install "
            "tensorboard (it is in requirements.txt), or pass --no_tensorboard"
        ) from e
    return SummaryWriter(str(log_dir), purge_step=purge_step)


def evaluation_scalars(test_stats: Mapping) -> Dict[str, float]:
    """{tag: value} of an evaluation's stats (engine.evaluate): test/<loss>, test/bbox/AP ... (the 12 COCO stats,
    test/segm/... with masks) and test/PQ_all/pq ... for panoptic results."""
    scalars = {}
    for key, value in test_stats.items():
        if key in ("coco_eval_bbox", "coco_eval_masks"):
            kind = "bbox" if key == "coco_eval_bbox" else "segm"
            scalars.update({f"test/{kind}/{name}": float(v) for name, v in zip(COCO_STAT_NAMES, value)})
        elif isinstance(value, Mapping):  # PQ_all, PQ_th, PQ_st
            scalars.update({f"test/{key}/{name}": float(v) for name, v in value.items() if name in ("pq", "sq", "rq")})
        elif isinstance(value, (int, float)):
            scalars[f"test/{key}"] = float(value)
    return scalars


def write_scalars(writer, scalars: Mapping[str, float], step: int) -> None:
    """Every (tag, value) of `scalars` at `step`."""
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)


def write_training_scalars(writer, first_step: int, i: int, values: Mapping[str, float]) -> None:
    """The training losses and lr of the epoch's step `i` (engine.train_one_epoch's log_step), at the run's step
    first_step + i."""
    write_scalars(writer, {f"train/{k}": v for k, v in values.items()}, first_step + i)
