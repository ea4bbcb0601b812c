"""--time_budget: fit a run into minutes by cutting its epochs to what the time per epoch allows, the
learning-rate drop (or the decay) keeping its place in the shorter run. Also the flags of the schedule."""

import argparse
import time
from typing import Optional

import util.misc as utils


def add_schedule_args(parser: argparse.ArgumentParser) -> None:
    """The learning-rate schedule and time budget flags (beside the original's --epochs and --lr_drop)."""
    group = parser.add_argument_group("Schedule and time budget (util/time_budget.py)")
    group.add_argument(
        "--lr_schedule",
        default="step",
        choices=("step", "linear", "cosine"),
        help="step: x0.1 after --lr_drop epochs (the original's); linear or cosine: decay every epoch towards 0 at "
        "the end of --epochs (docs/flags.md)",
    )
    group.add_argument(
        "--time_budget",
        default=0.0,
        type=float,
        help="minutes from the start to fit the run into (0: no limit): the epochs are cut to what "
        "the time per epoch allows, --lr_drop keeping its place (docs/flags.md)",
    )


class TimeBudget:
    """Where the run ends (`epochs`) and where its learning rate drops (`lr_drop`): the flags' values, which
    --time_budget moves after every epoch to what fits in the minutes left at the time per epoch measured so far
    (never below the epochs done, never above the epochs planned). Measured again after every epoch, so a first
    epoch slowed by warming up costs nothing. The time spent before the first epoch (generating the synthetic
    data, building the model, loading a checkpoint) counts against the budget too."""

    def __init__(self, minutes: float, epochs: int, lr_drop: int, run_start: Optional[float] = None):
        self.minutes = minutes
        self.planned = (epochs, lr_drop)
        self.epochs, self.lr_drop = epochs, lr_drop
        self.run_start = time.time() if run_start is None else run_start
        self.setup_s = 0.0  # before the first epoch, the slowest process's
        self.spent_before = 0.0  # by the epochs before a --resume
        self.train_start = self.run_start

    def resume(self, lr_scheduler, spent_s: float) -> None:
        """A --resume checkpoint's schedule, where the budget moved it, and the time its epochs spent."""
        if self.minutes <= 0:
            return
        if isinstance(lr_scheduler, utils.EpochDecay):
            self.epochs = lr_scheduler.total_epochs
        else:
            self.lr_drop = lr_scheduler.step_size
        self.spent_before = spent_s

    def start_training(self, lr_scheduler, start_epoch: int, now: float) -> None:
        """Training starts at `now`: a resumed run fits what is left of the budget before its first epoch."""
        self.train_start = now
        if self.minutes <= 0:
            return
        # The slowest process's setup, so that all cut the run alike.
        self.setup_s = max(utils.all_gather(now - self.run_start))
        if start_epoch > 0 and self.spent_before > 0:
            self.fit(lr_scheduler, start_epoch - 1, self.spent_before)

    def seconds_left(self) -> Optional[float]:
        """Seconds until the budget runs out (0 once it has), or None without a budget."""
        if self.minutes <= 0:
            return None
        spent = self.setup_s + self.spent_before + time.time() - self.train_start
        return max(self.minutes * 60 - spent, 0.0)

    def after_epoch(self, lr_scheduler, epoch: int) -> float:
        """The seconds spent on the epochs so far (those before a --resume included), the schedule fitted to them."""
        spent = self.spent_before + time.time() - self.train_start
        if self.minutes > 0:
            # Every process takes the slowest one's time, so that all of them cut the run alike.
            self.fit(lr_scheduler, epoch, max(utils.all_gather(spent)))
        return spent

    def fit(self, lr_scheduler, epoch: int, spent_s: float) -> None:
        """After `epoch`, with `spent_s` seconds spent on epochs 0..epoch: set `epochs` to those that fit the rest of
        the budget and, while the learning-rate drop is still to come, keep it at its fraction of the planned run
        (a decaying schedule stretches over the epochs that fit instead)."""
        planned_epochs, planned_drop = self.planned
        per_epoch = spent_s / (epoch + 1)
        fit = int(max(self.minutes * 60 - self.setup_s, 0.0) // per_epoch)
        if isinstance(lr_scheduler, utils.EpochDecay):
            epochs = max(epoch + 1, min(planned_epochs, fit))
            if epochs == self.epochs:
                return
            self.epochs = epochs
            lr_scheduler.set_total_epochs(epochs)
            print(f"{self.line(per_epoch, epochs)}, the learning rate decaying over them")
            return
        drop_ahead = epoch + 1 < self.lr_drop
        # Once the drop has passed, the run may only shrink: its remaining epochs are all after the drop.
        epochs = max(epoch + 1, min(planned_epochs if drop_ahead else self.epochs, fit))
        lr_drop = self.lr_drop
        if drop_ahead and planned_drop < planned_epochs:
            lr_drop = max(epoch + 2, round(planned_drop * epochs / planned_epochs))
            if lr_drop >= epochs:  # no room for it inside the run
                lr_drop = self.lr_drop
        if (epochs, lr_drop) == (self.epochs, self.lr_drop):
            return
        message = self.line(per_epoch, epochs)
        if lr_drop != self.lr_drop:
            message += f", the learning rate dropping after {lr_drop}"
        self.epochs, self.lr_drop = epochs, lr_drop
        lr_scheduler.step_size = lr_drop
        print(message)

    def line(self, per_epoch: float, epochs: int) -> str:
        """'--time_budget 12.5 min: 45 s before training, 60 s per epoch, so 11 of 15 epochs' (the setup only when
        there was one to count)."""
        before = f"{self.setup_s:.0f} s before training, " if self.setup_s >= 0.5 else ""
        return (
            f"--time_budget {self.minutes:g} min: {before}{per_epoch:.0f} s per epoch, so {epochs} of "
            f"{self.planned[0]} epochs"
        )
