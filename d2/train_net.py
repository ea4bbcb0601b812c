"""Train and evaluate DETR with detectron2's DefaultTrainer.

    python d2/train_net.py --config-file d2/configs/detr_256_6_6_torchvision.yaml --num-gpus 8
    python d2/train_net.py --config-file d2/configs/detr_256_6_6_torchvision.yaml --eval-only \
        MODEL.WEIGHTS converted.pth

Datasets are detectron2's registered ones (COCO under $DETECTRON2_DATASETS), or any COCO-format folder given
with --dataset NAME ANNOTATIONS.json IMAGE_DIR and named in DATASETS.TRAIN / DATASETS.TEST.
"""

import itertools
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import detectron2.engine.defaults as d2_defaults
import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.solver.build import maybe_add_gradient_clipping

# d2/ for the wrapper package, the repository root for models/ and util/ (this file is run as a script).
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

from detr import DetrDatasetMapper, add_detr_config  # (also registers the Detr meta-architecture)
from util.misc import choose_device


def create_ddp_model_on_any_device(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's create_ddp_model, but a model on the CPU (--num-gpus N without GPUs, over gloo) gets no
    device_ids, which DistributedDataParallel refuses for CPU modules."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return _create_ddp_model(model, **kwargs)


# DefaultTrainer.__init__ looks the function up in its own module. (The original is kept on the replacement, so
# that importing this file twice does not wrap the replacement in itself.)
_create_ddp_model = getattr(d2_defaults.create_ddp_model, "original", d2_defaults.create_ddp_model)
create_ddp_model_on_any_device.original = _create_ddp_model
d2_defaults.create_ddp_model = create_ddp_model_on_any_device


def clip_full_model_gradients(optimizer_class: type, max_norm: float) -> type:
    """A subclass of `optimizer_class` whose step() first clips the norm of all gradients together to
    `max_norm`, as main.py's --clip_max_norm (detectron2's own clipping works per parameter)."""

    class FullModelGradientClipping(optimizer_class):
        def step(self, closure=None):
            params = itertools.chain.from_iterable(group["params"] for group in self.param_groups)
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    return FullModelGradientClipping


class Trainer(DefaultTrainer):
    """DefaultTrainer with DETR's data mapper, AdamW (the backbone at its own learning rate) and COCO
    evaluation."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name: str, output_folder: Optional[str] = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DetrDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name: str):
        return build_detection_test_loader(cfg, dataset_name, mapper=DetrDatasetMapper(cfg, is_train=False))

    @classmethod
    def build_optimizer(cls, cfg, model: torch.nn.Module) -> torch.optim.Optimizer:
        """Two parameter groups as in main.py: the backbone's at BASE_LR x SOLVER.BACKBONE_MULTIPLIER, the rest
        at BASE_LR; one weight decay for all. Frozen parameters are left out."""
        backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
        rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
        lr = cfg.SOLVER.BASE_LR
        groups = [{"params": rest, "lr": lr}, {"params": backbone, "lr": lr * cfg.SOLVER.BACKBONE_MULTIPLIER}]
        groups = [g for g in groups if g["params"]]
        optimizer_name = cfg.SOLVER.OPTIMIZER.upper()
        if optimizer_name == "ADAMW":
            optimizer_class, kwargs = torch.optim.AdamW, {}
        elif optimizer_name == "SGD":
            optimizer_class, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM}
        else:
            raise ValueError(f"SOLVER.OPTIMIZER must be ADAMW or SGD, got {cfg.SOLVER.OPTIMIZER!r}")
        clipping = cfg.SOLVER.CLIP_GRADIENTS
        if clipping.ENABLED and clipping.CLIP_TYPE == "full_model":
            optimizer_class = clip_full_model_gradients(optimizer_class, clipping.CLIP_VALUE)
        else:  # detectron2's per-parameter "value" or "norm" clipping, or none
            optimizer_class = maybe_add_gradient_clipping(cfg, optimizer_class)
        return optimizer_class(groups, lr=lr, weight_decay=cfg.SOLVER.WEIGHT_DECAY, **kwargs)


def register_datasets(datasets: List[List[str]]) -> None:
    """Register each --dataset NAME ANNOTATIONS IMAGE_DIR as a detectron2 COCO dataset (again if the name is
    taken, so that a script calling main() twice in one process sees its latest folders)."""
    for name, annotations, image_dir in datasets:
        if not os.path.isfile(annotations):
            raise FileNotFoundError(f"--dataset {name}: annotation file {annotations} does not exist")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"--dataset {name}: image folder {image_dir} does not exist")
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_coco_instances(name, {}, annotations, image_dir)


def setup(args):
    """The config: detectron2's defaults, the wrapper's keys, --config-file, then the command line's opts."""
    cfg = get_cfg()
    add_detr_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # detectron2's default MODEL.DEVICE is "cuda": on a machine without one, the original's commands run on the CPU.
    cfg.MODEL.DEVICE = str(choose_device(cfg.MODEL.DEVICE, "MODEL.DEVICE"))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args) -> Dict[str, Any]:
    """Train (resuming with --resume), or with --eval-only evaluate MODEL.WEIGHTS; returns the evaluation."""
    register_datasets(args.dataset or [])
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def argument_parser():
    """detectron2's flags (--config-file, --eval-only, --resume, --num-gpus, ...) and --dataset."""
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset",
        nargs=3,
        action="append",
        metavar=("NAME", "ANNOTATIONS", "IMAGE_DIR"),
        help="register a COCO-format dataset under NAME (repeatable)",
    )
    return parser


def check_num_gpus(parser, num_gpus: int) -> None:
    """detectron2's launch starts one process per GPU where there are GPUs (asserting that there are enough), and
    --num-gpus processes on the CPU where there are none."""
    if num_gpus < 1:
        parser.error(f"--num-gpus {num_gpus}: give at least 1")
    if torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        parser.error(
            f"--num-gpus {num_gpus}: this machine has {torch.cuda.device_count()} CUDA device(s); ask for "
            "at most that many (--num-gpus is processes per machine)"
        )


if __name__ == "__main__":
    parser = argument_parser()
    args = parser.parse_args()
    check_num_gpus(parser, args.num_gpus)
    print("Command line arguments:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
