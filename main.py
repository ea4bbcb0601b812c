"""Train and evaluate DETR: `python main.py --coco_path /path/to/coco`, or `python main.py --dataset_file synthetic`.

One process by default; `torchrun --nproc_per_node=N main.py ...` for several (see the README).
"""
import argparse
import contextlib
import datetime
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import List

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import datasets
import util.misc as utils
from datasets import build_dataset, get_coco_api_from_dataset
from datasets.synthetic import add_synthetic_args
from engine import evaluate, train_one_epoch
from models import build_model
from models.detr import check_learned_queries
from models.fast import adamw_options, enable_fast_path
from engine import enable_compile
from util.checkpoint import (CheckpointError, check_checkpoint_file, load_checkpoint, load_state_dict_checked,
                             load_state_dict_for_finetuning, model_state_from)
from util.ema import ModelEMA
from util.misc import choose_device


def add_switch(parser: argparse.ArgumentParser, name: str, help_on: str, help_off: str) -> None:
    """--NAME (off unless given) and --no_NAME, which undoes it (and a dataset default that turns it on)."""
    parser.add_argument(f"--{name}", action="store_true", help=help_on)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"{help_off} (undoes --{name})")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float,
                        help="learning rate of the backbone; 0 freezes it")
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int)
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument("--ema_decay", default=0.0, type=float,
                        help="evaluate and save an exponential moving average of the weights with this decay per "
                             "step (e.g. 0.998); 0, the default, keeps the original's plain weights. Training "
                             "itself is unchanged. The checkpoint's 'model' holds the average (what was evaluated); "
                             "'train_model' the weights training resumes from")
    add_switch(parser, "amp",
               "run the model's forward pass under bfloat16 autocast (CPU or GPU; losses stay in fp32). Faster where "
               "bfloat16 is fast; off by default (fp32 is the original's numerics) except for the synthetic datasets",
               "fp32 forward pass")
    add_switch(parser, "channels_last",
               "run the ResNet in the channels-last memory layout, which oneDNN (CPU) and tensor cores favour; same "
               "weights and checkpoints, off by default except for the synthetic datasets",
               "the ResNet in the default layout")
    # Speed: models/fast.py and engine.enable_compile; measured in docs/performance.md (tools/benchmark.py).
    parser.add_argument("--exact", action="store_true",
                        help="the bit-exact path, which reproduces the original DETR's numbers to the last bit. "
                             "Without it the model runs the fast path: frozen batch norms folded into the "
                             "convolutions, the ResNet channels-last, fused attention and a fused AdamW; same "
                             "weights and checkpoints, results within float rounding (1e-4)")
    parser.add_argument("--compile", action="store_true",
                        help="run the model through torch.compile (dynamic shapes: one compilation for all image "
                             "sizes) in training and evaluation; falls back to eager mode, with a message, where "
                             "compile is unavailable or fails")

    # Model parameters
    parser.add_argument("--frozen_weights", type=str, default=None,
                        help="Path to the pretrained model. If set, only the mask head will be trained")
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str,
                        help="Name of the convolutional backbone to use")
    parser.add_argument("--feature_stride", default=32, type=int, choices=(8, 16, 32),
                        help="Stride of the feature map the transformer reads: 32 is the original (the ResNet's "
                             "layer4); 16 or 8 end the backbone after layer3 or layer2, a finer map from a shorter "
                             "network")
    parser.add_argument("--dilation", action="store_true",
                        help="If true, we replace stride with dilation in the last convolutional block (DC5)")
    parser.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned", "v2", "v3"),
                        help="Type of positional embedding to use on top of the image features")
    parser.add_argument("--backbone_weights", default="imagenet", type=str,
                        help="initial backbone weights: 'imagenet' (torchvision's IMAGENET1K_V1 file, from "
                             "torch.hub's cache under TORCH_HOME or downloaded), 'none' (train from scratch), "
                             "or the path of a ResNet state_dict file")

    parser.add_argument("--backbone_norm", default="frozen", choices=("frozen", "batch"),
                        help="normalization in the backbone: 'frozen' batch norm as in the original (for "
                             "pretrained weights) or trainable 'batch' norm with every layer trained (for "
                             "--backbone_weights none, where frozen statistics would mean no normalization)")

    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="Number of encoding layers in the transformer")
    parser.add_argument("--dec_layers", default=6, type=int, help="Number of decoding layers in the transformer")
    parser.add_argument("--dim_feedforward", default=2048, type=int,
                        help="Intermediate size of the feedforward layers in the transformer blocks")
    parser.add_argument("--hidden_dim", default=256, type=int,
                        help="Size of the embeddings (dimension of the transformer)")
    parser.add_argument("--dropout", default=0.1, type=float, help="Dropout applied in the transformer")
    parser.add_argument("--nheads", default=8, type=int,
                        help="Number of attention heads inside the transformer's attentions")
    parser.add_argument("--num_queries", default=100, type=int, help="Number of query slots")
    add_switch(parser, "two_stage",
               "Queries from the encoder: every encoder token proposes a class and a box (with a loss of its own, "
               "terms suffixed _enc) and the num_queries best proposals seed the decoder, whose boxes refine them. "
               "Trains much faster from scratch; off in the original",
               "the original's learned queries")
    parser.add_argument("--learned_queries", default=0, type=int,
                        help="with --two_stage: this many of the num_queries queries are learned embeddings, as in "
                             "the original, and the others proposals. On panoptic data the proposals then learn the "
                             "thing classes only and the learned queries find the stuff regions")
    parser.add_argument("--query_nms", default=1.0, type=float,
                        help="with --two_stage, at evaluation and inference: the decoder's queries pass over "
                             "proposals that overlap a better one by more than this IoU (1.0: never)")
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument("--num_classes", default=None, type=int,
                        help="size of the class head minus one (max category id + 1); default: 91 for coco, "
                             "250 for coco_panoptic, read from the annotations otherwise")

    # * Segmentation
    parser.add_argument("--masks", action="store_true",
                        help="Train segmentation head if the flag is provided")
    parser.add_argument("--mask_attention_gain", default=1.0, type=float,
                        help="the mask head's first convolution starts with its weights on the attention maps "
                             "(values of about 1 / (heads x positions)) multiplied by this, so that it tells the "
                             "queries apart from the first steps (1: the original's initialization)")
    parser.add_argument("--panoptic_threshold", default=0.85, type=float,
                        help="the panoptic post-processor keeps the queries whose best class scores above this")

    # Loss
    parser.add_argument("--no_aux_loss", dest="aux_loss", action="store_false",
                        help="Disables auxiliary decoding losses (loss at each layer)")
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=float, help="Class coefficient in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    # * Loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument("--eos_coef", default=0.1, type=float,
                        help="Relative classification weight of the no-object class")

    # dataset parameters
    parser.add_argument("--dataset_file", default="coco",
                        help="coco, coco_panoptic, synthetic (generated here, no download) or synthetic_panoptic")
    parser.add_argument("--coco_path", type=str)
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument("--device", default="cuda",
                        help="device to use for training / testing (falls back to cpu when CUDA is absent)")
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument("--resume", default="", help="resume from checkpoint (a path or an https URL)")
    parser.add_argument("--auto_resume", action="store_true",
                        help="when --resume is not given, resume from output_dir/checkpoint.pth if it exists "
                             "(what a requeued cluster job needs)")
    parser.add_argument("--finetune", default="",
                        help="start from this checkpoint's weights (path or URL) but not its optimizer or epoch; "
                             "parameters whose shapes differ (e.g. a class head for another --num_classes) are "
                             "re-initialized, and named")
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    parser.add_argument("--dist_timeout", default=1800, type=int,
                        help="seconds to wait for the other processes (rendezvous, collectives) before failing")
    parser.add_argument("--no_plots", dest="plots", action="store_false",
                        help="do not write predictions.png and curves.png to output_dir after each epoch")
    add_synthetic_args(parser)
    return parser


