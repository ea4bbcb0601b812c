"""Train and evaluate DETR: `python main.py --coco_path /path/to/coco`, or `python main.py --dataset_file synthetic`.

One process by default; `torchrun --nproc_per_node=N main.py ...` for several (see the README). `main()` reads
top to bottom as the run goes: data, model, optimizer, what to start from, then the epoch loop.
"""

import argparse
import functools
import json
import os
import random
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

import datasets
import util.misc as utils
from datasets import build_dataset, parse_args_with_recipe, show_recipe
from datasets.loaders import build_loaders
from datasets.synthetic import add_synthetic_args
from engine import evaluate, param_groups, per_class_table, train_one_epoch
from models import build_model
from models.fast import adamw_options, enable_fast_path
from models.train_only import add_train_only_args, check_train_only_args, find_train_only_model
from models.two_stage import add_two_stage_args, check_learned_queries
from util.amp import add_speed_args, choose_precision, set_numeric_policy
from util.checkpoint import LOGGED_STAT
from util.distributed import add_distributed_args, distributed_data_parallel, synchronize_batch_norms
from util.ema import add_ema_args, build_ema
from util.flags import network_flags
from util.epoch_outputs import (
    add_run_management_args,
    best_so_far,
    chosen_best_metric,
    end_of_epoch,
    training_state,
    write_per_class,
)
from util.lost_process import explain_lost_process, lost_a_peer
from util.compile import enable_compile
from util.console import make_console
from util.misc import choose_device
from util.resume import load_starting_weights, prepare_output_dir, resume_training_state
from util.tensorboard import evaluation_scalars, open_writer, write_scalars, write_training_scalars
from util.time_budget import TimeBudget, add_schedule_args
from util.visualize import save_per_class_picture, save_training_pictures


