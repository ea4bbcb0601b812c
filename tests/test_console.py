"""util/console.py: the short console's lines (the loss parts, the whole run's ETA, the flags that differ from the
defaults), and main.py's run with each --console: short lines, a summary naming the results, and log.txt unchanged."""

import argparse
import re

import pytest

import main as main_py
import util.console as console_module
import util.time_budget as time_budget_module
from helpers import run_main, tiny_flags
from util.console import LINE_LIMIT, Console, ShortConsole, changed_flags, grouped_losses, loss_group, loss_text
from util.misc import MetricLogger, SmoothedValue
from util.time_budget import TimeBudget
from util.visualize import read_log

STEP_LINE = re.compile(
    r"epoch (\d+)/(\d+)  step +(\d+)/(\d+)  run eta (\d+):(\d\d):(\d\d)  "
    r"loss (\S+)(?: \((.*)\))?  lr (\S+)  (\S+) s/step"
)


def test_each_loss_term_falls_in_its_head_or_its_part():
    cases = {
        "loss_ce": "ce",
        "loss_giou_3": "giou",  # a decoder layer's, with the last layer's
        "loss_dice": "dice",
        "loss_ce_enc": "enc",  # the two-stage proposals'
        "loss_bbox_hybrid_0": "hybrid",  # a training-only part's, every layer together
        "loss_giou_dn": "dn",
        "loss_ce_dense_queries_2": "dense_queries",
        "loss_bbox_dense": "dense",
        "loss_position": "position",
    }
    assert {key: loss_group(key) for key in cases} == cases


def logger_with(values: dict) -> MetricLogger:
    logger = MetricLogger()
    for key, series in values.items():
        for value in series:
            logger.update(**{key: value})
    return logger


def test_the_parts_add_up_to_the_logged_loss_and_leave_out_the_unscaled_terms():
    terms = {
        "loss_ce": [1.0, 2.0],
        "loss_ce_0": [0.5, 1.5],
        "loss_bbox": [3.0, 3.0],
        "loss_giou_enc": [0.25, 0.75],
        "loss_ce_unscaled": [9.0, 9.0],
    }
    total = [sum(series[i] for key, series in terms.items() if "unscaled" not in key) for i in range(2)]
    logger = logger_with({"loss": total, **terms})
    parts = grouped_losses(logger.meters, "avg")
    assert list(parts) == ["ce", "bbox", "enc"]  # DETR's heads first, then the other parts
    assert parts == pytest.approx({"ce": 2.5, "bbox": 3.0, "enc": 0.5})
    assert sum(parts.values()) == pytest.approx(logger.meters["loss"].avg)


def test_the_loss_text_gives_up_decimals_then_the_extra_parts_to_fit():
    parts = {"ce": 1.23456, "bbox": 2.5, "giou": 3.0, "enc": 4.0, "hybrid": 5.0, "dn": 6.0}
    full = loss_text(21.73456, parts, 200)
    assert full == "loss 21.735 (ce 1.235 bbox 2.500 giou 3.000 enc 4.000 hybrid 5.000 dn 6.000)"
    assert (
        loss_text(21.73456, parts, len(full) - 1)
        == "loss 21.735 (ce 1.23 bbox 2.50 giou 3.00 enc 4.00 hybrid 5.00 dn 6.00)"
    )
    assert loss_text(21.73456, parts, 60) == "loss 21.735 (ce 1.23 bbox 2.50 giou 3.00 other 15.00)"
    assert loss_text(21.73456, parts, 20) == "loss 21.735"


class Clock:
    """time.time for util.console, moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def train_epoch(console: ShortConsole, clock: Clock, epoch: int, steps: int, step_s: float, print_freq: int = 1):
    """Iterate the console's training steps as engine.train_one_epoch does, each step taking step_s seconds."""
    logger = MetricLogger()
    logger.add_meter("lr", SmoothedValue(window_size=1))
    for _ in console.training_steps(logger, list(range(steps)), print_freq, epoch):
        clock.now += step_s
        logger.update(loss=3.0, loss_ce=1.0, loss_bbox=2.0, loss_ce_unscaled=1.0, lr=1e-4, class_error=50.0)