# What `--dataset_file synthetic` trains with unless a flag says otherwise: a model and schedule sized so a
# 2-core CPU reaches a useful AP in minutes. Any flag given on the command line wins. On two cores, a data-loader
# worker process slows the two compute threads more than reading 8 small images in the loop does.
SYNTHETIC_DEFAULTS = dict(
    backbone="resnet18", backbone_weights="none", backbone_norm="batch", hidden_dim=128, nheads=8, enc_layers=2,
    dec_layers=3, dim_feedforward=512, num_queries=20, dropout=0.0, batch_size=8, lr=2e-4, lr_backbone=2e-4,
    weight_decay=1e-4, epochs=16, lr_drop=13, amp=True, channels_last=True, num_workers=0,
    output_dir="outputs/synthetic",
)
# On top of those, for detection (`synthetic`): queries from the proposals of a stride-8 feature map, which
# learn from scratch many times faster than the original's learned queries on a stride-32 map. Without encoder
# layers the proposals come from the projected features and their 3x3 neighbourhoods: that learned twice as
# fast here as with 2 layers, and each iteration is cheaper. At evaluation the queries skip duplicate proposals
# (--query_nms), which the decoder does not learn to drop within this budget. One decoder layer refines the
# proposals as well as three did here. Twice the training images (3200, 15 epochs: the same 6000 steps as 30
# epochs of 1600) overfit less: 0.491 box AP against 0.434.
SYNTHETIC_DETECTION_DEFAULTS = dict(two_stage=True, feature_stride=8, enc_layers=0, dec_layers=1, query_nms=0.7,
                                    lr=1e-3, lr_backbone=1e-3, synthetic_train_size=3200, epochs=15, lr_drop=12)