def get_args_parser() -> argparse.ArgumentParser:
    """main.py's flags: the original DETR's groups, then one group per extension (each defined beside its code)."""
    parser = argparse.ArgumentParser("Set transformer detector", add_help=False)
    training = parser.add_argument_group("Training")
    training.add_argument("--lr", default=1e-4, type=float)
    training.add_argument("--lr_backbone", default=1e-5, type=float, help="learning rate of the backbone; 0 freezes it")
    training.add_argument("--batch_size", default=2, type=int)
    training.add_argument("--weight_decay", default=1e-4, type=float)
    training.add_argument("--epochs", default=300, type=int)
    training.add_argument("--lr_drop", default=200, type=int)
    training.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm")

    model = parser.add_argument_group("Model parameters")
    model.add_argument(
        "--frozen_weights",
        type=str,
        default=None,
        help="Path to the pretrained model (or a Hugging Face DETR model folder). If set, only the "
        "mask head will be trained",
    )
    backbone = parser.add_argument_group("Backbone")
    network = network_flags(backbone)  # its flags that define the network
    network("--backbone", default="resnet50", type=str, help="Name of the convolutional backbone to use")
    network(
        "--feature_stride",
        default=32,
        type=int,
        choices=(8, 16, 32),
        help="stride of the feature map the transformer reads: 32 (layer4) as in the original; 16 "
        "or 8 end the ResNet after layer3 or layer2",
    )
    network(
        "--backbone_width",
        default=1.0,
        type=float,
        help="channels of every ResNet stage, as a fraction of torchvision's (1: the original; 0.5: a quarter "
        "of the convolutions' cost, trained from scratch)",
    )
    network(
        "--dilation",
        action="store_true",
        help="If true, we replace stride with dilation in the last convolutional block (DC5)",
    )
    network(
        "--position_embedding",
        default="sine",
        type=str,
        choices=("sine", "learned", "v2", "v3"),
        help="Type of positional embedding to use on top of the image features",
    )
    backbone.add_argument(
        "--backbone_weights",
        default="imagenet",
        type=str,
        help="initial backbone weights: 'imagenet' (torchvision's, from the torch.hub cache or "
        "downloaded), 'none' (from scratch), the path of a ResNet state_dict file or of a DETR checkpoint "
        "(its backbone)",
    )
    network(
        "--backbone_norm",
        default="frozen",
        choices=("frozen", "batch"),
        help="'frozen' batch norm as in the original, or trainable 'batch' norm with every layer "
        "trained (for --backbone_weights none; docs/flags.md)",
    )
    transformer = parser.add_argument_group("Transformer")
    network = network_flags(transformer)  # its flags that define the network
    network("--enc_layers", default=6, type=int, help="Number of encoding layers in the transformer")
    network("--dec_layers", default=6, type=int, help="Number of decoding layers in the transformer")
    network(
        "--dim_feedforward",
        default=2048,
        type=int,
        help="Intermediate size of the feedforward layers in the transformer blocks",
    )
    network("--hidden_dim", default=256, type=int, help="Size of the embeddings (dimension of the transformer)")
    transformer.add_argument("--dropout", default=0.1, type=float, help="Dropout applied in the transformer")
    network("--nheads", default=8, type=int, help="Number of attention heads inside the transformer's attentions")
    network("--num_queries", default=100, type=int, help="Number of query slots")
    network("--pre_norm", action="store_true")
    network(
        "--num_classes",
        default=None,
        type=int,
        help="size of the class head minus one (max category id + 1); default: the dataset's own "
        "(91 for coco, 250 for coco_panoptic, from the annotations otherwise)",
    )
    segmentation = parser.add_argument_group("Segmentation")
    network = network_flags(segmentation)  # its flags that define the network
    network("--masks", action="store_true", help="Train segmentation head if the flag is provided")
    segmentation.add_argument(
        "--mask_attention_gain",
        default=1.0,
        type=float,
        help="initial gain of the mask head's weights on the attention maps (1: the original's "
        "initialization; docs/flags.md)",
    )
    segmentation.add_argument(
        "--panoptic_threshold",
        default=0.85,
        type=float,
        help="the panoptic post-processor keeps the queries whose best class scores above this",
    )
    loss = parser.add_argument_group("Loss")
    loss.add_argument(
        "--no_aux_loss",
        dest="aux_loss",
        action="store_false",
        help="Disables auxiliary decoding losses (loss at each layer)",
    )
    matcher = parser.add_argument_group("Matcher")
    matcher.add_argument("--set_cost_class", default=1, type=float, help="Class coefficient in the matching cost")
    matcher.add_argument("--set_cost_bbox", default=5, type=float, help="L1 box coefficient in the matching cost")
    matcher.add_argument("--set_cost_giou", default=2, type=float, help="giou box coefficient in the matching cost")
    coefficients = parser.add_argument_group("Loss coefficients")
    coefficients.add_argument("--mask_loss_coef", default=1, type=float)
    coefficients.add_argument("--dice_loss_coef", default=1, type=float)
    coefficients.add_argument("--bbox_loss_coef", default=5, type=float)
    coefficients.add_argument("--giou_loss_coef", default=2, type=float)
    coefficients.add_argument(
        "--eos_coef", default=0.1, type=float, help="Relative classification weight of the no-object class"
    )

    data = parser.add_argument_group("Dataset parameters")
    data.add_argument(
        "--dataset_file",
        default="coco",
        help="coco, coco_panoptic, synthetic (generated here, no download) or synthetic_panoptic",
    )
    data.add_argument("--coco_path", type=str)
    data.add_argument("--coco_panoptic_path", type=str)
    data.add_argument("--remove_difficult", action="store_true")

    run = parser.add_argument_group("Run")
    run.add_argument("--output_dir", default="", help="path where to save, empty for no saving")
    run.add_argument(
        "--device", default="cuda", help="device to use for training / testing (falls back to cpu when CUDA is absent)"
    )
    run.add_argument("--seed", default=42, type=int)
    run.add_argument(
        "--resume",
        default="",
        help="resume from checkpoint (a path or an https URL, or a Hugging Face DETR model folder: "
        "config.json + model.safetensors)",
    )
    run.add_argument("--start_epoch", default=0, type=int, metavar="N", help="start epoch")
    run.add_argument("--eval", action="store_true")
    run.add_argument("--num_workers", default=2, type=int)

    distributed = parser.add_argument_group("Distributed training parameters")
    distributed.add_argument("--world_size", default=1, type=int, help="number of distributed processes")
    distributed.add_argument("--dist_url", default="env://", help="url used to set up distributed training")

    add_distributed_args(parser)
    add_two_stage_args(parser)
    add_train_only_args(parser)
    add_speed_args(parser)
    add_schedule_args(parser)
    add_ema_args(parser)
    add_run_management_args(parser)
    add_synthetic_args(parser)
    # Not a flag: the thing classes of panoptic data, which build_datasets sets from the data (None: the model
    # builder's own thing map).
    parser.set_defaults(thing_classes=None)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """main.py's flags, with the defaults of the dataset they name (its recipe)."""
    parser = argparse.ArgumentParser(
        "DETR training and evaluation script",
        parents=[get_args_parser()],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="--dataset_file synthetic and synthetic_panoptic bring defaults of their "
        "own (a CPU recipe, datasets/synthetic.py): add --help after it to see "
        "them; a run prints them and writes them to output_dir/recipe.json. "
        "Flags given explicitly win.",
    )
    return parse_args_with_recipe(parser, sys.argv[1:] if argv is None else list(argv))


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


