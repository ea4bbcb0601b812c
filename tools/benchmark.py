"""Time DETR's paths side by side, in one run, with the same weights: inference, a training step, COCO
evaluation and the data pipeline. Prints speed as multiples of the bit-exact path's and writes JSON.

    python tools/benchmark.py                          # DETR-R50, on the GPU if there is one, every mode
    python tools/benchmark.py --device cpu --repeats 5 --output benchmark.json
    python tools/benchmark.py --tiny --output b.json   # a tiny model, in seconds (what the tests run)

Modes (each as main.py runs it):
  exact              main.py's default (or --exact): the original's numbers, bit for bit
  fast               --fast: the fast path (models/fast.py) in fp32, fused AdamW
  channels_last      --channels_last: the exact model, ResNet channels-last only
  amp                --amp: the exact model under autocast only (the type --amp_dtype picks, as main.py's)
  amp+channels_last  --fast --amp: the fast path (channels-last included) under that autocast
  compiled           --fast --compile: the fast path through torch.compile (its compile time reported apart)
  hf                 Hugging Face transformers' DetrForObjectDetection, same sizes, random weights (only when
                     transformers is importable; an optional extra used nowhere else)
Modes are timed in interleaved rounds (each mode once per round), best of --repeats: on a shared machine a burst
of load then slows every mode alike.
"""

import argparse
import contextlib
import copy
import functools
import io
import json
import os
import random
import sys
import time
from argparse import Namespace
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from datasets.coco_eval import CocoEvaluator, prepare_for_coco
from engine import optimizer_step, param_groups, run_model, training_losses
from main import get_args_parser as get_main_args_parser
from models import build_model
from models.fast import adamw_options, enable_fast_path
from util.amp import AMP_CHOICES, choose_amp_dtype, hardware, make_grad_scaler, set_numeric_policy
from util.benchmark import ratio_table, synchronize, time_interleaved
from util.compile import compile_counts, compile_record, enable_compile

ALL_MODES = ("exact", "fast", "channels_last", "amp", "amp+channels_last", "compiled", "hf")
MAIN_FLAGS = {
    "exact": "--exact",
    "fast": "--fast",
    "channels_last": "--channels_last",
    "amp": "--amp",
    "amp+channels_last": "--fast --amp",
    "compiled": "--fast --compile",
    "hf": "(transformers)",
}

TINY_MODEL = dict(
    backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=8
)