# For panoptic (`synthetic_panoptic`), the box stage: the detection recipe's proposals for the shapes, and 5 of
# the 20 queries learned as in the original for the stuff regions (every token of a region would propose it,
# crowding the shapes out of the top proposals; with proposals only, the shapes reached 0.08 box AP, with these
# 0.32 in 8 epochs). Two decoder layers give the learned queries two looks at the image.
SYNTHETIC_PANOPTIC_DEFAULTS = dict(SYNTHETIC_DETECTION_DEFAULTS, dec_layers=2, learned_queries=5, epochs=12,
                                   lr_drop=10, output_dir="outputs/panoptic/boxes")
# And its mask stage (--masks): the attention maps' weights start 100 times larger, without which the mask head
# learnt nothing query-specific in its first 300 steps; the post-processor keeps queries scoring above 0.5 (0.85
# in the original), which the shapes seldom reach after a box stage of minutes.
SYNTHETIC_PANOPTIC_MASK_DEFAULTS = dict(mask_attention_gain=100.0, panoptic_threshold=0.5, lr=5e-4, epochs=2,
                                        lr_drop=2, output_dir="outputs/panoptic/masks")


def synthetic_defaults(dataset_file: str, masks: bool = False) -> dict:
    """The defaults `--dataset_file` (and, for synthetic_panoptic, --masks) brings (none for COCO)."""
    if dataset_file == "synthetic":
        return {**SYNTHETIC_DEFAULTS, **SYNTHETIC_DETECTION_DEFAULTS}
    if dataset_file == "synthetic_panoptic":
        mask_defaults = SYNTHETIC_PANOPTIC_MASK_DEFAULTS if masks else {}
        return {**SYNTHETIC_DEFAULTS, **SYNTHETIC_PANOPTIC_DEFAULTS, **mask_defaults}
    return {}


