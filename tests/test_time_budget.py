"""util/time_budget.py: --time_budget cuts the epochs to what fits, the learning-rate drop keeping its place."""

import pytest
import torch

import util.misc as utils
from util.time_budget import TimeBudget


def test_the_time_budget_fits_the_epochs_and_keeps_the_lr_drop_at_its_place():
    budget = TimeBudget(11.5, epochs=15, lr_drop=12)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 12)

    def fit(epoch, spent_s):
        budget.fit(scheduler, epoch, spent_s)
        return budget.epochs, budget.lr_drop, scheduler.step_size

    assert fit(0, 30.0) == (15, 12, 12)  # 23 epochs would fit: nothing changes
    assert fit(0, 61.0) == (11, 9, 9)  # 690 s / 61 s: 11 epochs, the drop at 12/15 of them
    assert fit(3, 4 * 50.0) == (13, 10, 10)  # faster than the first epoch: back up to 13
    assert fit(5, 6 * 40.0) == (15, 12, 12)  # fast enough for the planned run again
    assert fit(12, 13 * 80.0) == (13, 12, 12)  # slower after the drop: shorter, never below the epochs done
    assert fit(12, 13 * 40.0) == (13, 12, 12)  # and, after the drop, never longer again
    budget = TimeBudget(1.0, epochs=4, lr_drop=3)
    budget.fit(scheduler, 0, 100.0)
    assert (budget.epochs, budget.lr_drop) == (1, 3)  # no room for a drop inside the run: it is left alone


def test_the_time_budget_leaves_out_what_the_run_spent_before_its_first_epoch():
    budget = TimeBudget(12.5, epochs=15, lr_drop=12, run_start=100.0)
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 12)
    # 750 s less 50 s of data generation, at 60 s an epoch: 11 epochs (12 without the setup), the drop after 9.
    budget.start_training(scheduler, 0, now=150.0)
    assert budget.setup_s == 50.0
    budget.fit(scheduler, 0, 60.0)
    assert (budget.epochs, budget.lr_drop, scheduler.step_size) == (11, 9, 9)
    assert budget.line(60.4, 11) == "--time_budget 12.5 min: 50 s before training, 60 s per epoch, so 11 of 15 epochs"
    budget.setup_s = 0.0
    budget.fit(scheduler, 1, 120.0)
    assert (budget.epochs, budget.lr_drop) == (12, 10)
    assert budget.line(60.4, 11) == "--time_budget 12.5 min: 60 s per epoch, so 11 of 15 epochs"


def test_a_resumed_run_fits_what_is_left_of_the_budget_before_it_trains():
    scheduler = torch.optim.lr_scheduler.StepLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), 9)
    budget = TimeBudget(12.5, epochs=15, lr_drop=12, run_start=0.0)
    budget.resume(scheduler, 4 * 100.0)  # the checkpoint's drop, where the budget had moved it, and its 4 epochs
    assert (budget.lr_drop, budget.spent_before) == (9, 400.0)
    budget.start_training(scheduler, 4, now=0.0)
    # 750 s at 100 s an epoch: 7 epochs, the drop at 12/15 of them.
    assert (budget.epochs, budget.lr_drop, scheduler.step_size) == (7, 6, 6)
    unlimited = TimeBudget(0.0, epochs=15, lr_drop=12)
    unlimited.resume(scheduler, 400.0)  # without a budget the flags rule, and the time spent is not carried
    assert (unlimited.epochs, unlimited.lr_drop, unlimited.spent_before) == (15, 12, 0.0)


def test_the_time_budget_stretches_a_decaying_schedule_over_the_epochs_that_fit():
    budget = TimeBudget(11.5, epochs=15, lr_drop=12)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = utils.EpochDecay(optimizer, "linear", 15)
    scheduler.step()  # after epoch 0, as main.py steps it
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 1 / 15)
    budget.fit(scheduler, 0, 61.0)
    # 690 s / 61 s: 11 epochs, and epoch 1 already runs at the rate of a decay over 11.
    assert budget.epochs == 11 and scheduler.total_epochs == 11 and budget.lr_drop == 12
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1 - 1 / 11) == scheduler.get_last_lr()[0]
    budget.fit(scheduler, 3, 4 * 40.0)
    assert budget.epochs == 15 and scheduler.total_epochs == 15  # fast again: back to the planned run
    budget.fit(scheduler, 3, 4 * 400.0)
    assert budget.epochs == 4  # never below the epochs done
