"""Train and evaluate DETR: `python main.py --coco_path /path/to/coco`, or `python main.py --dataset_file synthetic`.

One process by default; `torchrun --nproc_per_node=N main.py ...` for several (see the README). `main()` reads
top to bottom as the run goes: data, model, optimizer, what to start from, then the epoch loop.
"""

import argparse
import inspect
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import datasets
import util.misc as utils
from datasets import build_dataset
from datasets.synthetic import add_synthetic_args
from engine import evaluate, param_groups, per_class_table, train_one_epoch
from models import build_model
from models.fast import adamw_options, enable_fast_path
from models.train_only import add_train_only_args, check_train_only_args, find_train_only_model
from models.two_stage import check_learned_queries
from util.checkpoint import (
    architecture_differences,
    auto_resume_checkpoint,
    LOGGED_STAT,
    drop_log_lines_from,
    improves,
    isolated_rng,
    load_state_dict_checked,
    load_state_dict_for_finetuning,
    logged_stat,
    model_state_from,
    read_checkpoint,
    remove_stale_temporary_files,
    restore_rng_states,
    rng_state,
    save_checkpoint,
)
from util.amp import AMP_CHOICES, automatic_choice_is_reduced, choose_amp_dtype, make_grad_scaler, set_numeric_policy
from util.compile import enable_compile
from util.console import CONSOLE_STYLES, make_console
from util.ema import ModelEMA
from util.misc import SameSizeBatchSampler, choose_device
from util.tensorboard import evaluation_scalars, open_writer, write_scalars