def given_flags(parser: argparse.ArgumentParser, argv) -> set:
    """The dests of the options that appear in argv (so dataset-specific defaults never override them).

    argv is parsed by `parser` itself into a namespace pre-filled with a marker, which argparse leaves in place
    of its defaults: so an abbreviated flag (`--epoch 5` for --epochs) or `--flag=value` counts as given too."""
    not_given = object()
    probe = argparse.Namespace(**{a.dest: not_given for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not not_given}


def apply_dataset_defaults(args, given: set) -> None:
    """Fill in the synthetic dataset's defaults for every flag not given explicitly."""
    for k, v in synthetic_defaults(args.dataset_file, args.masks).items():
        if k not in given:
            setattr(args, k, v)
    if not args.two_stage and "learned_queries" not in given:  # --no_two_stage: every query is learned anyway
        args.learned_queries = 0


def defaults_epilog() -> str:
    """--help's note of what the synthetic datasets change in the defaults above."""
    def listing(defaults: dict) -> str:
        return ", ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in defaults.items())
    return ("--dataset_file synthetic and synthetic_panoptic default to a model and schedule sized for a CPU: "
            f"{listing(SYNTHETIC_DEFAULTS)}; synthetic also to {listing(SYNTHETIC_DETECTION_DEFAULTS)}; "
            f"synthetic_panoptic to {listing(SYNTHETIC_PANOPTIC_DEFAULTS)}, and with --masks to "
            f"{listing(SYNTHETIC_PANOPTIC_MASK_DEFAULTS)}. Flags given explicitly win.")


def parse_args(argv=None):
    """Parse main.py's flags and apply the dataset-specific defaults."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser("DETR training and evaluation script", parents=[get_args_parser()],
                                     epilog=defaults_epilog())
    args = parser.parse_args(argv)
    apply_dataset_defaults(args, given_flags(parser, argv))
    return args


def rng_state() -> dict:
    """Every random generator training draws from, so a resumed run continues exactly where it stopped."""
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def isolated_rng():
    """Run a block without moving any global generator: what it draws is undone when it ends."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def restore_rng_states(states) -> None:
    """Continue this process's generators from a checkpoint's 'rng': one rng_state() per process (a single
    dict in checkpoints of single-process runs written before that), used only if the process count is the same."""
    states = [states] if isinstance(states, dict) else list(states)
    if len(states) != utils.get_world_size():
        print(f"--resume: the checkpoint holds the random states of {len(states)} process(es) but this run has "
              f"{utils.get_world_size()}; continuing with freshly seeded generators instead")
        return
    set_rng_state(states[utils.get_rank()])


# The flags that define the network. A checkpoint trained with other values is refused when resumed: some of
# them change no weight's shape or name (--dilation, --nheads, --backbone_norm), so its weights would load and
# silently mean something else.
ARCHITECTURE_FLAGS = ("backbone", "backbone_norm", "dilation", "position_embedding", "hidden_dim", "nheads",
                      "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "pre_norm", "num_classes",
                      "masks", "feature_stride", "two_stage", "learned_queries")


def architecture_differences(saved_args, args) -> List[str]:
    """'--flag: checkpoint X, this run Y' for every ARCHITECTURE_FLAGS value that differs between the args a
    checkpoint was trained with and this run's (flags the checkpoint does not record are not compared)."""
    aliases = {"v2": "sine", "v3": "learned"}  # the original's old names of the position encodings
    differences = []
    for name in ARCHITECTURE_FLAGS:
        if saved_args is None or not hasattr(saved_args, name) or getattr(saved_args, name) is None:
            continue
        saved, current = getattr(saved_args, name), getattr(args, name, None)
        if aliases.get(saved, saved) != aliases.get(current, current):
            differences.append(f"--{name}: checkpoint {saved!r}, this run {current!r}")
    return differences


def drop_log_lines_from(log_path: Path, first_epoch: int) -> None:
    """Keep only the lines of log.txt for epochs before first_epoch. A run stopped after logging an epoch but
    before saving its checkpoint redoes that epoch when resumed; without this its line would appear twice."""
    if not log_path.exists():
        return
    kept, dropped = [], 0
    for line in log_path.read_text().splitlines():
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed process, or an empty one
            dropped += bool(line.strip())
            continue
        if epoch < first_epoch:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = log_path.with_name(log_path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, log_path)
        print(f"{log_path}: removed {dropped} line(s) of epochs from {first_epoch} on, which are redone now")


def read_checkpoint(flag: str, path: str) -> dict:
    """load_checkpoint, stopping with a message that names the flag and the file when it cannot be used."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        raise SystemExit(f"{flag}: {e}") from None


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write a checkpoint atomically; a failed write (a full disk) stops the run and leaves the previous file."""
    try:
        utils.save_on_master(checkpoint, path)
    except OSError as e:
        kept = f"the previous {path} is intact" if path.exists() else f"no earlier {path.name} existed"
        raise SystemExit(f"could not write checkpoint {path} ({e}); {kept}. Free some space (or fix the folder) "
                         "and rerun with --auto_resume to continue from the last saved epoch.") from e


def remove_stale_temporary_files(output_dir: Path) -> None:
    """Remove the temporary files that a killed run left half-written (checkpoints and evaluations are written
    to NAME.tmp.PID and then renamed; log.txt is rewritten through log.txt.tmp)."""
    for path in [*output_dir.glob("*.tmp*"), *output_dir.glob("eval/*.tmp*")]:
        pid = path.name.rpartition(".tmp.")[2]
        if pid.isdigit() and int(pid) != os.getpid() and process_is_alive(int(pid)):
            continue  # being written by a live process on this machine
        path.unlink(missing_ok=True)
        print(f"removed {path}, left half-written by a stopped run")


def process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def auto_resume_checkpoint(output_dir: Path) -> str:
    """output_dir/checkpoint.pth if it exists (else ''), after checking it is intact. A damaged one stops the
    run, naming the newest intact copy kept before a learning-rate drop, and overwrites nothing."""
    latest = output_dir / "checkpoint.pth"
    if not latest.exists():
        return ""
    try:
        check_checkpoint_file(latest)
    except CheckpointError as e:
        intact = []
        for copy in sorted(output_dir.glob("checkpoint[0-9]*.pth"), reverse=True):
            try:
                check_checkpoint_file(copy)
                intact.append(copy)
            except CheckpointError:
                continue
        way_out = (f"The newest intact checkpoint of this run is {intact[0]}: resume from it with --resume "
                   f"{intact[0]}, or move {latest} away to start again." if intact else
                   f"No intact copy of an earlier epoch is in {output_dir}: move {latest} away to start again.")
        raise SystemExit(f"--auto_resume: {e}. Nothing was overwritten. {way_out}") from None
    print(f"--auto_resume: resuming from {latest}")
    return str(latest)


def check_args(args) -> None:
    """Refuse flag combinations that would fail later, after time was spent."""
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights trains only the mask head of a box model: it needs --masks")
    if args.frozen_weights is not None and not os.path.isfile(args.frozen_weights):
        raise SystemExit(f"--frozen_weights {args.frozen_weights!r}: no such file")
    if args.resume and not args.resume.startswith(("http://", "https://")) and not os.path.isfile(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such file")
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1")
    try:
        check_learned_queries(args.learned_queries, args.num_queries, args.two_stage)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def main(args):
    check_args(args)
    utils.init_distributed_mode(args)
    print("git:\n  {}\n".format(utils.get_sha()))
    device = choose_device(args.device)
    args.device = str(device)
    print(args)

    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    # The data first: a wrong path or a bad annotation file fails here, before the model is built.
    if args.num_classes is None:
        args.num_classes = datasets.default_num_classes(args)
    if args.dataset_file in ("coco_panoptic", "synthetic_panoptic"):
        args.thing_classes = sorted(k for k, v in datasets.default_is_thing_map(args).items() if v)
    dataset_train = build_dataset(image_set="train", args=args) if not args.eval else None
    dataset_val = build_dataset(image_set="val", args=args)

    model, criterion, postprocessors = build_model(args)
    model.to(device)
    # --- Speed (models/fast.py, engine.py): the fast path unless --exact; --compile. ---
    if not args.exact:
        enable_fast_path(model)
    if args.compile:
        enable_compile(model, device)
    # --- end of speed ---

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[args.gpu] if device.type == "cuda"
                                                          else None)
        model_without_ddp = model.module
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)

    param_dicts = [
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model_without_ddp.named_parameters() if "backbone" in n and p.requires_grad],
         "lr": args.lr_backbone},
    ]
    optimizer = torch.optim.AdamW(param_dicts, lr=args.lr, weight_decay=args.weight_decay,
                                  **adamw_options(device, exact=args.exact))
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)

    if args.distributed:
        sampler_val = DistributedSampler(dataset_val, shuffle=False)
    else:
        sampler_val = SequentialSampler(dataset_val)
    data_loader_val = DataLoader(dataset_val, args.batch_size, sampler=sampler_val, drop_last=False,
                                 collate_fn=utils.collate_fn, num_workers=args.num_workers)
    if dataset_train is not None:
        if args.distributed:
            sampler_train = DistributedSampler(dataset_train, seed=args.seed)
        else:
            sampler_train = RandomSampler(dataset_train)
        batch_sampler_train = BatchSampler(sampler_train, args.batch_size, drop_last=True)
        data_loader_train = DataLoader(dataset_train, batch_sampler=batch_sampler_train,
                                       collate_fn=utils.collate_fn, num_workers=args.num_workers)

    if args.dataset_file in ("coco_panoptic", "synthetic_panoptic"):
        # Box AP of a panoptic model is measured against the instance annotations of the same images.
        instances = datasets.coco if args.dataset_file == "coco_panoptic" else datasets.synthetic
        base_ds = get_coco_api_from_dataset(instances.build("val", args))
    else:
        base_ds = get_coco_api_from_dataset(dataset_val)

    if args.frozen_weights is not None:
        checkpoint = read_checkpoint("--frozen_weights", args.frozen_weights)
        load_state_dict_checked(model_without_ddp.detr, model_state_from(checkpoint, args.frozen_weights),
                                f"--frozen_weights {args.frozen_weights}")

    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(output_dir)
    if not args.resume and args.auto_resume and output_dir is not None:
        args.resume = auto_resume_checkpoint(output_dir)
        if not args.resume and utils.is_main_process():
            # A run killed after logging its first epoch but before saving it starts again from scratch.
            drop_log_lines_from(output_dir / "log.txt", args.start_epoch)
    if args.finetune:
        checkpoint = read_checkpoint("--finetune", args.finetune)
        load_state_dict_for_finetuning(model_without_ddp, model_state_from(checkpoint, args.finetune),
                                       f"--finetune {args.finetune}")
    if args.resume:
        checkpoint = read_checkpoint("--resume", args.resume)
        differences = architecture_differences(checkpoint.get("args") if isinstance(checkpoint, dict) else None,
                                               args)
        if differences:
            # The flags say what to change; the weights that do not fit, if any, are listed after them.
            details = "\n".join(differences)
            try:
                load_state_dict_checked(model_without_ddp, model_state_from(checkpoint, args.resume), "its weights")
            except ValueError as e:
                details += "\n" + str(e)
            raise ValueError(f"--resume {args.resume} was trained with another model configuration:\n{details}\n"
                             "Pass the checkpoint's values of these flags, or use another --output_dir "
                             "(--auto_resume and requeued jobs resume from output_dir/checkpoint.pth).")
        load_state_dict_checked(model_without_ddp, model_state_from(checkpoint, args.resume),
                                f"--resume {args.resume}")
        if not args.eval and "train_model" in checkpoint:
            # Saved with --ema_decay: 'model' is the average, and training continues from the raw weights.
            load_state_dict_checked(model_without_ddp, checkpoint["train_model"], f"--resume {args.resume}")
        if not args.eval and all(k in checkpoint for k in ("optimizer", "lr_scheduler", "epoch")):
            optimizer.load_state_dict(checkpoint["optimizer"])
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
            args.start_epoch = checkpoint["epoch"] + 1
            if "rng" in checkpoint:
                restore_rng_states(checkpoint["rng"])
            if output_dir is not None and utils.is_main_process():
                drop_log_lines_from(output_dir / "log.txt", args.start_epoch)

    ema = None
    if args.ema_decay > 0 and not args.eval:
        ema = ModelEMA(model_without_ddp, args.ema_decay)
        if args.resume and "train_model" in checkpoint:
            load_state_dict_checked(ema.module, checkpoint["model"], f"--resume {args.resume}")
            ema.updates = checkpoint["ema_updates"]
    # What gets evaluated and saved as 'model': the weights' moving average with --ema_decay, else the weights.
    eval_model = ema.module if ema is not None else model
    saved_model = ema.module if ema is not None else model_without_ddp

    if args.eval:
        test_stats, coco_evaluator = evaluate(model, criterion, postprocessors, data_loader_val, base_ds, device,
                                              args.output_dir, amp=args.amp)
        if output_dir is not None:
            utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
        return test_stats

    print("Start training")
    start_time = time.time()
    test_stats = {}
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        train_stats = train_one_epoch(model, criterion, data_loader_train, optimizer, device, epoch,
                                      args.clip_max_norm, amp=args.amp, ema=ema)
        lr_scheduler.step()
        # Evaluation draws from the global generators (the val loader's base seed, the val transforms), and the
        # next epoch starts from where it leaves them, as in the original: the same seed gives the same run.
        test_stats, coco_evaluator = evaluate(eval_model, criterion, postprocessors, data_loader_val, base_ds, device,
                                              args.output_dir, amp=args.amp)

        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()},
                     **{f"test_{k}": v for k, v in test_stats.items()},
                     "epoch": epoch,
                     "n_parameters": n_parameters}

        if output_dir is not None and utils.is_main_process():
            with (output_dir / "log.txt").open("a") as f:
                f.write(json.dumps(log_stats) + "\n")
            if coco_evaluator is not None and "bbox" in coco_evaluator.coco_eval:
                (output_dir / "eval").mkdir(exist_ok=True)
                filenames = ["latest.pth"]
                if epoch % 50 == 0:
                    filenames.append(f"{epoch:03}.pth")
                for name in filenames:
                    utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / name)
            if args.plots:
                from util.visualize import save_training_pictures
                with isolated_rng():  # the original draws no pictures: they must not shift its sequence
                    save_training_pictures(saved_model, postprocessors, dataset_val, output_dir, device)
        # The checkpoint comes after the log line: it marks the epoch as done. A run stopped before it (a
        # preempted job) redoes the epoch when resumed, and drop_log_lines_from removes the line written
        # before the stop, so that log.txt holds each epoch once.
        if output_dir is not None:
            # Where every generator stands now is where the next epoch starts: a run resumed from this
            # checkpoint continues exactly like this one. Every process draws its own augmentations.
            rng_states = utils.all_gather(rng_state())
            checkpoint_paths = [output_dir / "checkpoint.pth"]
            # Keep a copy before each learning-rate drop and every 100 epochs.
            if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % 100 == 0:
                checkpoint_paths.append(output_dir / f"checkpoint{epoch:04}.pth")
            checkpoint = {
                "model": saved_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "epoch": epoch,
                "args": args,
                "rng": rng_states,
            }
            if ema is not None:
                checkpoint.update(train_model=model_without_ddp.state_dict(), ema_updates=ema.updates)
            for checkpoint_path in checkpoint_paths:
                save_checkpoint(checkpoint, checkpoint_path)

    total_time = time.time() - start_time
    print(f"Training time {datetime.timedelta(seconds=int(total_time))}")
    return test_stats



def explain_lost_process(error: BaseException, args) -> str:
    """What to tell a user whose distributed run stopped because another of its processes died."""
    rank, world = getattr(args, "rank", 0), getattr(args, "world_size", 1)
    checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    kept = (f"The last checkpoint, {checkpoint}, is intact: rerun with --auto_resume to continue from it."
            if checkpoint is not None and checkpoint.exists() else "No checkpoint had been written yet.")
    return (f"rank {rank} of {world}: another process of this run was lost ({str(error).splitlines()[0][:300]}). "
            "Its own log (or torchrun's summary, which names the failed rank) says why it stopped. " + kept)


# The errors torch.distributed gives a process whose peer died or stopped answering (gloo and NCCL).
LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
             "NCCL communicator was aborted", "Socket Timeout")


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except RuntimeError as e:
        if not getattr(arguments, "distributed", False) or not any(text in str(e) for text in LOST_PEER):
            raise
        raise SystemExit(explain_lost_process(e, arguments)) from e