def get_args_parser() -> argparse.ArgumentParser:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser("DETR benchmark: every path side by side, speed relative to --exact")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--modes",
        default=",".join(ALL_MODES),
        help=f"comma-separated, from {', '.join(ALL_MODES)} (exact is always included)",
    )
    parser.add_argument("--repeats", default=3, type=int, help="timed runs of each mode (best one counts)")
    parser.add_argument("--backbone", default=main_defaults().backbone)
    parser.add_argument("--inference_size", default=[800, 1066], type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument(
        "--throughput_batch", default=8, type=int, help="batch of the throughput row (GPU only; 0 skips it)"
    )
    parser.add_argument("--train_size", default=[512, 512], type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--train_batch", default=2, type=int)
    parser.add_argument(
        "--coco_images", default=2000, type=int, help="images of detections for the COCO evaluation row (0 skips it)"
    )
    parser.add_argument(
        "--pipeline_images",
        default=20,
        type=int,
        help="generated JPEG images through the COCO transforms (0 skips the row)",
    )
    parser.add_argument(
        "--skip", default="", help="comma-separated rows to skip: inference, throughput, train, coco_eval, pipeline"
    )
    parser.add_argument("--threads", default=0, type=int, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--amp_dtype",
        default="auto",
        choices=AMP_CHOICES,
        help="autocast type of the amp modes, as main.py's --amp_dtype (auto: what the device "
        "computes natively, fp32 where it has neither type)",
    )
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model at 64x64, 1 repeat, 16 COCO images, 2 pipeline images: seconds",
    )
    parser.add_argument("--output", default="", help="write the results as JSON to this file")
    return parser


def main_defaults() -> Namespace:
    """main.py's flags at their defaults: the model it trains without flags (DETR-R50 as in the paper)."""
    return get_main_args_parser().parse_args([])


def model_args(benchmark_args: Namespace) -> Namespace:
    """main.py's flags of the benchmarked configuration: its defaults with random backbone weights (nothing
    downloaded), the benchmark's device and backbone, and with --tiny the tiny sizes."""
    values = dict(
        vars(main_defaults()), backbone_weights="none", backbone=benchmark_args.backbone, device=benchmark_args.device
    )
    if benchmark_args.tiny:
        values.update(TINY_MODEL)
    return Namespace(**values)


def random_targets(batch: int, num_classes: int, generator: torch.Generator) -> List[Dict[str, torch.Tensor]]:
    """COCO-like targets: 3 to 12 boxes (normalized cxcywh) per image, random classes."""
    targets = []
    for _ in range(batch):
        n = int(torch.randint(3, 13, (1,), generator=generator))
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        targets.append(
            {
                "labels": torch.randint(1, num_classes, (n,), generator=generator),
                "boxes": torch.cat([centres, sizes], 1),
            }
        )
    return targets


class DetrMode:
    """One mode of this project's model: its own copy of the weights, fast path, autocast, compile, optimizer."""

    def __init__(
        self,
        name: str,
        exact_model: torch.nn.Module,
        criterion: torch.nn.Module,
        args: Namespace,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = torch.bfloat16,
    ):
        self.name, self.criterion, self.device = name, criterion, device
        self.model = copy.deepcopy(exact_model)
        fast = self.fast = name in ("fast", "amp+channels_last", "compiled")
        if fast:
            enable_fast_path(self.model)
        elif name == "channels_last":
            self.model.backbone[0].use_channels_last()
        self.amp = amp_dtype if name in ("amp", "amp+channels_last") else None
        self.scaler = make_grad_scaler(device, self.amp)
        if name == "compiled" and not enable_compile(self.model, device):
            raise RuntimeError("torch.compile is unavailable here (see the message above)")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, args.lr_backbone),
            lr=args.lr,
            weight_decay=args.weight_decay,
            **adamw_options(device, exact=not fast),
        )
        self.max_norm = args.clip_max_norm

    def infer(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Eval-mode outputs for a batch."""
        set_numeric_policy(self.fast)  # TF32 on a GPU as main.py sets it for the mode (process-wide)
        self.model.eval()
        with torch.no_grad():
            out = run_model(self.model, images, self.device, self.amp)
        return {"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"]}

    def train_step(self, images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> float:
        """One step as engine.train_one_epoch takes it: forward, weighted losses with aux, backward, clip, AdamW
        (eagerly again where the compiled backward fails)."""
        set_numeric_policy(self.fast)
        self.model.train()
        losses = functools.partial(training_losses, self.model, self.criterion, images, targets, self.device, self.amp)
        _, loss = losses()
        optimizer_step(loss, self.model, self.optimizer, self.max_norm, self.scaler, recompute=losses)
        return loss.item()


class HuggingFaceMode:
    """transformers' DetrForObjectDetection at the same sizes, random weights, its own ResNet (no timm, nothing
    downloaded), its own loss (with aux), clipping and AdamW."""

    def __init__(self, args: Namespace, num_classes: int, device: torch.device):
        from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

        basic = args.backbone in ("resnet18", "resnet34")
        depths = {
            "resnet18": [2, 2, 2, 2],
            "resnet34": [3, 4, 6, 3],
            "resnet50": [3, 4, 6, 3],
            "resnet101": [3, 4, 23, 3],
        }[args.backbone]
        backbone_config = ResNetConfig(
            depths=depths,
            layer_type="basic" if basic else "bottleneck",
            hidden_sizes=[64, 128, 256, 512] if basic else [256, 512, 1024, 2048],
            out_features=["stage4"],
        )
        config = DetrConfig(
            use_timm_backbone=False,
            use_pretrained_backbone=False,
            backbone_config=backbone_config,
            num_labels=num_classes,
            num_queries=args.num_queries,
            d_model=args.hidden_dim,
            encoder_layers=args.enc_layers,
            decoder_layers=args.dec_layers,
            encoder_attention_heads=args.nheads,
            decoder_attention_heads=args.nheads,
            encoder_ffn_dim=args.dim_feedforward,
            decoder_ffn_dim=args.dim_feedforward,
            dropout=args.dropout,
            auxiliary_loss=args.aux_loss,
        )  # its costs and loss weights
        # default to DETR's (1, 5, 2; 5, 2; eos 0.1)
        self.model = DetrForObjectDetection(config).to(device)
        # Its own ResNet comes entirely frozen (its freezing rule looks for timm's layer names); train stages 2-4
        # as DETR trains layer2-4, so that both training steps do the same work.
        for name, parameter in self.model.named_parameters():
            if any(f"encoder.stages.{i}." in name for i in (1, 2, 3)) and "backbone" in name:
                parameter.requires_grad_(True)
        self.device = device
        self.optimizer = torch.optim.AdamW(
            [p for p in self.model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay
        )
        self.max_norm = args.clip_max_norm

    def infer(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Eval-mode outputs for a batch, under this project's names."""
        self.model.eval()
        with torch.no_grad():
            out = self.model(pixel_values=images)
        return {"pred_logits": out.logits, "pred_boxes": out.pred_boxes}

    def train_step(self, images: torch.Tensor, targets: List[Dict[str, torch.Tensor]]) -> float:
        """One step: forward with its loss (aux included), backward, clip, AdamW."""
        self.model.train()
        labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
        loss = self.model(pixel_values=images, labels=labels).loss
        self.optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
        self.optimizer.step()
        return loss.item()