def add_switch(parser: argparse.ArgumentParser, name: str, help_on: str, help_off: str) -> None:
    """--NAME (off unless given) and --no_NAME, which undoes it (and a dataset default that turns it on)."""
    parser.add_argument(f"--{name}", action="store_true", help=help_on)
    parser.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"{help_off} (undoes --{name})")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    parser.add_argument("--lr", default=1e-4, type=float)
    parser.add_argument("--lr_backbone", default=1e-5, type=float, help="learning rate of the backbone; 0 freezes it")
    parser.add_argument("--batch_size", default=2, type=int)
    parser.add_argument("--weight_decay", default=1e-4, type=float)
    parser.add_argument("--epochs", default=300, type=int)
    parser.add_argument("--lr_drop", default=200, type=int)
    parser.add_argument(
        "--lr_schedule",
        default="step",
        choices=("step", "linear", "cosine"),
        help="step: x0.1 after --lr_drop epochs (the original's); linear or cosine: decay every epoch towards 0 at "
        "the end of --epochs (docs/flags.md)",
    )
    parser.add_argument(
        "--time_budget",
        default=0.0,
        type=float,
        help="minutes from the start to fit the run into (0: no limit): the epochs are cut to what "
        "the time per epoch allows, --lr_drop keeping its place (docs/flags.md)",
    )
    parser.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")
    parser.add_argument(
        "--ema_decay",
        default=0.0,
        type=float,
        help="evaluate and save a moving average of the weights with this decay per step (e.g. "
        "0.998); 0 keeps the original's weights (docs/flags.md)",
    )
    add_switch(
        parser,
        "amp",
        "run the forward pass under autocast in the type --amp_dtype picks (losses stay in fp32)",
        "fp32 forward pass",
    )
    parser.add_argument(
        "--amp_dtype",
        default="auto",
        choices=AMP_CHOICES,
        help="with --amp: 'auto' takes what the device computes natively (docs/flags.md)",
    )
    add_switch(
        parser,
        "channels_last",
        "run the ResNet in the channels-last memory layout (same weights and checkpoints)",
        "the ResNet in the default layout",
    )
    # Speed: models/fast.py and engine.enable_compile; measured in docs/performance.md (tools/benchmark.py).
    parser.add_argument(
        "--fast",
        action="store_true",
        help="the fast path: folded batch norms, channels-last, fused attention and AdamW; each "
        "step within float rounding of the original's (docs/flags.md)",
    )
    parser.add_argument(
        "--exact",
        dest="fast",
        action="store_false",
        help="the bit-exact path: the original DETR's numbers to the last bit (undoes --fast)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile (eager mode, with a message, where it fails)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels on a GPU, for reruns equal to the last bit (slower; docs/flags.md)",
    )

    # Model parameters
    parser.add_argument(
        "--frozen_weights",
        type=str,
        default=None,
        help="Path to the pretrained model (or a Hugging Face DETR model folder). If set, only the "
        "mask head will be trained",
    )
    # * Backbone
    parser.add_argument("--backbone", default="resnet50", type=str, help="Name of the convolutional backbone to use")
    parser.add_argument(
        "--feature_stride",
        default=32,
        type=int,
        choices=(8, 16, 32),
        help="stride of the feature map the transformer reads: 32 (layer4) as in the original; 16 "
        "or 8 end the ResNet after layer3 or layer2",
    )
    parser.add_argument(
        "--backbone_width",
        default=1.0,
        type=float,
        help="channels of every ResNet stage, as a fraction of torchvision's (1: the original; 0.5: a quarter "
        "of the convolutions' cost, trained from scratch)",
    )
    parser.add_argument(
        "--dilation",
        action="store_true",
        help="If true, we replace stride with dilation in the last convolutional block (DC5)",
    )
    parser.add_argument(
        "--position_embedding",
        default="sine",
        type=str,
        choices=("sine", "learned", "v2", "v3"),
        help="Type of positional embedding to use on top of the image features",
    )
    parser.add_argument(
        "--backbone_weights",
        default="imagenet",
        type=str,
        help="initial backbone weights: 'imagenet' (torchvision's, from the torch.hub cache or "
        "downloaded), 'none' (from scratch), the path of a ResNet state_dict file or of a DETR checkpoint "
        "(its backbone)",
    )

    parser.add_argument(
        "--backbone_norm",
        default="frozen",
        choices=("frozen", "batch"),
        help="'frozen' batch norm as in the original, or trainable 'batch' norm with every layer "
        "trained (for --backbone_weights none; docs/flags.md)",
    )

    # * Transformer
    parser.add_argument("--enc_layers", default=6, type=int, help="Number of encoding layers in the transformer")
    parser.add_argument("--dec_layers", default=6, type=int, help="Number of decoding layers in the transformer")
    parser.add_argument(
        "--dim_feedforward",
        default=2048,
        type=int,
        help="Intermediate size of the feedforward layers in the transformer blocks",
    )
    parser.add_argument(
        "--hidden_dim", default=256, type=int, help="Size of the embeddings (dimension of the transformer)"
    )
    parser.add_argument("--dropout", default=0.1, type=float, help="Dropout applied in the transformer")
    parser.add_argument(
        "--nheads", default=8, type=int, help="Number of attention heads inside the transformer's attentions"
    )
    parser.add_argument("--num_queries", default=100, type=int, help="Number of query slots")
    add_switch(
        parser,
        "two_stage",
        "queries from the encoder: its best class-and-box proposals (loss terms _enc) seed the decoder (docs/flags.md)",
        "the original's learned queries",
    )
    parser.add_argument(
        "--learned_queries",
        default=0,
        type=int,
        help="with --two_stage: this many queries are learned embeddings, the others proposals (on "
        "panoptic data: the stuff regions' queries)",
    )
    parser.add_argument(
        "--query_nms",
        default=1.0,
        type=float,
        help="with --two_stage, at evaluation (and in training with --proposal_radius): skip proposals that "
        "overlap a better one by more than this IoU (1.0: never)",
    )
    parser.add_argument(
        "--proposal_radius",
        default=0.0,
        type=float,
        help="with --two_stage: the tokens within this many cells of an object's centre (and inside its box) "
        "learn to propose it (0: the nearest only); --query_nms then applies in training too",
    )
    parser.add_argument("--pre_norm", action="store_true")
    parser.add_argument(
        "--num_classes",
        default=None,
        type=int,
        help="size of the class head minus one (max category id + 1); default: the dataset's own "
        "(91 for coco, 250 for coco_panoptic, from the annotations otherwise)",
    )

    # * Segmentation
    parser.add_argument("--masks", action="store_true", help="Train segmentation head if the flag is provided")
    parser.add_argument(
        "--mask_attention_gain",
        default=1.0,
        type=float,
        help="initial gain of the mask head's weights on the attention maps (1: the original's "
        "initialization; docs/flags.md)",
    )
    parser.add_argument(
        "--panoptic_threshold",
        default=0.85,
        type=float,
        help="the panoptic post-processor keeps the queries whose best class scores above this",
    )

    # Loss
    parser.add_argument(
        "--no_aux_loss",
        dest="aux_loss",
        action="store_false",
        help="Disables auxiliary decoding losses (loss at each layer)",
    )
    # * Matcher
    parser.add_argument("--set_cost_class", default=1, type=float, help="Class coefficient in the matching cost")
    parser.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    parser.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    # * Loss coefficients
    parser.add_argument("--mask_loss_coef", default=1, type=float)
    parser.add_argument("--dice_loss_coef", default=1, type=float)
    parser.add_argument("--bbox_loss_coef", default=5, type=float)
    parser.add_argument("--giou_loss_coef", default=2, type=float)
    parser.add_argument(
        "--eos_coef", default=0.1, type=float, help="Relative classification weight of the no-object class"
    )

    # dataset parameters
    parser.add_argument(
        "--dataset_file",
        default="coco",
        help="coco, coco_panoptic, synthetic (generated here, no download) or synthetic_panoptic",
    )
    parser.add_argument("--coco_path", type=str)
    parser.add_argument("--coco_panoptic_path", type=str)
    parser.add_argument("--remove_difficult", action="store_true")

    parser.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    parser.add_argument(
        "--device", default="cuda", help="device to use for training / testing (falls back to cpu when CUDA is absent)"
    )
    parser.add_argument("--seed", default=42, type=int)
    parser.add_argument(
        "--resume",
        default="",
        help="resume from checkpoint (a path or an https URL, or a Hugging Face DETR model folder: "
        "config.json + model.safetensors)",
    )
    parser.add_argument(
        "--auto_resume",
        action="store_true",
        help="without --resume, resume from output_dir/checkpoint.pth if it exists (requeued jobs)",
    )
    parser.add_argument(
        "--finetune",
        default="",
        help="start from this checkpoint's weights (path, URL or Hugging Face folder), not its "
        "optimizer or epoch; weights of other shapes (another --num_classes) are re-initialized, and named",
    )
    parser.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--num_workers", default=2, type=int)

    # distributed training parameters
    parser.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    parser.add_argument("--dist_url", default="env://", help="url used to set up distributed training")
    # python -m torch.distributed.launch without --use_env passes --local-rank=N (--local_rank before torch 2.0).
    # The ranks are read from LOCAL_RANK, RANK and WORLD_SIZE, which the launcher sets either way.
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        default=None,
        type=int,
        help="accepted from torch.distributed.launch and ignored: the rank comes from LOCAL_RANK",
    )
    parser.add_argument(
        "--dist_timeout",
        default=1800,
        type=int,
        help="seconds to wait for the other processes (rendezvous, collectives) before failing",
    )
    parser.add_argument(
        "--no_plots",
        dest="plots",
        action="store_false",
        help="do not write predictions.png, curves.png and per_class.png to output_dir after each epoch",
    )
    parser.add_argument(
        "--no_tensorboard",
        dest="tensorboard",
        action="store_false",
        help="do not write TensorBoard event files to output_dir/tensorboard/ (written by default: "
        "the training losses and lr at every printed step, each epoch's test losses, COCO "
        "stats and PQ)",
    )
    parser.add_argument(
        "--console",
        default="short",
        choices=CONSOLE_STYLES,
        help="short: a banner, one short line per printed step and a summary at the end; original: the original's "
        "namespace and every meter (log.txt and TensorBoard get every meter either way)",
    )
    parser.add_argument(
        "--best_metric",
        default="auto",
        help="log.txt stat whose best epoch checkpoint_best.pth keeps (KEY, KEY[I], KEY.FIELD); "
        "auto: box AP, or PQ for panoptic models",
    )
    parser.add_argument(
        "--eval_batching",
        default="padded",
        choices=("padded", "size"),
        help="padded: the original's padded batches (AP depends on the batch size); size: only "
        "images of one size per batch, the AP of batch size 1 at any --batch_size",
    )
    add_train_only_args(parser)
    add_synthetic_args(parser)
    return parser