def build_datasets(args, device: torch.device):
    """(train dataset or None with --eval, val dataset, the COCO ground truth of the val images, the namespace the
    model is built from: the flags with the device chosen and the classes the data decides, num_classes and, for
    panoptic data, thing_classes). The data comes first: a wrong path or a bad annotation file fails here, before
    the model is built."""
    decided = {"device": str(device), "num_classes": datasets.num_classes(args)}
    thing_classes = datasets.thing_classes(args)
    if thing_classes is not None:  # panoptic data: what build_model's panoptic post-processor needs
        decided["thing_classes"] = thing_classes
    model_args = argparse.Namespace(**{**vars(args), **decided})
    dataset_train = build_dataset(image_set="train", args=model_args) if not args.eval else None
    dataset_val = build_dataset(image_set="val", args=model_args)
    return dataset_train, dataset_val, datasets.box_ground_truth(dataset_val, model_args), model_args


def prepare_model(model: torch.nn.Module, args, device: torch.device):
    """(the model to run, the model itself): on `device`, on the fast path with --fast, compiled with
    --compile, wrapped in DistributedDataParallel when distributed (its batch norms synchronized on CUDA)."""
    model.to(device)
    if utils.is_dist_avail_and_initialized():
        model = synchronize_batch_norms(model, device)
    if args.fast:
        enable_fast_path(model)
    if args.compile:
        enable_compile(model, device)
    if not utils.is_dist_avail_and_initialized():
        return model, model
    return distributed_data_parallel(model, device, utils.local_rank()), model