def max_output_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two models' pred_logits and pred_boxes."""
    return max((a[k].double() - b[k].double()).abs().max().item() for k in ("pred_logits", "pred_boxes"))


def time_modes(
    modes: Dict[str, Any],
    name: str,
    make_call: Callable[[Any], Callable[[], Any]],
    device: torch.device,
    repeats: int,
    compile_counts_before: Optional[Dict[str, int]] = None,
) -> Dict[str, Dict[str, Any]]:
    """time_interleaved over the modes, with progress printed (a full run takes minutes). The compiled mode's
    entry also says what it ran (compiled_run), counted from compile_counts_before (taken before the row's first
    call; now if None)."""
    before = compile_counts() if compile_counts_before is None else compile_counts_before
    print(f"[{name}] timing {', '.join(modes)} ({repeats} rounds after a warm-up call each)", flush=True)
    results = time_interleaved({m: make_call(mode) for m, mode in modes.items()}, device, repeats)
    if "compiled" in modes:
        results["compiled"].update(compiled_run(modes["compiled"].model, before))
    for m, r in results.items():
        ran = "" if r.get("compiled_graph_ran", True) else f"  EAGER: {r['eager_because']}"
        print(f"  {m:18s} best {r['best_s']:.3f} s  (first call {r['first_call_s']:.3f} s){ran}", flush=True)
    return results


def compiled_run(model: torch.nn.Module, before: Dict[str, int]) -> Dict[str, Any]:
    """Whether a row's calls of the compiled mode ran its compiled graphs, from dynamo's tallies before and after
    them (util.compile.compile_counts; the other modes compile nothing) and util.compile.compile_record:
    compiled_graph_ran, and if not, eager_because; recompiles (compilations after a frame's first: new shapes or
    modes), recompile-limit hits and frames that failed to compile."""
    after = compile_counts()
    change = {k: v - before.get(k, 0) for k, v in after.items()}
    record = compile_record(model)
    reasons = [
        record["fallback"],
        "nothing was compiled" if after and not after["frames_compiled"] else None,
        f"{change['recompile_limit_hits']} call(s) hit the recompile limit"
        if change.get("recompile_limit_hits")
        else None,
        f"{change['frames_failed']} frame(s) failed to compile" if change.get("frames_failed") else None,
        "torch has no dynamo counters" if not after else None,
    ]
    reasons = [r for r in reasons if r]
    result = {
        "compiled_graph_ran": not reasons,
        "recompiles": change.get("recompiles"),
        "recompile_limit_hits": change.get("recompile_limit_hits"),
        "frames_failed": change.get("frames_failed"),
    }
    if reasons:
        result["eager_because"] = "; ".join(reasons)
    return result


# Frequent COCO image sizes (width, height): most of train2017 is 640 pixels on its longer side.
COCO_IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (640, 426), (500, 375), (640, 512), (612, 612))


