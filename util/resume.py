"""Where a run starts from: the checkpoint in its output folder (--auto_resume), the weights of --frozen_weights,
--finetune and --resume, and the training state of --resume (optimizer, schedule, epoch, random generators)."""

from pathlib import Path
from typing import Optional, Tuple

import util.misc as utils
from util.checkpoint import (
    architecture_differences,
    auto_resume_checkpoint,
    drop_log_lines_from,
    load_state_dict_checked,
    load_state_dict_for_finetuning,
    model_state_from,
    read_checkpoint,
    remove_stale_temporary_files,
    restore_rng_states,
)
from util.time_budget import TimeBudget


def prepare_output_dir(args) -> Tuple[Optional[Path], str]:
    """(output_dir, created and cleared of what a killed run left half-written; the checkpoint to resume from:
    --resume, or with --auto_resume output_dir/checkpoint.pth where it exists)."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is None:
        return None, args.resume
    if utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(output_dir)
    if args.resume or not args.auto_resume:
        return output_dir, args.resume
    resume = auto_resume_checkpoint(output_dir)
    if not resume and utils.is_main_process():
        # A run killed after logging its first epoch but before saving it starts again from scratch.
        drop_log_lines_from(output_dir / "log.txt", args.start_epoch)
    return output_dir, resume


def load_starting_weights(model, args, resume: str, train_only=None) -> Optional[dict]:
    """Load --frozen_weights (the box model under the mask head), --finetune and `resume` (--resume, or the
    checkpoint --auto_resume found) into `model`, and into `train_only` (models.train_only: the training-only
    weights beside DETR's, or None) what the checkpoint holds of it; returns the checkpoint resumed (None without
    one)."""
    if args.frozen_weights is not None:
        frozen = read_checkpoint("--frozen_weights", args.frozen_weights)
        load_state_dict_checked(
            model.detr, model_state_from(frozen, args.frozen_weights), f"--frozen_weights {args.frozen_weights}"
        )
    if args.finetune:
        start = read_checkpoint("--finetune", args.finetune)
        load_state_dict_for_finetuning(model, model_state_from(start, args.finetune), f"--finetune {args.finetune}")
    if not resume:
        return None
    resumed = read_checkpoint("--resume", resume)
    differences = architecture_differences(resumed.get("args") if isinstance(resumed, dict) else None, args)
    if differences:
        # The flags say what to change; the weights that do not fit, if any, are listed after them.
        details = "\n".join(differences)
        try:
            load_state_dict_checked(model, model_state_from(resumed, resume), "its weights")
        except ValueError as e:
            details += "\n" + str(e)
        raise ValueError(
            f"--resume {resume} was trained with another model configuration:\n{details}\n"
            "Pass the checkpoint's values of these flags, or use another --output_dir "
            "(--auto_resume and requeued jobs resume from output_dir/checkpoint.pth)."
        )
    load_state_dict_checked(model, model_state_from(resumed, resume), f"--resume {resume}")
    if not args.eval and "train_model" in resumed:
        # Saved with --ema_decay: 'model' is the average, and training continues from the raw weights.
        load_state_dict_checked(model, resumed["train_model"], f"--resume {resume}")
    if not args.eval and train_only is not None and "model_train_only" in resumed:
        # The training-only weights (models/train_only.py), saved beside DETR's: the run continues exactly.
        load_state_dict_checked(train_only.train_only, resumed["model_train_only"], f"--resume {resume}")
    return resumed


def resume_training_state(
    resumed: Optional[dict], optimizer, lr_scheduler, args, output_dir, scaler, budget: TimeBudget
) -> int:
    """Continue a --resume checkpoint's optimizer, schedule, random generators and float16 loss scale (not with
    --eval), and with --time_budget the schedule it fitted and the time it spent; returns the epoch to start at."""
    if resumed is None or args.eval or not all(k in resumed for k in ("optimizer", "lr_scheduler", "epoch")):
        return args.start_epoch
    optimizer.load_state_dict(resumed["optimizer"])
    lr_scheduler.load_state_dict(resumed["lr_scheduler"])
    budget.resume(lr_scheduler, float(resumed.get("time_spent_s", 0.0)))
    if scaler is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])
    start_epoch = resumed["epoch"] + 1
    if "rng" in resumed:
        restore_rng_states(resumed["rng"])
    if output_dir is not None and utils.is_main_process():
        drop_log_lines_from(output_dir / "log.txt", start_epoch)
    return start_epoch