def build_optimizer(model: torch.nn.Module, args, device: torch.device):
    """AdamW with the backbone at its own learning rate, and the --lr_schedule: the step schedule (x0.1 after
    --lr_drop epochs) or a decay over --epochs (util.misc.EpochDecay)."""
    optimizer = torch.optim.AdamW(
        param_groups(model, args.lr_backbone),
        lr=args.lr,
        weight_decay=args.weight_decay,
        **adamw_options(device, exact=not args.fast),
    )
    if args.lr_schedule != "step":
        return optimizer, utils.EpochDecay(optimizer, args.lr_schedule, args.epochs)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def main(args):
    run_start = time.time()  # --time_budget counts what the run spends before its first epoch too
    check_args(args)
    budget = TimeBudget(args.time_budget, args.epochs, args.lr_drop, run_start)
    numeric_policy = set_numeric_policy(args.fast, args.deterministic)  # before any GPU work, cuBLAS's included
    process_group = utils.join_process_group(args)  # args stays as parsed
    print("git:\n  {}\n".format(utils.get_sha()))
    device = choose_device(args.device)
    if device.type == "cuda":
        print(numeric_policy)
    console = make_console(args, get_args_parser())  # what the run prints as it goes: util/console.py
    console.show_args(args)
    recipe = show_recipe(args, str(device), printed=not console.short)  # the short banner lists what differs
    seed = args.seed + utils.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    amp_dtype, scaler = choose_precision(args, device)

    dataset_train, dataset_val, base_ds, model_args = build_datasets(args, device)
    model, criterion, postprocessors = build_model(model_args)
    best_metric = chosen_best_metric(args.best_metric, postprocessors)
    model, model_without_ddp = prepare_model(model, args, device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print("number of params:", n_parameters)
    optimizer, lr_scheduler = build_optimizer(model_without_ddp, args, device)
    data_loader_train, sampler_train, data_loader_val = build_loaders(dataset_train, dataset_val, args)

    train_only = find_train_only_model(model_without_ddp)
    output_dir, resume = prepare_output_dir(args)
    # Compared with the architecture a --resume checkpoint records, the classes of the data included.
    resumed = load_starting_weights(model_without_ddp, model_args, resume, train_only)
    start_epoch = resume_training_state(resumed, optimizer, lr_scheduler, args, output_dir, scaler, budget)
    if recipe is not None and output_dir is not None and utils.is_main_process():
        # Written once the run has checked its inputs: a command that fails leaves the output folder as it was.
        (output_dir / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    ema = build_ema(model_without_ddp, resumed, resume, args)
    # What gets evaluated and saved as 'model': the weights' moving average with --ema_decay, else the weights.
    eval_model = ema.module if ema is not None else model
    saved_model = ema.module if ema is not None else model_without_ddp

    if args.eval:
        test_stats, coco_evaluator = evaluate(
            model, criterion, postprocessors, data_loader_val, base_ds, device, args.output_dir, amp_dtype, console
        )
        if output_dir is not None:
            utils.save_on_master(coco_evaluator.coco_eval["bbox"].eval, output_dir / "eval.pth")
            if utils.is_main_process():
                path = write_per_class(coco_evaluator.per_class, resumed.get("epoch") if resumed else None, output_dir)
                if args.plots:
                    save_per_class_picture(path, output_dir / "per_class.png")
        print(per_class_table(coco_evaluator.per_class))
        return test_stats

    best = best_so_far(resumed, best_metric, output_dir)
    pictures = None
    if args.plots:
        pictures = functools.partial(
            save_training_pictures, saved_model, postprocessors, dataset_val, output_dir, device
        )
    console.start_training(args, recipe, n_parameters, data_loader_train, data_loader_val, str(device), start_epoch,
                           budget)  # fmt: skip
    start_time = time.time()
    budget.start_training(lr_scheduler, start_epoch, start_time)
    # TensorBoard's axis is the training step; the run starts where its checkpoint ends, and what a stopped run
    # wrote beyond that is purged.
    steps_per_epoch = len(data_loader_train)
    writer = None
    if output_dir is not None and args.tensorboard and utils.is_main_process():
        writer = open_writer(output_dir / "tensorboard", purge_step=start_epoch * steps_per_epoch)
    test_stats, coco_evaluator = {}, None
    for epoch in range(start_epoch, budget.epochs):
        if utils.is_dist_avail_and_initialized():
            sampler_train.set_epoch(epoch)
        first_step = epoch * steps_per_epoch
        log_step = None if writer is None else functools.partial(write_training_scalars, writer, first_step)
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
        spent = budget.after_epoch(lr_scheduler, epoch)
        if output_dir is not None:
            state = training_state(
                saved_model, optimizer, lr_scheduler, spent, scaler, ema, model_without_ddp, train_only
            )
            # The checkpoint's 'args': the flags, with what this run decided from them.
            decided = dict(best_metric=best_metric, resume=resume, start_epoch=start_epoch, epochs=budget.epochs)
            decided.update(process_group.as_args())  # as the original's args hold them
            recorded_args = argparse.Namespace(**{**vars(model_args), **decided, "lr_drop": budget.lr_drop})
            # Keep a copy before each learning-rate drop and every 100 epochs.
            drops = args.lr_schedule == "step" and (epoch + 1) % budget.lr_drop == 0
            keep_copy = drops or (epoch + 1) % 100 == 0
            stats = {"train": train_stats, "test": test_stats, "n_parameters": n_parameters}
            best = end_of_epoch(
                epoch, stats, coco_evaluator, output_dir, state, recorded_args, best_metric, best, keep_copy, pictures
            )
        if epoch + 1 >= budget.epochs:  # --time_budget may have shortened the run
            break

    if writer is not None:
        writer.close()
    if coco_evaluator is not None:
        print("Per class, last epoch:\n" + per_class_table(coco_evaluator.per_class))
    console.summary(args, test_stats, best, output_dir, time.time() - start_time)
    return test_stats


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except RuntimeError as e:
        if not lost_a_peer(e):
            raise
        raise SystemExit(explain_lost_process(e, arguments.output_dir)) from e