def test_the_eta_counts_the_rest_of_the_run_at_the_pace_of_the_finished_epochs(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(console_module.time, "time", clock)
    console = ShortConsole(argparse.Namespace(epochs=5), main_py.get_args_parser())
    train_epoch(console, clock, epoch=0, steps=4, step_s=2.0)
    lines = capsys.readouterr().out.splitlines()
    # In the first epoch: the rest of it and 4 more epochs at 4 steps of 2 s.
    etas = [int(m.group(5)) * 3600 + int(m.group(6)) * 60 + int(m.group(7)) for m in map(STEP_LINE.match, lines)]
    assert etas == [3 * 2 + 4 * 8, 2 * 2 + 4 * 8, 1 * 2 + 4 * 8, 0 + 4 * 8]
    clock.now += 12.0  # the evaluation and the checkpoint: epoch 0 took 20 s in all
    train_epoch(console, clock, epoch=1, steps=4, step_s=1.0)
    lines = capsys.readouterr().out.splitlines()
    first = STEP_LINE.match(lines[0])
    assert first.group(1, 2, 3, 4) == ("1", "5", "0", "4")
    assert int(first.group(6)) * 60 + int(first.group(7)) == 3 * 1 + 3 * 20
    assert first.group(8, 9, 10, 11) == ("3.000", "ce 1.000 bbox 2.000", "1.00e-04", "1.000")


def test_the_eta_ends_no_later_than_the_time_budget(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(console_module.time, "time", clock)
    monkeypatch.setattr(time_budget_module.time, "time", clock)
    budget = TimeBudget(1.0, 100, 100, run_start=clock.now)  # 1 minute for 100 epochs of 4 steps of 2 s
    console = ShortConsole(argparse.Namespace(epochs=100), main_py.get_args_parser())
    console.budget = budget
    clock.now += 10.0  # 10 s of setup before the first epoch
    budget.start_training(None, 0, clock.now)
    train_epoch(console, clock, epoch=0, steps=4, step_s=2.0)
    lines = capsys.readouterr().out.splitlines()
    etas = [int(m.group(6)) * 60 + int(m.group(7)) for m in map(STEP_LINE.match, lines)]
    # Without the budget: 6 s and 99 epochs of 8 s; with it, what is left of its 60 s after each step.
    assert etas == [60 - 10 - 2, 60 - 10 - 4, 60 - 10 - 6, 60 - 10 - 8]
    assert TimeBudget(0, 100, 100).seconds_left() is None


class LongEpoch:
    """The first 3 batches of an epoch of 20000 steps."""

    def __len__(self) -> int:
        return 20000

    def __iter__(self):
        return iter(range(3))


def test_a_step_line_stays_short_with_every_part_and_a_long_run(monkeypatch, capsys):
    clock = Clock()
    monkeypatch.setattr(console_module.time, "time", clock)
    console = ShortConsole(argparse.Namespace(epochs=500), main_py.get_args_parser())
    logger = MetricLogger()
    terms = [f"loss_{t}{s}" for t in ("ce", "bbox", "giou") for s in ("", "_enc", "_hybrid", "_dn", "_dense")]
    terms += ["loss_mask", "loss_dice", "loss_position", "loss_ce_dense_queries"]
    values = iter((1.2345, 1.2345, 1234.5678))  # the third step's losses diverge
    for _ in console.training_steps(logger, LongEpoch(), 1, 499):
        value = next(values)
        clock.now += 123.4
        logger.update(loss=value * len(terms), lr=1e-4, **{t: value for t in terms})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(len(line) < LINE_LIMIT for line in lines), lines
    steps = [STEP_LINE.match(line) for line in lines]
    assert all(steps), lines
    # Each head's part is shown and the 14 terms of the other parts added up, where all of them do not fit.
    assert steps[0].group(9) == "ce 1.23 bbox 1.23 giou 1.23 mask 1.23 dice 1.23 other 17.28"
    assert steps[2].group(8) == f"{(2 * 1.2345 + 1234.5678) / 3 * len(terms):.3f}"


def test_the_banner_lists_the_flags_that_differ_from_the_defaults_and_the_recipe(synthetic_root):
    argv = tiny_flags(synthetic_root, "", "--epochs", "2", "--exact", "--no_plots")
    args = main_py.parse_args(argv)
    recipe = main_py.show_recipe(args, "cpu", printed=False)
    flags = changed_flags(args, main_py.get_args_parser(), recipe)
    # As they would be typed; the device the run uses and the dataset are said by the banner's first lines.
    assert "--epochs 2" in flags and "--exact" in flags and "--no_plots" in flags and "--no_two_stage" in flags
    assert "--hidden_dim 32" in flags and f"--synthetic_path {synthetic_root}" in flags and "--output_dir ''" in flags
    assert not any(flag.startswith(("--lr ", "--backbone ", "--device", "--dataset_file")) for flag in flags)
    assert changed_flags(main_py.parse_args([]), main_py.get_args_parser(), None) == []


# ------------------------------------------------------------------------------------------ main.py, end to end


@pytest.fixture(scope="module")
def runs(synthetic_root, tmp_path_factory):
    """(output folder, printed) of a 2-epoch run with the short console, and of its first epoch with the
    original's console (without pictures, which draw nothing from the run's generators)."""
    short, original = tmp_path_factory.mktemp("short"), tmp_path_factory.mktemp("original")
    _, short_printed = run_main(tiny_flags(synthetic_root, short, "--epochs", "2"))
    _, original_printed = run_main(
        tiny_flags(synthetic_root, original, "--epochs", "1", "--no_plots", "--console", "original")
    )
    return (short, short_printed), (original, original_printed)


@pytest.mark.slow
def test_the_short_console_prints_one_short_line_per_printed_step(runs):
    (out, printed), _ = runs
    lines = printed.splitlines()
    steps = [STEP_LINE.match(line) for line in lines if line.startswith("epoch ") and " step " in line]
    # 16 training images in batches of 4: steps 0 and 3 of each of the 2 epochs are printed.
    assert [m.group(1, 2, 3, 4) for m in steps] == [(e, "2", s, "4") for e in "01" for s in "03"]
    assert all(len(m.group(0)) < LINE_LIMIT for m in steps)
    assert float(steps[-1].group(10)) == pytest.approx(read_log(out / "log.txt")[-1]["train_lr"])
    assert all(len(line) < LINE_LIMIT for line in lines if line.startswith(("epoch ", "test ")))
    assert "Namespace(" not in printed and "Averaged stats:" not in printed and "Epoch: [" not in printed
    assert any(line.startswith("Training DETR (resnet18, 1+2 layers, 8 queries") for line in lines)


@pytest.mark.slow
def test_the_summary_names_the_results_the_pictures_and_the_best_checkpoint(runs):
    (out, printed), _ = runs
    summary = printed[printed.index("Finished training in ") :]
    log = read_log(out / "log.txt")
    last = log[-1]["test_coco_eval_bbox"][0]
    best = max(log, key=lambda row: row["test_coco_eval_bbox"][0])
    assert f"box AP  {last:.3f} at the last epoch, best {best['test_coco_eval_bbox'][0]:.3f}" in summary
    assert f"Best epoch: {best['epoch']} " in summary and str(out / "checkpoint_best.pth") in summary
    assert f"Pictures in {out}: predictions.png, curves.png, per_class.png" in summary
    assert f"tensorboard --logdir {out / 'tensorboard'}" in summary
    assert all((out / name).exists() for name in ("predictions.png", "curves.png", "per_class.png"))


@pytest.mark.slow
def test_log_txt_is_the_same_with_either_console_and_the_original_prints_its_lines(runs):
    (short, _), (original, printed) = runs
    short_log, original_log = read_log(short / "log.txt"), read_log(original / "log.txt")
    assert short_log[0] == original_log[0]  # the same keys and values: only the console differs
    assert all(row.keys() == original_log[0].keys() for row in short_log)
    assert "Namespace(" in printed and "console='original'" in printed
    assert re.search(r"^Epoch: \[0\]  \[0/4\]  eta: \S+  lr: 0\.001000  class_error: ", printed, re.M)
    assert "\nAveraged stats: lr: " in printed and "\nStart training\n" in printed
    assert "Recipe of --dataset_file synthetic (datasets/synthetic.py; flags given win): " in printed
    assert re.search(r"^Training time \d+:\d\d:\d\d$", printed, re.M)
    assert "Finished training" not in printed and not re.search(r"^epoch \d", printed, re.M)


def test_the_original_console_is_the_engines_default(capsys):
    logger = MetricLogger(delimiter="  ")
    logger.update(loss=2.0)
    for _ in Console().training_steps(logger, [0, 1], 10, epoch=3):
        pass
    Console().averaged(logger)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Epoch: [3]  [0/2]  eta: ") and "loss: 2.0000 (2.0000)" in lines[0]
    assert lines[-1] == "Averaged stats: loss: 2.0000 (2.0000)"