def coco_size_jpegs(num_images: int, seed: int) -> List[tuple]:
    """(JPEG bytes, COCO-style target with 3 to 12 boxes) of generated images of COCO_IMAGE_SIZES in turn: smooth
    gradients plus noise, so that the files are the size of photographs', not of pure noise's."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    files = []
    for i in range(num_images):
        width, height = COCO_IMAGE_SIZES[i % len(COCO_IMAGE_SIZES)]
        ramp = np.linspace(0, 255, width)[None, :, None] * rng.uniform(0.3, 1.0, (1, 1, 3))
        pixels = np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        n = int(rng.integers(3, 13))
        xy = rng.uniform(0, 0.6, (n, 2)) * (width, height)
        boxes = torch.tensor(np.concatenate([xy, xy + rng.uniform(10, 200, (n, 2))], 1), dtype=torch.float32)
        target = {
            "boxes": boxes,
            "labels": torch.randint(1, 91, (n,)),
            "image_id": torch.tensor(i),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64),
            "orig_size": torch.tensor([height, width]),
            "size": torch.tensor([height, width]),
        }
        files.append((buffer.getvalue(), target))
    return files


def tensor_transform(transform, image: torch.Tensor) -> torch.Tensor:
    """A datasets/transforms.py pipeline (as make_coco_transforms builds it) applied to a uint8 image [3, H, W] with
    torchvision's tensor kernels (transforms v2) instead of PIL's, drawing the same random numbers in the same order:
    seeded alike, it takes the same decisions as the PIL pipeline. The image only (no target)."""
    import torchvision.transforms as tv_transforms
    import torchvision.transforms.functional as F
    import torchvision.transforms.v2.functional as F2

    import datasets.transforms as T

    height, width = image.shape[-2:]
    if isinstance(transform, T.Compose):
        for t in transform.transforms:
            image = tensor_transform(t, image)
        return image
    if isinstance(transform, T.RandomHorizontalFlip):
        return F2.horizontal_flip(image) if random.random() < transform.p else image
    if isinstance(transform, T.RandomSelect):
        chosen = transform.transforms1 if random.random() < transform.p else transform.transforms2
        return tensor_transform(chosen, image)
    if isinstance(transform, T.RandomResize):
        size = T.get_size((width, height), random.choice(transform.sizes), transform.max_size)
        return F2.resize(image, list(size), antialias=True)
    if isinstance(transform, T.RandomSizeCrop):
        crop_width = random.randint(min(transform.min_size, width), min(width, transform.max_size))
        crop_height = random.randint(min(transform.min_size, height), min(height, transform.max_size))
        return F2.crop(image, *tv_transforms.RandomCrop.get_params(image, [crop_height, crop_width]))
    if isinstance(transform, T.ToTensor):
        return image.float().div(255)  # as F.to_tensor: a division, where v2's to_dtype multiplies by 1/255
    if isinstance(transform, T.Normalize):
        return F.normalize(image, mean=transform.mean, std=transform.std)
    raise TypeError(f"tensor_transform: no tensor form of {type(transform).__name__}")


def benchmark_data_pipeline(num_images: int, seed: int) -> Dict[str, Any]:
    """Images per second through JPEG decoding and datasets/coco.py's COCO transforms ('train': flip and
    multi-scale resize or crop, shorter side 480 to 800, longer at most 1333; 'val': shorter side 800), with one
    thread in this one process: the rate of one data-loader worker (which runs single-threaded). The images are
    generated JPEGs of COCO's sizes with 3 to 12 boxes each. Each rate is given per second of wall time and per
    second of this process's CPU time (`_per_cpu_s`): on a shared, loaded machine the latter is what a core of its
    own would do.

    Beside the project's path (PIL decoding and resizing), torchvision's: 'decode' compares decoding alone with
    torchvision.io.decode_jpeg, 'tensor_path' the whole pipeline of images (no targets, on both sides) with
    decode_jpeg and the tensor kernels of transforms v2, the same random decisions taken; each says whether its
    outputs equal the PIL path's, and by how much they differ."""
    from PIL import Image
    from torchvision.io import decode_jpeg

    from datasets.coco import make_coco_transforms

    files = coco_size_jpegs(num_images, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:

        def rate(run: Callable[[], Any]) -> tuple:
            """(images per second of wall time, per second of CPU time, run's outputs)"""
            start, start_cpu = time.perf_counter(), time.process_time()
            outputs = run()
            wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
            return num_images / wall, num_images / max(cpu, 1e-9), outputs

        def pil_image(data: bytes):
            return Image.open(io.BytesIO(data)).convert("RGB")

        def tensor_image(data: bytes) -> torch.Tensor:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))

        sizes = sorted({f"{w}x{h}" for w, h in COCO_IMAGE_SIZES[:num_images]})
        result: Dict[str, Any] = {"num_images": num_images, "image_sizes": sizes, "threads": 1}
        pil_decode_rate, pil_decode_cpu_rate, pil_pixels = rate(lambda: [np.asarray(pil_image(d)) for d, _ in files])
        tensor_decode_rate, tensor_decode_cpu_rate, tensor_pixels = rate(lambda: [tensor_image(d) for d, _ in files])
        result["decode"] = {
            "pil_images_per_s": pil_decode_rate,
            "pil_images_per_cpu_s": pil_decode_cpu_rate,
            "decode_jpeg_images_per_s": tensor_decode_rate,
            "decode_jpeg_images_per_cpu_s": tensor_decode_cpu_rate,
            "equal": all(np.array_equal(a, b.permute(1, 2, 0).numpy()) for a, b in zip(pil_pixels, tensor_pixels)),
        }
        comparison: Dict[str, Any] = {"max_abs_diff": 0.0, "differing_fraction": 0.0, "same_sizes": True}
        for image_set in ("train", "val"):
            transforms = make_coco_transforms(image_set)
            random.seed(seed)
            result[f"{image_set}_images_per_s"], result[f"{image_set}_images_per_cpu_s"], _ = rate(
                lambda: [transforms(pil_image(d), dict(t)) for d, t in files]  # noqa: B023 (called at once)
            )
            # Images only, both ways, from the same random state.
            random.seed(seed)
            torch.manual_seed(seed)
            pil_rate, pil_cpu_rate, pil_out = rate(
                lambda: [transforms(pil_image(d), None)[0] for d, _ in files]  # noqa: B023
            )
            random.seed(seed)
            torch.manual_seed(seed)
            tensor_rate, tensor_cpu_rate, tensor_out = rate(
                lambda: [tensor_transform(transforms, tensor_image(d)) for d, _ in files]  # noqa: B023
            )
            comparison[f"pil_{image_set}_images_per_s"] = pil_rate
            comparison[f"pil_{image_set}_images_per_cpu_s"] = pil_cpu_rate
            comparison[f"tensor_{image_set}_images_per_s"] = tensor_rate
            comparison[f"tensor_{image_set}_images_per_cpu_s"] = tensor_cpu_rate
            values = differing = 0
            for a, b in zip(pil_out, tensor_out):
                if a.shape != b.shape:
                    comparison["same_sizes"] = False
                    continue
                difference = (a - b).abs()
                comparison["max_abs_diff"] = max(comparison["max_abs_diff"], difference.max().item())
                differing += int((difference > 0).sum())
                values += a.numel()
            comparison["differing_fraction"] = max(comparison["differing_fraction"], differing / max(values, 1))
        comparison["equal"] = comparison["same_sizes"] and comparison["max_abs_diff"] == 0.0
        result["tensor_path"] = comparison
    finally:
        torch.set_num_threads(threads)
    return result


