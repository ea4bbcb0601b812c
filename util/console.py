"""What a run prints while it trains: a short banner, one short line per printed step and a closing summary
(--console short, the default), or the original DETR's lines (--console original: the namespace, every meter at
every printed step). Only the console differs: log.txt and TensorBoard get every meter either way."""

import argparse
import datetime
import json
import re
import shlex
import textwrap
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from util.misc import MetricLogger, SmoothedValue
from util.time_budget import TimeBudget

CONSOLE_STYLES = ("short", "original")
# Every line a short console prints while training stays below this many characters.
LINE_LIMIT = 160
# The loss terms of DETR's own heads; any other term (a two-stage or training-only part) is shown by its part name.
MAIN_TERMS = ("ce", "bbox", "giou", "mask", "dice")
# What --output_dir holds after a run, as util/visualize.save_training_pictures names it.
PICTURES = ("predictions.png", "panoptic.png", "curves.png", "per_class.png")


def duration(seconds: float) -> str:
    """'H:MM:SS', the hours counting on past a day (a long run's ETA reads '76:05:00')."""
    seconds = max(int(seconds), 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def loss_group(key: str) -> str:
    """The part of the loss a term belongs to: 'loss_giou_3' -> 'giou' (every decoder layer's with the last's),
    'loss_ce_enc' -> 'enc' (the two-stage proposals'), 'loss_bbox_hybrid_0' -> 'hybrid' (a training-only part's),
    'loss_position' -> 'position'."""
    name = re.sub(r"_\d+$", "", key[len("loss_") :])
    if name in MAIN_TERMS:
        return name
    head, _, part = name.partition("_")
    return re.sub(r"_\d+$", "", part) if head in MAIN_TERMS and part else name


def grouped_losses(meters: Dict[str, SmoothedValue], statistic: str) -> Dict[str, float]:
    """The weighted loss terms among a MetricLogger's meters (named loss_*, not *_unscaled), summed by loss_group;
    `statistic` is the SmoothedValue property to read ('avg' over the window, 'global_avg' over the epoch), so that
    the parts add up to the 'loss' meter's."""
    groups: Dict[str, float] = {}
    for key, meter in meters.items():
        if key.startswith("loss_") and not key.endswith("_unscaled"):
            group = loss_group(key)
            groups[group] = groups.get(group, 0.0) + getattr(meter, statistic)
    main = {k: groups[k] for k in MAIN_TERMS if k in groups}
    return {**main, **{k: v for k, v in groups.items() if k not in main}}


def loss_text(total: float, parts: Dict[str, float], room: int) -> str:
    """'loss 16.001 (ce 4.038 bbox 7.925 giou 4.038)' in at most `room` characters where it fits: the parts with
    fewer decimals, then those beyond DETR's own heads added up as 'other', then the total alone, as they fit."""
    main = {k: v for k, v in parts.items() if k in MAIN_TERMS}
    other = {k: v for k, v in parts.items() if k not in MAIN_TERMS}
    variants = [(parts, 3), (parts, 2), ({**main, "other": sum(other.values())} if other else main, 2), (main, 2)]
    for shown, decimals in variants:
        text = f"loss {total:.3f} (" + " ".join(f"{k} {v:.{decimals}f}" for k, v in shown.items()) + ")"
        if len(text) <= room:
            return text
    return f"loss {total:.3f}"


class Console:
    """The original DETR's console: the parsed namespace, MetricLogger's line of every meter at every printed step
    and after each epoch, the best epoch and the training time at the end."""

    short = False

    def show_args(self, args) -> None:
        print(args)

    def start_training(
        self, args, recipe: Optional[dict], n_parameters: int, data_loader, data_loader_val, device: str,
        start_epoch: int, budget: TimeBudget,
    ) -> None:  # fmt: skip
        """device: the one the run uses; budget: its epoch count as it stands (--time_budget may cut it)."""
        print("Start training")

    def training_steps(self, metric_logger: MetricLogger, data_loader, print_freq: int, epoch: int) -> Iterator:
        return metric_logger.log_every(data_loader, print_freq, f"Epoch: [{epoch}]")

    def evaluation_steps(self, metric_logger: MetricLogger, data_loader, print_freq: int) -> Iterator:
        return metric_logger.log_every(data_loader, print_freq, "Test:")

    def averaged(self, metric_logger: MetricLogger, epoch: Optional[int] = None) -> None:
        """The epoch's averages (of the training epoch `epoch`, or of an evaluation when None)."""
        print("Averaged stats:", metric_logger)

    def summary(self, args, test_stats: dict, best: Optional[dict], output_dir: Optional[Path], seconds: float) -> None:
        """At the end of training: `best` is the best epoch's record ({'metric', 'value', 'epoch'}) or None."""
        if best is not None:
            print(f"Best epoch: {best['epoch']} ({best['metric']} {best['value']:.4f}): {best_checkpoint(output_dir)}")
        print(f"Training time {datetime.timedelta(seconds=int(seconds))}")


def best_checkpoint(output_dir: Optional[Path]) -> Path:
    """Where main.py keeps the best epoch's checkpoint."""
    return Path(output_dir or "") / "checkpoint_best.pth"


class ShortConsole(Console):
    """A banner of what is trained on what (and the flags that differ from the defaults), one line of at most
    LINE_LIMIT characters per printed step (epoch, step, the whole run's ETA, the loss and its parts, lr, time per
    step), one line per epoch and evaluation, and a summary naming the results, pictures and best checkpoint.
    The run's epoch count is read at every line: --time_budget may shorten the run while it goes."""

    short = True

    def __init__(self, args, parser: argparse.ArgumentParser):
        self.args, self.parser = args, parser
        self.budget: Optional[TimeBudget] = None  # the run's, once training starts
        self.epoch_starts: List[Tuple[int, float]] = []  # (epoch, time) of each training epoch this process began
        self.phase_start = time.time()
        self.step_time = SmoothedValue(fmt="{avg:.4f}")

    def show_args(self, args) -> None:
        pass  # the banner, printed once the data and the model are built, says what matters of them

    def start_training(
        self, args, recipe: Optional[dict], n_parameters: int, data_loader, data_loader_val, device: str,
        start_epoch: int, budget: TimeBudget,
    ) -> None:  # fmt: skip
        self.budget = budget
        run = (device, start_epoch, budget.epochs)
        for line in banner_lines(args, self.parser, recipe, n_parameters, data_loader, data_loader_val, *run):
            print(line)

    def _steps(self, iterable, print_freq: int, line) -> Iterator:
        self.phase_start = end = time.time()
        self.step_time = SmoothedValue(fmt="{avg:.4f}")
        n = len(iterable)
        for i, item in enumerate(iterable):
            yield item
            self.step_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                print(line(i, n))
            end = time.time()

    def training_steps(self, metric_logger: MetricLogger, data_loader, print_freq: int, epoch: int) -> Iterator:
        now = time.time()
        self.epoch_starts.append((epoch, now))

        def line(i: int, n: int) -> str:
            metric_logger.flush()  # every pending value read to the host in one copy, as MetricLogger prints
            meters = metric_logger.meters
            epochs = self.epochs()
            head = f"epoch {epoch}/{epochs}  step {i:{len(str(n))}d}/{n}  run eta {duration(self.run_eta(epoch, i, n))}"
            tail = f"lr {meters['lr'].value:.2e}  {self.step_time.avg:.3f} s/step" + memory_text()
            room = LINE_LIMIT - 1 - len(head) - len(tail) - 4
            loss = loss_text(meters["loss"].avg, grouped_losses(meters, "avg"), room)
            return f"{head}  {loss}  {tail}"

        return self._steps(data_loader, print_freq, line)

    def epochs(self) -> int:
        return self.budget.epochs if self.budget is not None else self.args.epochs

    def run_eta(self, epoch: int, i: int, n: int) -> float:
        """Seconds to the end of the run: the rest of this epoch at its pace so far, and each epoch after it at
        the pace of the epochs this process has completed (their evaluation and saving included), or of this one's
        steps while it is the first; no later than --time_budget's end."""
        step_s = self.step_time.global_avg
        done = [t for e, t in self.epoch_starts if e < epoch]
        per_epoch = (self.epoch_starts[-1][1] - done[0]) / len(done) if done else step_s * n
        eta = step_s * (n - i - 1) + max(self.epochs() - epoch - 1, 0) * per_epoch
        left = self.budget.seconds_left() if self.budget is not None else None
        return eta if left is None else min(eta, left)  # --time_budget ends the run by then

    def evaluation_steps(self, metric_logger: MetricLogger, data_loader, print_freq: int) -> Iterator:
        def line(i: int, n: int) -> str:
            metric_logger.flush()
            meters = metric_logger.meters
            eta = duration(self.step_time.global_avg * (n - i - 1))
            head = f"test  step {i:{len(str(n))}d}/{n}  eta {eta}"
            tail = f"{self.step_time.avg:.3f} s/step"
            loss = loss_text(meters["loss"].avg, grouped_losses(meters, "avg"), LINE_LIMIT - 1 - len(head + tail) - 4)
            return f"{head}  {loss}  {tail}"

        return self._steps(data_loader, print_freq, line)

    def averaged(self, metric_logger: MetricLogger, epoch: Optional[int] = None) -> None:
        meters = metric_logger.meters
        steps, seconds = self.step_time.count, time.time() - self.phase_start
        what = f"epoch {epoch}/{self.epochs()} trained" if epoch is not None else "test"
        head = f"{what} in {duration(seconds)} ({steps} steps)"
        tail = f"class error {meters['class_error'].global_avg:.1f}" if "class_error" in meters else ""
        room = LINE_LIMIT - 1 - len(head) - len(tail) - 4
        print(f"{head}  {loss_text(meters['loss'].global_avg, grouped_losses(meters, 'global_avg'), room)}  {tail}")

    def summary(self, args, test_stats: dict, best: Optional[dict], output_dir: Optional[Path], seconds: float) -> None:
        for line in summary_lines(args, test_stats, best, output_dir, seconds):
            print(line)


def make_console(args, parser: argparse.ArgumentParser) -> Console:
    """The console --console asks for; `parser` is main.py's, whose defaults the banner compares the flags with."""
    return ShortConsole(args, parser) if args.console == "short" else Console()


def memory_text() -> str:
    """'  12.3 GB', the most GPU memory allocated so far (on a CUDA machine, as the original's 'max mem'), or ''."""
    if not torch.cuda.is_available():
        return ""
    return f"  {torch.cuda.max_memory_allocated() / 2**30:.1f} GB"


def banner_lines(
    args, parser: argparse.ArgumentParser, recipe: Optional[dict], n_parameters: int, data_loader, data_loader_val,
    device: str, start_epoch: int, epochs: int,
) -> List[str]:  # fmt: skip
    """What is trained on what data, for how long and where it goes, and the flags that differ from the
    defaults in effect (the parser's, and the recipe of the dataset where it has one)."""
    model = f"DETR ({args.backbone}, {args.enc_layers}+{args.dec_layers} layers, {args.num_queries} queries"
    model += ", two-stage" if args.two_stage else ""
    model += ", mask head" if args.masks else ""
    lines = [
        f"Training {model}; {n_parameters / 1e6:.1f}M trained parameters) on {device}",
        f"Data: {args.dataset_file}, {len(data_loader.dataset)} training images in {len(data_loader)} steps of "
        f"{args.batch_size}, {len(data_loader_val.dataset)} validation images",
        f"Epochs {start_epoch} to {epochs - 1}"
        + (f" (fewer if --time_budget {args.time_budget:g} min is short)" if args.time_budget > 0 else "")
        + "; output: "
        + (f"{args.output_dir} (log.txt, checkpoints, pictures)" if args.output_dir else "none (no --output_dir)"),
    ]
    if recipe is not None:
        written = f"; written to {Path(args.output_dir) / 'recipe.json'}" if args.output_dir else ""
        lines.append(f"Defaults: the recipe of --dataset_file {args.dataset_file} ({recipe['defined_in']}{written})")
    if args.output_dir and args.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {Path(args.output_dir) / 'tensorboard'}")
    given = changed_flags(args, parser, recipe)
    text = "Flags that differ from them: " + (" ".join(given) if given else "none")
    lines += textwrap.wrap(text, width=120, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False)
    return lines


# Flags a run sets itself (the device it fell back to, the metric 'auto' stands for, the classes the data has).
SET_BY_THE_RUN = ("device", "best_metric", "num_classes", "dataset_file")


def changed_flags(args, parser: argparse.ArgumentParser, recipe: Optional[dict]) -> List[str]:
    """The flags of args that differ from the parser's defaults with the dataset's recipe over them, as they
    would be given on the command line ('--epochs 2', '--no_two_stage', '--exact')."""
    defaults = vars(parser.parse_args([]))
    if recipe is not None:
        defaults.update(recipe["flags"], **recipe["recipe_values_replaced_by_flags_given"])
    flags = []
    for name, value in vars(args).items():
        if name not in defaults or name in SET_BY_THE_RUN or value == defaults[name]:
            continue
        actions = [a for a in parser._actions if a.dest == name and a.option_strings]
        switch = next((a for a in actions if a.nargs == 0 and a.const == value), None)
        if switch is not None:
            flags.append(switch.option_strings[0])
        elif actions:
            shown = " ".join(shlex.quote(str(v)) for v in (value if isinstance(value, (list, tuple)) else [value]))
            flags.append(f"{actions[0].option_strings[0]} {shown}")
    return flags


def summary_lines(
    args, test_stats: dict, best: Optional[dict], output_dir: Optional[Path], seconds: float
) -> List[str]:
    """The end of a run: its last and best results (box AP, mask AP and PQ, as it has them), the best
    checkpoint, the pictures and the TensorBoard command."""
    rows = read_log_rows(Path(output_dir) / "log.txt") if output_dir is not None else []
    last_epoch = rows[-1]["epoch"] if rows else None
    lines = [f"Finished training in {duration(seconds)}" + (f", last epoch {last_epoch}" if rows else "")]
    for label, key, read in RESULTS:
        if key not in test_stats:
            continue
        text = f"  {label:<8}{read(test_stats[key]):.3f} at the last epoch"
        logged = [(read(r[f"test_{key}"]), r["epoch"]) for r in rows if f"test_{key}" in r]
        if logged:
            value, epoch = max(logged, key=lambda v: v[0])
            text += f", best {value:.3f} at epoch {epoch}"
        lines.append(text)
    if best is not None:
        lines.append(
            f"Best epoch: {best['epoch']} ({best['metric']} {best['value']:.4f}): {best_checkpoint(output_dir)}"
        )
    if output_dir is None:
        lines.append("Nothing saved: no --output_dir")
        return lines
    pictures = [name for name in PICTURES if (Path(output_dir) / name).exists()]
    lines.append(f"Pictures in {output_dir}: {', '.join(pictures)}" if pictures else "No pictures (--no_plots)")
    if args.tensorboard:
        lines.append(f"TensorBoard: tensorboard --logdir {Path(output_dir) / 'tensorboard'}")
    return lines


# (label, key of evaluate's stats, how to read the value from it)
RESULTS = (
    ("box AP", "coco_eval_bbox", lambda v: v[0]),
    ("mask AP", "coco_eval_masks", lambda v: v[0]),
    ("PQ", "PQ_all", lambda v: v["pq"]),
)


def read_log_rows(path: Path) -> List[dict]:
    """log.txt's JSON lines ([] without the file), less any line a killed run left cut short."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows
