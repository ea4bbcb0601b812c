"""What a run writes to output_dir after each epoch: its line of log.txt, the evaluation and per-class files, the
pictures, checkpoint.pth and checkpoint_best.pth (the best epoch at --best_metric). Also the run-management flags."""

import argparse
import json
import os
from pathlib import Path
from typing import Callable, Optional

import util.misc as utils
from util.checkpoint import improves, isolated_rng, logged_stat, rng_state, save_checkpoint
from util.console import CONSOLE_STYLES


def add_run_management_args(parser: argparse.ArgumentParser) -> None:
    """Where a run starts from beside --resume, what it writes and how it evaluates."""
    group = parser.add_argument_group("Run management")
    group.add_argument(
        "--auto_resume",
        action="store_true",
        help="without --resume, resume from output_dir/checkpoint.pth if it exists (requeued jobs)",
    )
    group.add_argument(
        "--finetune",
        default="",
        help="start from this checkpoint's weights (path, URL or Hugging Face folder), not its "
        "optimizer or epoch; weights of other shapes (another --num_classes) are re-initialized, and named",
    )
    group.add_argument(
        "--no_plots",
        dest="plots",
        action="store_false",
        help="do not write predictions.png, curves.png and per_class.png to output_dir after each epoch",
    )
    group.add_argument(
        "--no_tensorboard",
        dest="tensorboard",
        action="store_false",
        help="do not write TensorBoard event files to output_dir/tensorboard/ (written by default: "
        "the training losses and lr at every printed step, each epoch's test losses, COCO "
        "stats and PQ)",
    )
    group.add_argument(
        "--console",
        default="short",
        choices=CONSOLE_STYLES,
        help="short: a banner, one short line per printed step and a summary at the end; original: the original's "
        "namespace and every meter (log.txt and TensorBoard get every meter either way)",
    )
    group.add_argument(
        "--best_metric",
        default="auto",
        help="log.txt stat whose best epoch checkpoint_best.pth keeps (KEY, KEY[I], KEY.FIELD); "
        "auto: box AP, or PQ for panoptic models",
    )
    group.add_argument(
        "--eval_batching",
        default="padded",
        choices=("padded", "size"),
        help="padded: the original's padded batches (AP depends on the batch size); size: only "
        "images of one size per batch, the AP of batch size 1 at any --batch_size",
    )


def chosen_best_metric(best_metric: str, postprocessors: dict) -> str:
    """--best_metric, where 'auto' means box AP, or PQ for a panoptic model."""
    if best_metric != "auto":
        return best_metric
    return "test_PQ_all.pq" if "panoptic" in postprocessors else "test_coco_eval_bbox[0]"


def best_so_far(resumed: Optional[dict], best_metric: str, output_dir: Optional[Path]) -> Optional[dict]:
    """The best epoch of the run a --resume checkpoint continues ({'metric', 'value', 'epoch'}, as the checkpoint
    records it), or None (a new run, or another --best_metric). checkpoint_best.pth is written after
    checkpoint.pth: a run stopped between the two, its last epoch the best, gets it written now."""
    best = resumed.get("best") if resumed is not None else None
    if not best or best.get("metric") != best_metric:
        return None
    if output_dir is not None and best["epoch"] == resumed.get("epoch") and utils.is_main_process():
        save_checkpoint(resumed, output_dir / "checkpoint_best.pth")
    return best


def write_per_class(per_class: dict, epoch: Optional[int], output_dir: Path) -> Path:
    """Write output_dir/eval/per_class.json ({'epoch', 'bbox', 'segm', 'panoptic'}: engine.per_class_results)
    through a temporary file, so that a stopped run leaves the previous one whole; returns its path."""
    path = output_dir / "eval" / "per_class.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    tmp.write_text(json.dumps({"epoch": epoch, **per_class}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def training_state(model, optimizer, lr_scheduler, time_spent_s: float, scaler, ema, raw_model, train_only) -> dict:
    """What a checkpoint holds to continue the run: `model`'s weights (the moving average with --ema_decay, whose
    `raw_model` weights are then saved too), the optimizer, the schedule, the time spent, the float16 loss scale
    (`scaler`, or None) and the training-only weights (`train_only`: models.train_only, or None)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "time_spent_s": time_spent_s,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if ema is not None:
        state.update(train_model=raw_model.state_dict(), ema_updates=ema.updates)
    if train_only is not None:  # beside 'model', which holds exactly DETR's keys
        state["model_train_only"] = train_only.train_only_state_dict()
    return state


def end_of_epoch(
    epoch: int,
    stats: dict,
    coco_evaluator,
    output_dir: Path,
    training_state: dict,
    recorded_args: argparse.Namespace,
    best_metric: str,
    best: Optional[dict] = None,
    keep_copy: bool = False,
    pictures: Optional[Callable[[], None]] = None,
) -> Optional[dict]:
    """Write the epoch's line of log.txt (from `stats`: {'train': ..., 'test': ..., 'n_parameters': ...}), its
    evaluation, per-class file and `pictures` (None: none), then the checkpoint (`training_state`, with
    `recorded_args` as its 'args') as checkpoint.pth, also as checkpoint{epoch:04}.pth with `keep_copy`, and as
    checkpoint_best.pth when the epoch beats `best` at `best_metric`; returns the best epoch's record. The
    checkpoint comes last: it marks the epoch as done. A run stopped before it (a preempted job) redoes the epoch
    when resumed, and drop_log_lines_from removes the line written before the stop, so that log.txt holds each
    epoch once."""
    improved = False
    if utils.is_main_process():
        log_stats = {
            **{f"train_{k}": v for k, v in stats["train"].items()},
            **{f"test_{k}": v for k, v in stats["test"].items()},
            "epoch": epoch,
            "n_parameters": stats["n_parameters"],
        }
        with (output_dir / "log.txt").open("a") as f:
            f.write(json.dumps(log_stats) + "\n")
        try:
            value = logged_stat(log_stats, best_metric)
        except ValueError as e:
            raise SystemExit(f"--best_metric {best_metric}: {e}") from None
        if improves(value, best, best_metric):
            best, improved = {"metric": best_metric, "value": value, "epoch": epoch}, True
        if coco_evaluator is not None and "bbox" in coco_evaluator.coco_eval:
            (output_dir / "eval").mkdir(exist_ok=True)
            names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])
            for name in names:
                utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / name)
        if getattr(coco_evaluator, "per_class", None):
            write_per_class(coco_evaluator.per_class, epoch, output_dir)
        if pictures is not None:
            with isolated_rng():  # the original draws no pictures: they must not shift its sequence
                pictures()
    # Where every generator stands now is where the next epoch starts: a run resumed from this checkpoint
    # continues exactly like this one. Every process draws its own augmentations.
    checkpoint = {
        **training_state,
        "epoch": epoch,
        "args": recorded_args,
        "rng": utils.all_gather(rng_state()),
        "best": best,
    }
    paths = [output_dir / "checkpoint.pth"]
    if keep_copy:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    # After checkpoint.pth, which records the best epoch: a run stopped in between writes it when resumed.
    if improved:
        paths.append(output_dir / "checkpoint_best.pth")
    for path in paths:
        save_checkpoint(checkpoint, path)
    if improved:
        print(f"Epoch {epoch}: {best['metric']} {best['value']:.4f}, the best so far: saved {paths[-1]}")
    return best