def synthetic_coco_detections(num_images: int, dets_per_image: int, seed: int, num_categories: int = 80):
    """A COCO-like ground truth and DETR-like predictions for timing evaluations: 640x480 images with about
    7 objects each (small to large, 1% crowd, some images without any) and exactly `dets_per_image`
    detections per image, a few near each object (mostly the right class, higher scores) and the rest
    anywhere (lower scores). Returns (pycocotools COCO, {image_id: {'boxes' xyxy, 'scores', 'labels'}})."""
    from pycocotools.coco import COCO

    rng = np.random.default_rng(seed)
    width, height = 640.0, 480.0
    images, annotations, predictions = [], [], {}
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": int(height), "width": int(width)})
        num_objects = int(rng.poisson(7)) if image_id % 50 else 0
        # Side lengths log-uniform from 6 to 400 px: COCO's small, medium and large objects all occur.
        side = np.exp(rng.uniform(np.log(6), np.log(400), num_objects))
        aspect = np.exp(rng.uniform(-0.7, 0.7, num_objects))
        wh = np.minimum(np.stack([side * aspect, side / aspect], 1), [width, height])
        xy = rng.uniform(0, 1, (num_objects, 2)) * ([width, height] - wh)
        categories = rng.integers(1, num_categories + 1, num_objects)
        for k in range(num_objects):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(categories[k]),
                    "bbox": [float(v) for v in (*xy[k], *wh[k])],
                    "area": float(wh[k].prod()),
                    "iscrowd": int(rng.random() < 0.01),
                }
            )
        near = min(dets_per_image, 3 * num_objects)
        source = rng.integers(0, max(num_objects, 1), near)
        jitter = rng.normal(0, 0.08, (near, 4)) * np.tile(wh[source], 2) if num_objects else np.zeros((0, 4))
        near_boxes = np.concatenate([xy[source], xy[source] + wh[source]], 1) + jitter if num_objects else jitter
        near_labels = np.where(
            rng.random(near) < 0.85, categories[source] if num_objects else 0, rng.integers(1, num_categories + 1, near)
        )
        far = dets_per_image - near
        far_wh = np.minimum(np.exp(rng.uniform(np.log(6), np.log(400), (far, 2))), [width, height])
        far_xy = rng.uniform(0, 1, (far, 2)) * ([width, height] - far_wh)
        boxes = np.concatenate([near_boxes, np.concatenate([far_xy, far_xy + far_wh], 1)])
        scores = np.concatenate([rng.uniform(0.3, 1.0, near), rng.beta(1, 6, far)])
        labels = np.concatenate([near_labels, rng.integers(1, num_categories + 1, far)])
        predictions[image_id] = {
            "boxes": torch.tensor(boxes, dtype=torch.float32),
            "scores": torch.tensor(scores, dtype=torch.float32),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
    coco_gt = COCO()
    coco_gt.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, num_categories + 1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    return coco_gt, predictions


def time_coco_evaluation(
    num_images: int = 2000,
    dets_per_image: int = 100,
    seed: int = 0,
    batch_size: int = 8,
    num_categories: int = 80,
    repeats: int = 1,
) -> Dict[str, Any]:
    """Time box AP on `synthetic_coco_detections` two ways: pycocotools' COCOeval from the COCO results
    list (loadRes, evaluate, accumulate, summarize), and the project's CocoEvaluator (datasets/coco_eval.py)
    from the prediction tensors (update per batch of `batch_size` images, synchronize, accumulate, summarize:
    its conversion of tensors is timed, the results list given to pycocotools is not). Each is run `repeats`
    times and its fastest run kept.

    Returns wall seconds for both ('pycocotools_s', 'evaluator_s') and their ratio 'speedup'; the same in
    CPU seconds of this process ('*_cpu_s', 'cpu_speedup': steadier on a machine other work shares, as
    both run in one thread); the two sets of 12 stats, 'max_abs_diff' between them, 'stats_equal' (within
    1e-12) and 'stats_identical' (bit for bit)."""
    from pycocotools.cocoeval import COCOeval

    coco_gt, predictions = synthetic_coco_detections(num_images, dets_per_image, seed, num_categories)

    def run_pycocotools(results):
        reference = COCOeval(coco_gt, coco_gt.loadRes(results), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
        return reference.stats

    def run_evaluator(_):
        evaluator = CocoEvaluator(coco_gt, ["bbox"])
        image_ids = sorted(predictions)
        for i in range(0, len(image_ids), batch_size):
            evaluator.update({j: predictions[j] for j in image_ids[i : i + batch_size]})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
        return evaluator.coco_eval["bbox"].stats

    timings = {}
    for name, evaluate_once in (("pycocotools", run_pycocotools), ("evaluator", run_evaluator)):
        wall, cpu = [], []
        for _ in range(repeats):
            results = prepare_for_coco(predictions, "bbox")  # loadRes writes into it: a fresh one each time
            with contextlib.redirect_stdout(io.StringIO()):
                start, start_cpu = time.perf_counter(), time.process_time()
                stats = np.asarray(evaluate_once(results))
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        timings[name] = (min(wall), min(cpu), stats)
    (pycocotools_s, pycocotools_cpu_s, theirs), (evaluator_s, evaluator_cpu_s, ours) = timings.values()
    max_abs_diff = float(np.abs(ours - theirs).max())
    return {
        "num_images": num_images,
        "dets_per_image": dets_per_image,
        "seed": seed,
        "num_categories": num_categories,
        "pycocotools_s": pycocotools_s,
        "evaluator_s": evaluator_s,
        "speedup": pycocotools_s / evaluator_s,
        "pycocotools_cpu_s": pycocotools_cpu_s,
        "evaluator_cpu_s": evaluator_cpu_s,
        "cpu_speedup": pycocotools_cpu_s / evaluator_cpu_s,
        "pycocotools_stats": theirs.tolist(),
        "evaluator_stats": ours.tolist(),
        "max_abs_diff": max_abs_diff,
        "stats_equal": max_abs_diff <= 1e-12,
        "stats_identical": bool(np.array_equal(ours, theirs)),
    }


def machine_description(device: torch.device) -> str:
    """'CPU: 2 cores (AMD EPYC), torch capability AVX512, native bfloat16 yes, 2 torch threads' or the GPU's name
    and compute capability."""
    info = hardware(device)
    if device.type == "cuda":
        return f"GPU: {info['name']} (compute capability {info['compute_capability']})"
    return (
        f"CPU: {os.cpu_count()} cores ({info['name']}), torch capability {info['capability']}, native "
        f"bfloat16 {'yes' if info['native_bfloat16'] else 'no'}, {torch.get_num_threads()} torch threads"
    )


def run(bargs: Namespace) -> Dict[str, Any]:
    """Every row of the benchmark for the parsed flags; returns what --output writes."""
    if bargs.tiny:
        bargs.inference_size, bargs.train_size, bargs.train_batch = [64, 64], [64, 64], 2
        bargs.repeats, bargs.coco_images, bargs.pipeline_images = 1, 16, 2
        bargs.backbone = "resnet18"
    if bargs.threads:
        torch.set_num_threads(bargs.threads)
    device = torch.device(bargs.device)
    skip = {s for s in bargs.skip.split(",") if s}
    requested = [m for m in bargs.modes.split(",") if m]
    unknown = [m for m in requested if m not in ALL_MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {', '.join(ALL_MODES)}")
    names = ["exact"] + [m for m in ALL_MODES if m in requested and m != "exact"]

    args = model_args(bargs)
    torch.manual_seed(bargs.seed)
    exact_model, criterion, _ = build_model(args)
    exact_model.to(device)
    num_classes = criterion.num_classes
    amp_dtype, amp_choice = choose_amp_dtype(device, bargs.amp_dtype)
    print(amp_choice, flush=True)
    notes: Dict[str, str] = {}
    modes: Dict[str, Any] = {}
    for name in names:
        try:
            if name == "hf":
                modes[name] = HuggingFaceMode(args, num_classes, device)
            else:
                modes[name] = DetrMode(name, exact_model, criterion, args, device, amp_dtype)
        except Exception as e:  # an optional mode that cannot run here is reported, not fatal
            notes[name] = (
                f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if str(e)
                else f"skipped: {type(e).__name__}"
            )
            print(f"[{name}] {notes[name]}", flush=True)
    if "hf" in modes:
        notes["hf"] = "own random weights (outputs not comparable)"

    generator = torch.Generator().manual_seed(bargs.seed)
    results: Dict[str, Any] = {
        "machine": machine_description(device),
        "hardware": hardware(device),
        "amp_dtype": str(amp_dtype).replace("torch.", "") if amp_dtype else "float32",
        "amp_choice": amp_choice,
        "torch": torch.__version__,
        "device": str(device),
        "config": {**vars(bargs), "model": vars(args)},
        "modes": {m: {"main_py_flags": MAIN_FLAGS[m]} for m in names},
        "rows": {},
    }
    for name, note in notes.items():
        results["modes"][name]["note"] = note

    if "inference" not in skip:
        images = torch.randn(1, 3, *bargs.inference_size, generator=generator).to(device)
        before = compile_counts()  # the compiled mode's first call (its compilation) comes next
        reference = modes["exact"].infer(images)
        for name, mode in modes.items():
            if name != "hf":
                results["modes"][name]["inference_max_abs_diff"] = max_output_difference(reference, mode.infer(images))
        timed = time_modes(modes, "inference", lambda mode: lambda: mode.infer(images), device, bargs.repeats, before)
        results["rows"]["inference"] = {"batch": 1, "size": bargs.inference_size, **timed}

    if "throughput" not in skip and device.type == "cuda" and bargs.throughput_batch > 0:
        images = torch.randn(bargs.throughput_batch, 3, *bargs.inference_size, generator=generator).to(device)
        timed = time_modes(modes, "throughput", lambda mode: lambda: mode.infer(images), device, bargs.repeats)
        for r in timed.values():
            r["images_per_s"] = bargs.throughput_batch / r["best_s"]
        results["rows"]["throughput"] = {"batch": bargs.throughput_batch, "size": bargs.inference_size, **timed}
    elif "throughput" not in skip:
        results["rows"]["throughput"] = {"skipped": "batch-8 throughput is measured on a GPU only"}

    if "train" not in skip:
        images = torch.randn(bargs.train_batch, 3, *bargs.train_size, generator=generator).to(device)
        targets = [
            {k: v.to(device) for k, v in t.items()} for t in random_targets(bargs.train_batch, num_classes, generator)
        ]
        timed = time_modes(
            modes, "train step", lambda mode: lambda: mode.train_step(images, targets), device, bargs.repeats
        )
        results["rows"]["train"] = {"batch": bargs.train_batch, "size": bargs.train_size, **timed}

    if "coco_eval" not in skip and bargs.coco_images > 0:
        print(f"[coco_eval] {bargs.coco_images} images of 100 detections", flush=True)
        results["rows"]["coco_eval"] = time_coco_evaluation(num_images=bargs.coco_images)
    if "pipeline" not in skip and bargs.pipeline_images > 0:
        print(f"[pipeline] {bargs.pipeline_images} generated JPEGs through the COCO transforms", flush=True)
        results["rows"]["pipeline"] = benchmark_data_pipeline(bargs.pipeline_images, bargs.seed)
    synchronize(device)
    results["table"] = summary_table(results, notes)
    return results


def summary_table(results: Dict[str, Any], notes: Dict[str, str]) -> str:
    """The Markdown table of speed relative to exact, then the evaluation and pipeline lines."""
    columns = {"inference": "inference", "throughput": "throughput", "train": "train step"}
    present = [c for c in columns if "skipped" not in results["rows"].get(c, {"skipped": True})]
    rows = []
    for name in results["modes"]:
        row = {"name": name}
        for c in present:
            row[columns[c]] = results["rows"][c].get(name, {}).get("best_s")
        rows.append(row)
    notes = dict(notes)
    for row in results["rows"].values():
        if not row.get("compiled", {}).get("compiled_graph_ran", True):
            notes["compiled"] = f"ran eagerly in part: {row['compiled']['eager_because']}"
    diff_notes = dict(notes)
    for name, mode in results["modes"].items():
        if "inference_max_abs_diff" in mode and name != "exact":
            diff_notes[name] = f"max |output - exact| {mode['inference_max_abs_diff']:.1e}" + (
                f"; {notes[name]}" if name in notes else ""
            )
    lines = [ratio_table(rows, [columns[c] for c in present], "exact", diff_notes)]
    coco = results["rows"].get("coco_eval")
    if coco:
        lines.append(
            f"\nCOCO evaluation of {coco['num_images']} images: pycocotools {coco['pycocotools_s']:.2f} s, "
            f"the project's evaluator {coco['evaluator_s']:.2f} s ({coco['speedup']:.1f}x), "
            f"stats equal: {coco['stats_equal']}"
        )
    pipeline = results["rows"].get("pipeline")
    if pipeline:
        decode, tensor = pipeline["decode"], pipeline["tensor_path"]
        decode_speed = decode["decode_jpeg_images_per_cpu_s"] / decode["pil_images_per_cpu_s"]
        train_speed = tensor["tensor_train_images_per_cpu_s"] / tensor["pil_train_images_per_cpu_s"]
        val_speed = tensor["tensor_val_images_per_cpu_s"] / tensor["pil_val_images_per_cpu_s"]
        lines.append(
            f"Data pipeline (JPEG decode + COCO transforms, COCO's image sizes, one worker), per second of CPU time: "
            f"train {pipeline['train_images_per_cpu_s']:.1f} images, val {pipeline['val_images_per_cpu_s']:.1f} "
            f"(of wall time: {pipeline['train_images_per_s']:.1f} and {pipeline['val_images_per_s']:.1f}). "
            f"torchvision instead of PIL: decode_jpeg {decode_speed:.2f}x PIL's decoding speed (equal pixels: "
            f"{decode['equal']}); decode_jpeg + transforms v2 {train_speed:.2f}x (train) and {val_speed:.2f}x (val) "
            f"the PIL path's, equal outputs: {tensor['equal']} (largest difference {tensor['max_abs_diff']:.2g})"
        )
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Run the benchmark from command-line flags; prints the table and writes --output."""
    bargs = get_args_parser().parse_args(argv)
    results = run(bargs)
    print(
        f"\n{results['machine']}, torch {results['torch']}; amp modes in {results['amp_dtype']}; speed as a "
        f"multiple of --exact's (best of {bargs.repeats})\n"
    )
    print(results["table"])
    if bargs.output:
        with open(bargs.output, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwritten to {bargs.output}")
    return results


if __name__ == "__main__":
    main()