def dataset_recipe(dataset_file: str, masks: bool, two_stage: bool, device: str) -> Dict[str, Any]:
    """The flag defaults --dataset_file brings (datasets.recipe), sized by what --amp computes in on `device`."""
    # The device is asked only for a dataset with a recipe: a COCO run starts no CUDA while parsing its flags.
    reduced = automatic_choice_is_reduced(device) if datasets.has_recipe(dataset_file) else True
    return datasets.recipe(dataset_file, masks, two_stage, reduced)


def set_dataset_defaults(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Make the recipe of the dataset named in argv (datasets.recipe: the synthetic datasets bring one) the
    parser's defaults, so that every flag given in argv still wins, abbreviated or not, and --help shows the
    defaults in effect. argv is read first without --help to find --dataset_file, --masks, --two_stage and
    --device (the recipe depends on them, and may itself turn --two_stage on)."""
    probe = [a for a in argv if a not in ("-h", "--help")]
    originals = {}
    for _ in range(2):
        known, _ = parser.parse_known_args(probe)
        defaults = dataset_recipe(known.dataset_file, known.masks, known.two_stage, known.device)
        parser.set_defaults(**originals)  # undo the first round's, then apply this round's
        originals = {name: parser.get_default(name) for name in defaults}
        parser.set_defaults(**defaults)
    if defaults:
        listing = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in defaults.items())
        parser.epilog = (
            f"--dataset_file {known.dataset_file} sets these defaults (shown above; flags given win): {listing}"
        )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """main.py's flags, with the defaults of the dataset they name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        "DETR training and evaluation script",
        parents=[get_args_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="--dataset_file synthetic and synthetic_panoptic bring defaults of their "
        "own (a CPU recipe, datasets/synthetic.py): add --help after it to see "
        "them; a run prints them and writes them to output_dir/recipe.json. "
        "Flags given explicitly win.",
    )
    set_dataset_defaults(parser, argv)
    return parser.parse_args(argv)


def show_recipe(args, printed: bool = True) -> Optional[Dict[str, Any]]:
    """Print on one line the flags the dataset's recipe sets, with the values this run uses (and the recipe's
    where a flag given replaced it), so that what a demo runs is seen without reading code; returns the same as
    written to output_dir/recipe.json, None for a dataset without a recipe (COCO)."""
    recipe = dataset_recipe(args.dataset_file, args.masks, args.two_stage, args.device)
    if not recipe:
        return None
    source = datasets.dataset_file(args.dataset_file).recipe.__module__.replace(".", "/") + ".py"
    used = {name: getattr(args, name) for name in recipe}
    replaced = {name: value for name, value in recipe.items() if used[name] != value}
    listing = " ".join(
        f"{name}={value}" + (f" (recipe {replaced[name]})" if name in replaced else "") for name, value in used.items()
    )
    if printed:
        print(f"Recipe of --dataset_file {args.dataset_file} ({source}; flags given win): {listing}")
    return {
        "dataset_file": args.dataset_file,
        "defined_in": source,
        "flags": used,
        "recipe_values_replaced_by_flags_given": replaced,
    }


def check_args(args) -> None:
    """Refuse flag combinations that would fail later, after time was spent."""
    if args.frozen_weights is not None and not args.masks:
        raise SystemExit("--frozen_weights trains only the mask head of a box model: it needs --masks")
    # A folder is a Hugging Face model folder (util/hf.py); what it lacks is reported when it is read.
    if args.frozen_weights is not None and not os.path.exists(args.frozen_weights):
        raise SystemExit(f"--frozen_weights {args.frozen_weights!r}: no such file")
    if args.resume and not args.resume.startswith(("http://", "https://")) and not os.path.exists(args.resume):
        raise SystemExit(f"--resume {args.resume!r}: no such file")
    if args.batch_size < 1:
        raise SystemExit("--batch_size must be at least 1")
    if args.best_metric != "auto" and LOGGED_STAT.fullmatch(args.best_metric) is None:
        raise SystemExit(
            f"--best_metric {args.best_metric!r}: expected 'auto' or a stat of log.txt as KEY, "
            "KEY[INDEX] or KEY.FIELD, e.g. test_coco_eval_bbox[0] or test_PQ_all.pq"
        )
    try:
        check_learned_queries(args.learned_queries, args.num_queries, args.two_stage)
        check_train_only_args(args)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_datasets(args):
    """(train dataset or None with --eval, val dataset, the COCO ground truth of the val images). The data comes
    first: a wrong path or a bad annotation file fails here, before the model is built."""
    args.num_classes = datasets.num_classes(args)
    thing_classes = datasets.thing_classes(args)
    if thing_classes is not None:  # panoptic data: what build_model's panoptic post-processor needs
        args.thing_classes = thing_classes
    dataset_train = build_dataset(image_set="train", args=args) if not args.eval else None
    dataset_val = build_dataset(image_set="val", args=args)
    return dataset_train, dataset_val, datasets.box_ground_truth(dataset_val, args)


def prepare_model(model: torch.nn.Module, args, device: torch.device):
    """(the model to run, the model itself): on `device`, on the fast path with --fast, compiled with
    --compile, wrapped in DistributedDataParallel when distributed (its batch norms synchronized on CUDA)."""
    model.to(device)
    if args.distributed:
        model = synchronize_batch_norms(model, device)
    if args.fast:
        enable_fast_path(model)
    if args.compile:
        enable_compile(model, device)
    if not args.distributed:
        return model, model
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.gpu] if device.type == "cuda" else None, **buffer_broadcast(model)
    )
    return ddp, model


