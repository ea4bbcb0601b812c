"""Plot training runs of main.py: `python tools/plot_logs.py OUTPUT_DIR [OUTPUT_DIR ...] --out plots/`.

Writes to --out:
    logs.png               per epoch, one colour per run: class error, box L1 loss (train solid, test dashed) and
                           COCO box AP (util.plot_utils.plot_logs; --fields picks other log keys)
    precision_recall.png   precision and score against recall of each run's last evaluation,
                           OUTPUT_DIR/eval/latest.pth (or OUTPUT_DIR/eval.pth of an --eval run), when there is one
"""

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root, wherever this runs from

from util.plot_utils import plot_logs, plot_precision_recall

PROG = "tools/plot_logs.py"
DEFAULT_FIELDS = ("class_error", "loss_bbox_unscaled", "mAP")


def latest_evaluation(output_dir: Path) -> Optional[Path]:
    """The last COCO evaluation main.py saved in `output_dir`, or None."""
    for candidate in (output_dir / "eval" / "latest.pth", output_dir / "eval.pth"):
        if candidate.is_file():
            return candidate
    return None


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(PROG, description="Plot the logs and evaluations of main.py runs.")
    parser.add_argument("output_dirs", nargs="+", type=Path, help="output directories of main.py (--output_dir)")
    parser.add_argument("--out", default="plots", type=Path, help="folder for logs.png and precision_recall.png")
    parser.add_argument(
        "--fields",
        nargs="+",
        default=list(DEFAULT_FIELDS),
        help="log keys without their train_/test_ prefix, or mAP (default: %(default)s)",
    )
    parser.add_argument(
        "--ewm_col",
        default=0.0,
        type=float,
        help="smoothing: centre of mass of the exponentially weighted mean (0: none)",
    )
    parser.add_argument("--log_name", default="log.txt", help="the log file in each output directory")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        fig, _ = plot_logs(
            args.output_dirs,
            fields=args.fields,
            ewm_col=args.ewm_col,
            log_name=args.log_name,
            save_path=args.out / "logs.png",
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    plt.close(fig)
    print(f"wrote {args.out / 'logs.png'}")

    evaluations = [e for e in map(latest_evaluation, args.output_dirs) if e is not None]
    if not evaluations:
        print("no saved evaluation (OUTPUT_DIR/eval/latest.pth or eval.pth): precision_recall.png not written")
        return 0
    try:
        fig, _ = plot_precision_recall(evaluations, naming_scheme="exp_id", save_path=args.out / "precision_recall.png")
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{PROG}: error: {e}") from None
    plt.close(fig)
    print(f"wrote {args.out / 'precision_recall.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