def synchronize_batch_norms(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` for a distributed run: on CUDA its trainable batch norms (--backbone_norm batch) become SyncBatchNorm,
    which normalizes by the statistics of the whole global batch, as one GPU given that batch would. On the CPU they
    stay: SyncBatchNorm runs on GPUs only (gloo has no kernel for it), so each process normalizes by its own share.
    Frozen batch norms hold fixed statistics and stay as they are."""
    trainable = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not trainable:
        return model
    if device.type != "cuda":
        print(f"{trainable} trainable batch norms: each process normalizes by its own batch (no SyncBatchNorm on CPUs)")
        return model
    print(f"{trainable} trainable batch norms synchronized across the processes (SyncBatchNorm)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def buffer_broadcast(model: torch.nn.Module) -> Dict[str, bool]:
    """DistributedDataParallel's option that copies rank 0's buffers to every process before each forward: on only
    for trainable batch norms, whose running statistics each process would otherwise update from its own share of
    the batch (SyncBatchNorm's agree already; the copy, some kB, keeps them equal to the bit). Without them the
    model's buffers are those of frozen batch norms: constants that every process builds or loads alike, which the
    copy would write over themselves at every step."""
    trainable = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # torch 2.13 renamed the option (the old name warns there); the new one still syncs buffers once, at the start.
    ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers": trainable}


def build_optimizer(model: torch.nn.Module, args, device: torch.device):
    """AdamW with the backbone at its own learning rate, and the --lr_schedule: the step schedule (x0.1 after
    --lr_drop epochs) or a decay over --epochs (util.misc.EpochDecay)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr_backbone),
        lr=args.lr,
        weight_decay=args.weight_decay,
        **adamw_options(device, exact=not args.fast),
    )
    if getattr(args, "lr_schedule", "step") != "step":
        return optimizer, utils.EpochDecay(optimizer, args.lr_schedule, args.epochs)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def build_loaders(dataset_train, dataset_val, args):
    """(train loader or None, its sampler, val loader): shuffled (per process when distributed) and in order.
    On a GPU the batches come in page-locked memory, so that their copies to it overlap with its work."""
    pin_memory = str(args.device).startswith("cuda") and torch.cuda.is_available()

    def loader(dataset, batch_sampler) -> DataLoader:
        if args.num_workers == 0:
            return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=utils.collate_fn, pin_memory=pin_memory)
        # Workers started once for the run instead of again every epoch, and reseeded every epoch as new ones would
        # be seeded (utils.EpochSeededBatches); the loader's own base seed comes from a generator of its own, so that
        # torch's global generator sees the draws of workers started every epoch.
        return DataLoader(
            utils.EpochSeededDataset(dataset),
            batch_sampler=utils.EpochSeededBatches(batch_sampler),
            collate_fn=utils.collate_fn,
            num_workers=args.num_workers,
            pin_memory=pin_memory,
            persistent_workers=True,
            generator=torch.Generator(),
        )

    if getattr(args, "eval_batching", "padded") == "size":
        try:
            sizes = datasets.transformed_image_sizes(dataset_val)
        except ValueError as e:
            raise SystemExit(
                f"--eval_batching size: cannot tell the val images' sizes ({e}); use --eval_batching padded"
            ) from None
        batch_sampler_val = SameSizeBatchSampler(sizes, args.batch_size, utils.get_world_size(), utils.get_rank())
    else:
        sampler_val = (
            DistributedSampler(dataset_val, shuffle=False) if args.distributed else SequentialSampler(dataset_val)
        )
        batch_sampler_val = BatchSampler(sampler_val, args.batch_size, drop_last=False)
    data_loader_val = loader(dataset_val, batch_sampler_val)
    if dataset_train is None:
        return None, None, data_loader_val
    sampler_train = (
        DistributedSampler(dataset_train, seed=args.seed) if args.distributed else RandomSampler(dataset_train)
    )
    data_loader_train = loader(dataset_train, BatchSampler(sampler_train, args.batch_size, drop_last=True))
    return data_loader_train, sampler_train, data_loader_val


def prepare_output_dir(args) -> Optional[Path]:
    """output_dir, created and cleared of what a killed run left half-written; with --auto_resume, its
    checkpoint.pth becomes --resume (checked first)."""
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is None:
        return None
    if utils.is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporary_files(output_dir)
    if not args.resume and args.auto_resume:
        args.resume = auto_resume_checkpoint(output_dir)
        if not args.resume and utils.is_main_process():
            # A run killed after logging its first epoch but before saving it starts again from scratch.
            drop_log_lines_from(output_dir / "log.txt", args.start_epoch)
    return output_dir


def load_starting_weights(model, args) -> Optional[dict]:
    """Load --frozen_weights (the box model under the mask head), --finetune and --resume into `model`;
    returns the --resume checkpoint (None without it)."""
    if args.frozen_weights is not None:
        frozen = read_checkpoint("--frozen_weights", args.frozen_weights)
        load_state_dict_checked(
            model.detr, model_state_from(frozen, args.frozen_weights), f"--frozen_weights {args.frozen_weights}"
        )
    if args.finetune:
        start = read_checkpoint("--finetune", args.finetune)
        load_state_dict_for_finetuning(model, model_state_from(start, args.finetune), f"--finetune {args.finetune}")
    if not args.resume:
        return None
    resumed = read_checkpoint("--resume", args.resume)
    differences = architecture_differences(resumed.get("args") if isinstance(resumed, dict) else None, args)
    if differences:
        # The flags say what to change; the weights that do not fit, if any, are listed after them.
        details = "\n".join(differences)
        try:
            load_state_dict_checked(model, model_state_from(resumed, args.resume), "its weights")
        except ValueError as e:
            details += "\n" + str(e)
        raise ValueError(
            f"--resume {args.resume} was trained with another model configuration:\n{details}\n"
            "Pass the checkpoint's values of these flags, or use another --output_dir "
            "(--auto_resume and requeued jobs resume from output_dir/checkpoint.pth)."
        )
    load_state_dict_checked(model, model_state_from(resumed, args.resume), f"--resume {args.resume}")
    if not args.eval and "train_model" in resumed:
        # Saved with --ema_decay: 'model' is the average, and training continues from the raw weights.
        load_state_dict_checked(model, resumed["train_model"], f"--resume {args.resume}")
    train_only = find_train_only_model(model)
    if not args.eval and train_only is not None and "model_train_only" in resumed:
        # The training-only weights (models/train_only.py), saved beside DETR's: the run continues exactly.
        load_state_dict_checked(train_only.train_only, resumed["model_train_only"], f"--resume {args.resume}")
    return resumed


def choose_precision(args, device: torch.device):
    """(the autocast type of the forward pass, None for fp32; the float16 loss scaler or None), from --amp and
    --amp_dtype, with a line saying what was chosen and why."""
    if not args.amp:
        return None, None
    try:
        dtype, why = choose_amp_dtype(device, args.amp_dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(why)
    return dtype, make_grad_scaler(device, dtype)


def fit_schedule_to_budget(
    args, lr_scheduler, epoch: int, spent_s: float, planned: Tuple[int, int], setup_s: float = 0.0
) -> None:
    """--time_budget: after `epoch`, with `spent_s` seconds spent on epochs 0..epoch and `setup_s` spent by this
    process before its first epoch (generating the synthetic data, building the model), set args.epochs to the
    epochs that fit the rest of the budget at the time per epoch measured so far (never below the epochs done,
    never above the `planned` (epochs, lr_drop) given), and, while the learning-rate drop is still to come, keep it
    at its fraction of the planned run. Measured again after every epoch, so a first epoch slowed by warming up
    costs nothing."""
    planned_epochs, planned_drop = planned
    per_epoch = spent_s / (epoch + 1)
    fit = int(max(args.time_budget * 60 - setup_s, 0.0) // per_epoch)
    if isinstance(lr_scheduler, utils.EpochDecay):  # the decay stretches over the epochs that fit
        epochs = max(epoch + 1, min(planned_epochs, fit))
        if epochs == args.epochs:
            return
        args.epochs = epochs
        lr_scheduler.set_total_epochs(epochs)
        print(f"{budget_line(args, setup_s, per_epoch, epochs, planned_epochs)}, the learning rate decaying over them")
        return
    drop_ahead = epoch + 1 < args.lr_drop
    # Once the drop has passed, the run may only shrink: its remaining epochs are all after the drop.
    epochs = max(epoch + 1, min(planned_epochs if drop_ahead else args.epochs, fit))
    lr_drop = args.lr_drop
    if drop_ahead and planned_drop < planned_epochs:
        lr_drop = max(epoch + 2, round(planned_drop * epochs / planned_epochs))
        if lr_drop >= epochs:  # no room for it inside the run
            lr_drop = args.lr_drop
    if (epochs, lr_drop) == (args.epochs, args.lr_drop):
        return
    message = budget_line(args, setup_s, per_epoch, epochs, planned_epochs)
    if lr_drop != args.lr_drop:
        message += f", the learning rate dropping after {lr_drop}"
    args.epochs, args.lr_drop = epochs, lr_drop
    lr_scheduler.step_size = lr_drop
    print(message)


def budget_line(args, setup_s: float, per_epoch: float, epochs: int, planned_epochs: int) -> str:
    """'--time_budget 12.5 min: 45 s before training, 60 s per epoch, so 11 of 15 epochs' (the setup only when
    there was one to count)."""
    before = f"{setup_s:.0f} s before training, " if setup_s >= 0.5 else ""
    return (
        f"--time_budget {args.time_budget:g} min: {before}{per_epoch:.0f} s per epoch, so {epochs} of "
        f"{planned_epochs} epochs"
    )


def resume_training_state(resumed: Optional[dict], optimizer, lr_scheduler, args, output_dir, scaler=None) -> None:
    """Continue a --resume checkpoint's optimizer, schedule, epoch, random generators and float16 loss scale
    (not with --eval); with --time_budget, also the schedule it fitted and the time it spent."""
    if resumed is None or args.eval or not all(k in resumed for k in ("optimizer", "lr_scheduler", "epoch")):
        return
    optimizer.load_state_dict(resumed["optimizer"])
    lr_scheduler.load_state_dict(resumed["lr_scheduler"])
    if args.time_budget > 0:  # the schedule where the budget moved it, and the time spent so far
        if isinstance(lr_scheduler, utils.EpochDecay):
            args.epochs = lr_scheduler.total_epochs
        else:
            args.lr_drop = lr_scheduler.step_size
        args.time_spent_s = float(resumed.get("time_spent_s", 0.0))
    if scaler is not None and "scaler" in resumed:
        scaler.load_state_dict(resumed["scaler"])
    args.start_epoch = resumed["epoch"] + 1
    if "rng" in resumed:
        restore_rng_states(resumed["rng"])
    if output_dir is not None and utils.is_main_process():
        drop_log_lines_from(output_dir / "log.txt", args.start_epoch)


def build_ema(model, resumed: Optional[dict], args) -> Optional[ModelEMA]:
    """The weights' moving average with --ema_decay (continued from a --resume checkpoint), else None."""
    if args.ema_decay <= 0 or args.eval:
        return None
    ema = ModelEMA(model, args.ema_decay)
    if resumed is not None and "train_model" in resumed:
        load_state_dict_checked(ema.module, resumed["model"], f"--resume {args.resume}")
        ema.updates = resumed["ema_updates"]
    return ema


def resolve_best_metric(args, postprocessors) -> None:
    """--best_metric auto: box AP, or PQ for a panoptic model."""
    if args.best_metric == "auto":
        args.best_metric = "test_PQ_all.pq" if "panoptic" in postprocessors else "test_coco_eval_bbox[0]"


def best_so_far(resumed: Optional[dict], args, output_dir: Optional[Path]) -> Optional[dict]:
    """The best epoch of the run a --resume checkpoint continues ({'metric', 'value', 'epoch'}, as the checkpoint
    records it), or None (a new run, --eval, or another --best_metric). checkpoint_best.pth is written after
    checkpoint.pth: a run stopped between the two, its last epoch the best, gets it written now."""
    best = resumed.get("best") if resumed is not None and not args.eval else None
    if not best or best.get("metric") != args.best_metric:
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


def end_of_epoch(
    epoch: int,
    train_stats,
    test_stats,
    coco_evaluator,
    n_parameters: int,
    args,
    output_dir: Path,
    saved_model,
    postprocessors,
    dataset_val,
    device,
    training_state: dict,
    best: Optional[dict] = None,
) -> Optional[dict]:
    """Write the epoch's line of log.txt, its evaluation and pictures, then the checkpoint, and
    checkpoint_best.pth when the epoch beats `best` at --best_metric; returns the best epoch's record. The
    checkpoint comes last: it marks the epoch as done. A run stopped before it (a preempted job) redoes the epoch
    when resumed, and drop_log_lines_from removes the line written before the stop, so that log.txt holds each
    epoch once."""
    improved = False
    if utils.is_main_process():
        log_stats = {
            **{f"train_{k}": v for k, v in train_stats.items()},
            **{f"test_{k}": v for k, v in test_stats.items()},
            "epoch": epoch,
            "n_parameters": n_parameters,
        }
        with (output_dir / "log.txt").open("a") as f:
            f.write(json.dumps(log_stats) + "\n")
        try:
            value = logged_stat(log_stats, args.best_metric)
        except ValueError as e:
            raise SystemExit(f"--best_metric {args.best_metric}: {e}") from None
        if improves(value, best, args.best_metric):
            best, improved = {"metric": args.best_metric, "value": value, "epoch": epoch}, True
        if coco_evaluator is not None and "bbox" in coco_evaluator.coco_eval:
            (output_dir / "eval").mkdir(exist_ok=True)
            names = ["latest.pth"] + ([f"{epoch:03}.pth"] if epoch % 50 == 0 else [])
            for name in names:
                utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval" / name)
        if getattr(coco_evaluator, "per_class", None):
            write_per_class(coco_evaluator.per_class, epoch, output_dir)
        if args.plots:
            from util.visualize import save_training_pictures

            with isolated_rng():  # the original draws no pictures: they must not shift its sequence
                save_training_pictures(saved_model, postprocessors, dataset_val, output_dir, device)
    # Where every generator stands now is where the next epoch starts: a run resumed from this checkpoint
    # continues exactly like this one. Every process draws its own augmentations.
    checkpoint = {**training_state, "epoch": epoch, "args": args, "rng": utils.all_gather(rng_state()), "best": best}
    paths = [output_dir / "checkpoint.pth"]
    # Keep a copy before each learning-rate drop and every 100 epochs.
    drops = getattr(args, "lr_schedule", "step") == "step" and (epoch + 1) % args.lr_drop == 0
    if drops or (epoch + 1) % 100 == 0:
        paths.append(output_dir / f"checkpoint{epoch:04}.pth")
    # After checkpoint.pth, which records the best epoch: a run stopped in between writes it when resumed.
    if improved:
        paths.append(output_dir / "checkpoint_best.pth")
    for path in paths:
        save_checkpoint(checkpoint, path)
    if improved:
        print(f"Epoch {epoch}: {best['metric']} {best['value']:.4f}, the best so far: saved {paths[-1]}")
    return best


def main(args):
    run_start = time.time()  # --time_budget counts what the run spends before its first epoch too
    check_args(args)
    planned = (args.epochs, args.lr_drop)  # what --time_budget fits, before a resumed checkpoint's cut
    numeric_policy = set_numeric_policy(args.fast, args.deterministic)  # before any GPU work, cuBLAS's included
    utils.init_distributed_mode(args)
    print("git:\n  {}\n".format(utils.get_sha()))
    device = choose_device(args.device)
    args.device = str(device)
    if device.type == "cuda":
        print(numeric_policy)
    console = make_console(args, get_args_parser())  # what the run prints as it goes: util/console.py
    console.show_args(args)
    recipe = show_recipe(args, printed=not console.short)  # the short console's banner lists what differs
    seed_everything(args.seed + utils.get_rank())
    amp_dtype, scaler = choose_precision(args, device)

    dataset_train, dataset_val, base_ds = build_datasets(args)
    model, criterion, postprocessors = build_model(args)
    resolve_best_metric(args, postprocessors)
    model, model_without_ddp = prepare_model(model, args, device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    optimizer, lr_scheduler = build_optimizer(model_without_ddp, args, device)
    data_loader_train, sampler_train, data_loader_val = build_loaders(dataset_train, dataset_val, args)

    output_dir = prepare_output_dir(args)
    resumed = load_starting_weights(model_without_ddp, args)
    resume_training_state(resumed, optimizer, lr_scheduler, args, output_dir, scaler)
    if recipe is not None and output_dir is not None and utils.is_main_process():
        # Written once the run has checked its inputs: a command that fails leaves the output folder as it was.
        (output_dir / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    best = best_so_far(resumed, args, output_dir)
    ema = build_ema(model_without_ddp, resumed, args)
    # What gets evaluated and saved as 'model': the weights' moving average with --ema_decay, else the weights.
    eval_model = ema.module if ema is not None else model
    saved_model = ema.module if ema is not None else model_without_ddp
    train_only = find_train_only_model(model_without_ddp)

    if args.eval:
        test_stats, coco_evaluator = evaluate(
            model, criterion, postprocessors, data_loader_val, base_ds, device, args.output_dir, amp_dtype, console
        )
        if output_dir is not None:
            utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
            if utils.is_main_process():
                path = write_per_class(coco_evaluator.per_class, resumed.get("epoch") if resumed else None, output_dir)
                if args.plots:
                    from util.visualize import save_per_class_picture

                    save_per_class_picture(path, output_dir / "per_class.png")
        print(per_class_table(coco_evaluator.per_class))
        return test_stats

    console.start_training(args, recipe, n_parameters, data_loader_train, data_loader_val)
    start_time = time.time()
    # Data generation, model building, loading a checkpoint: the slowest process's, so that all cut the run alike.
    setup_s = max(utils.all_gather(start_time - run_start)) if args.time_budget > 0 else 0.0
    spent_before = getattr(args, "time_spent_s", 0.0)  # by the epochs before a --resume
    if args.time_budget > 0 and args.start_epoch > 0 and spent_before > 0:
        # A resumed run fits what is left of the budget before it trains.
        fit_schedule_to_budget(args, lr_scheduler, args.start_epoch - 1, spent_before, planned, setup_s)
    # TensorBoard's axis is the training step; the run starts where its checkpoint ends, and what a stopped run
    # wrote beyond that is purged.
    steps_per_epoch = len(data_loader_train)
    writer = None
    if output_dir is not None and args.tensorboard and utils.is_main_process():
        writer = open_writer(output_dir / "tensorboard", purge_step=args.start_epoch * steps_per_epoch)
    test_stats, coco_evaluator = {}, None
    for epoch in range(args.start_epoch, args.epochs):
        if args.distributed:
            sampler_train.set_epoch(epoch)
        first_step = epoch * steps_per_epoch
        log_step = (
            None
            if writer is None
            else (
                lambda i, values, first=first_step: write_scalars(
                    writer, {f"train/{k}": v for k, v in values.items()}, first + i
                )
            )
        )
        if hasattr(criterion, "set_epoch"):  # a training-only loss that fades (--train_only_epochs)
            criterion.set_epoch(epoch)
        train_stats = train_one_epoch(
            model,
            criterion,
            data_loader_train,
            optimizer,
            device,
            epoch,
            args.clip_max_norm,
            amp=amp_dtype,
            ema=ema,
            scaler=scaler,
            log_step=log_step,
            console=console,
        )
        lr_scheduler.step()
        # Evaluation draws from the global generators (the val loader's base seed, the val transforms), and the
        # next epoch starts from where it leaves them, as in the original: the same seed gives the same run.
        test_stats, coco_evaluator = evaluate(
            eval_model, criterion, postprocessors, data_loader_val, base_ds, device, args.output_dir, amp_dtype, console
        )
        if writer is not None:
            # At the epoch's last step; on disk before the checkpoint marks the epoch as done.
            write_scalars(writer, evaluation_scalars(test_stats), first_step + steps_per_epoch - 1)
            writer.flush()
        spent = spent_before + time.time() - start_time
        if args.time_budget > 0:
            # Every process takes the slowest one's time, so that all of them cut the run alike.
            fit_schedule_to_budget(args, lr_scheduler, epoch, max(utils.all_gather(spent)), planned, setup_s)
        if output_dir is not None:
            training_state = {
                "model": saved_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "time_spent_s": spent,
            }
            if scaler is not None:
                training_state["scaler"] = scaler.state_dict()
            if ema is not None:
                training_state.update(train_model=model_without_ddp.state_dict(), ema_updates=ema.updates)
            if train_only is not None:  # beside 'model', which holds exactly DETR's keys
                training_state["model_train_only"] = train_only.train_only_state_dict()
            best = end_of_epoch(
                epoch,
                train_stats,
                test_stats,
                coco_evaluator,
                n_parameters,
                args,
                output_dir,
                saved_model,
                postprocessors,
                dataset_val,
                device,
                training_state,
                best,
            )
        if epoch + 1 >= args.epochs:  # --time_budget may have shortened the run
            break

    if writer is not None:
        writer.close()
    if coco_evaluator is not None:
        print("Per class, last epoch:\n" + per_class_table(coco_evaluator.per_class))
    console.summary(args, test_stats, best, output_dir, time.time() - start_time)
    return test_stats


def explain_lost_process(error: BaseException, args) -> str:
    """What to tell a user whose distributed run stopped because another of its processes died."""
    rank, world = getattr(args, "rank", 0), getattr(args, "world_size", 1)
    checkpoint = Path(args.output_dir) / "checkpoint.pth" if args.output_dir else None
    kept = (
        f"The last checkpoint, {checkpoint}, is intact: rerun with --auto_resume to continue from it."
        if checkpoint is not None and checkpoint.exists()
        else "No checkpoint had been written yet."
    )
    return (
        f"rank {rank} of {world}: another process of this run was lost ({str(error).splitlines()[0][:300]}). "
        "Its own log (or torchrun's summary, which names the failed rank) says why it stopped. " + kept
    )


# The errors torch.distributed gives a process whose peer died or stopped answering (gloo and NCCL).
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "timed out",
    "Timed out",
    "NCCL communicator was aborted",
    "Socket Timeout",
)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except RuntimeError as e:
        # Only once the processes had met: a rendezvous that fails says what to check itself.
        joined = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not joined or not any(text in str(e) for text in LOST_PEER):
            raise
        raise SystemExit(explain_lost_process(e, arguments)) from e
