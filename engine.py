"""The training and evaluation loops: one epoch of training, one pass of COCO-style evaluation."""

import functools
import math
import os
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

import util.misc as utils
from datasets.coco_eval import CocoEvaluator, per_category_ap
from util.compile import call_model, stop_compiling
from util.console import Console


def to_float32(value):
    """`value` (a model's outputs: tensors in dicts and lists) with every floating tensor in float32."""
    if torch.is_tensor(value):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: to_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_float32(v) for v in value)
    return value


def autocast_dtype(amp) -> Optional[torch.dtype]:
    """The autocast type an `amp` argument asks for: a dtype as it is, True for bfloat16, False or None for none."""
    if amp is True:
        return torch.bfloat16
    return amp or None


def run_model(model: torch.nn.Module, samples, device: torch.device, amp=False):
    """model(samples); with `amp` (an autocast dtype, as util.amp.choose_amp_dtype picks it; True: bfloat16), the
    forward runs under autocast and its outputs come back in float32, so the losses, the matching and the
    post-processing stay in full precision. A model marked by util.compile.enable_compile runs compiled
    (util.compile.call_model)."""
    dtype = autocast_dtype(amp)
    if dtype is None:
        return call_model(model, samples)
    with torch.autocast(device_type=device.type, dtype=dtype):
        outputs = call_model(model, samples)
    return to_float32(outputs)


def optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float = 0,
    scaler: Optional["torch.amp.GradScaler"] = None,
    recompute: Optional[Callable[[], Tuple[Dict[str, torch.Tensor], torch.Tensor]]] = None,
) -> Union[bool, torch.Tensor]:
    """Backward, gradient clipping at `max_norm` (0: none) and the optimizer's step; returns whether the step was
    taken (True, or with a scaler a bool tensor on the device). With a GradScaler (float16) the loss is scaled
    for the backward pass and the gradients unscaled before clipping, and a step whose gradients overflowed is
    skipped: the weights stay, the scale is lowered.
    `recompute`: the step's (loss terms, weighted loss) computed again, as training_losses gives them, for a model
    run by --compile whose compiled backward fails: the model then runs eagerly (stop_compiling), and the step is
    taken from its eager forward pass."""
    try:
        return _optimizer_step(loss, model, optimizer, max_norm, scaler)
    except Exception as e:
        if recompute is None or not stop_compiling(model, e, "backward"):
            raise
    return _optimizer_step(recompute()[1], model, optimizer, max_norm, scaler)


def _optimizer_step(
    loss: torch.Tensor,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    max_norm: float,
    scaler: Optional["torch.amp.GradScaler"],
) -> Union[bool, torch.Tensor]:
    optimizer.zero_grad()  # also the gradients a failed backward pass may have left
    if scaler is None:
        loss.backward()
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        return True
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # The scale as the device holds it: get_scale() would read it to the host, waiting for the GPU.
    scale = scaler._get_scale_async().clone()
    scaler.step(optimizer)  # skipped when a gradient is inf or nan
    scaler.update()
    # update() lowers the scale exactly when this step found a non-finite gradient and was skipped.
    return scaler._get_scale_async() >= scale


def param_groups(model: torch.nn.Module, lr_backbone: float) -> List[Dict[str, Any]]:
    """DETR's two AdamW parameter groups, as the original builds them: the trainable parameters outside the
    backbone (at the optimizer's lr), and the backbone's at `lr_backbone`."""
    return [
        {"params": [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]},
        {"params": [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad], "lr": lr_backbone},
    ]


def training_losses(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    samples,
    targets: List[Dict[str, torch.Tensor]],
    device: torch.device,
    amp=False,
) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
    """(the criterion's loss terms, their weighted sum) for one training batch: the forward pass (run_model, the
    batch's targets reaching a model that builds queries from them) and the criterion."""
    with utils.training_targets(model, targets):
        outputs = run_model(model, samples, device, amp)
    loss_dict = criterion(outputs, targets)
    return loss_dict, sum(loss_dict[k] * criterion.weight_dict[k] for k in loss_dict if k in criterion.weight_dict)


def train_one_epoch(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    epoch: int,
    max_norm: float = 0,
    amp=False,
    ema=None,
    scaler: Optional["torch.amp.GradScaler"] = None,
    log_step: Optional[Callable[[int, Dict[str, float]], None]] = None,
    console: Optional[Console] = None,
) -> Dict[str, float]:
    """Train for one pass over data_loader; returns the epoch averages of every logged value.
    `amp`: the autocast type of the forward pass (see run_model); off, the steps are plain fp32.
    `ema`: a util.ema.ModelEMA of the model, updated after every step.
    `scaler`: a GradScaler (float16 autocast): the loss is scaled for the backward pass, and a step whose gradients
    overflowed is skipped (the weights untouched, the scale lowered); the count is returned as 'skipped_steps'.
    `log_step(i, values)`: called at every step that is printed (every 10th and the last) with the step's index in
    the epoch and its own values (losses, class_error, lr), e.g. to write them to TensorBoard.
    `console`: what is printed (util.console; the original's MetricLogger lines by default)."""
    model.train()
    criterion.train()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    console = console or Console()
    print_freq = 10
    skipped_steps = 0

    for i, (samples, targets) in enumerate(console.training_steps(metric_logger, data_loader, print_freq, epoch)):
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]

        loss_dict, losses = training_losses(model, criterion, samples, targets, device, amp)
        weight_dict = criterion.weight_dict

        # Logged values are averaged over processes; the gradient step uses this process's loss only.
        loss_dict_reduced = utils.reduce_dict(loss_dict)
        loss_dict_reduced_unscaled = {f"{k}_unscaled": v for k, v in loss_dict_reduced.items()}
        loss_dict_reduced_scaled = {k: v * weight_dict[k] for k, v in loss_dict_reduced.items() if k in weight_dict}
        loss_value = sum(loss_dict_reduced_scaled.values()).item()

        if not math.isfinite(loss_value):
            # Stop before the step: the weights (and the last checkpoint on disk) stay as they were.
            print(f"Loss is {loss_value}, stopping training")
            print({k: v.item() for k, v in loss_dict_reduced.items()})
            first = next((k for k, v in loss_dict_reduced_scaled.items() if not math.isfinite(v.item())), None)
            print(
                f"The first non-finite term is {first} (epoch {epoch}); the weights and the last checkpoint "
                "are as they were before this step."
            )
            if scaler is not None:
                # Loss scaling guards the gradients; a forward pass that overflows float16 is beyond it.
                print(
                    "The forward pass ran in float16: --amp_dtype bfloat16 (where the device has it) or "
                    "--no_amp keeps its activations in range."
                )
            sys.exit(1)

        again = functools.partial(training_losses, model, criterion, samples, targets, device, amp)
        taken = optimizer_step(losses, model, optimizer, max_norm, scaler, recompute=again)
        if scaler is not None:
            skipped_steps = skipped_steps + (~taken).int()  # counted on the device, read once at the end
        if ema is not None:
            ema.update(model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model)

        metric_logger.update(loss=loss_value, **loss_dict_reduced_scaled, **loss_dict_reduced_unscaled)
        metric_logger.update(class_error=loss_dict_reduced["class_error"])
        metric_logger.update(lr=optimizer.param_groups[0]["lr"])
        if log_step is not None and (i % print_freq == 0 or i == len(data_loader) - 1):  # the printed steps
            metric_logger.flush()  # every meter read in one copy, which the printed line then uses too
            log_step(i, {k: meter.value for k, meter in metric_logger.meters.items()})

    metric_logger.synchronize_between_processes()
    console.averaged(metric_logger, epoch)
    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    if scaler is not None:
        skipped_steps = int(skipped_steps)
        stats["skipped_steps"] = skipped_steps
        stats["loss_scale"] = scaler.get_scale()
        if skipped_steps:
            print(f"Epoch {epoch}: {skipped_steps} step(s) skipped by the float16 loss scaler (gradients overflowed)")
    return stats


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    postprocessors: Dict,
    data_loader: Iterable,
    base_ds,
    device: torch.device,
    output_dir: Optional[str],
    amp=False,
    console: Optional[Console] = None,
):
    """Losses and COCO metrics (bbox, segm, PQ as the postprocessors allow) over data_loader.

    Returns (stats, coco_evaluator): stats holds the averaged losses plus coco_eval_bbox / coco_eval_masks
    (the 12 COCOeval stats) and PQ_all / PQ_th / PQ_st where they apply; coco_evaluator.per_class holds the
    results per category (see per_class_results). `console`: what is printed (util.console; the original's lines
    by default).
    """
    model.eval()
    criterion.eval()
    metric_logger = utils.MetricLogger(delimiter="  ")
    metric_logger.add_meter("class_error", utils.SmoothedValue(window_size=1, fmt="{value:.2f}"))
    console = console or Console()

    iou_types = tuple(k for k in ("segm", "bbox") if k in postprocessors)
    coco_evaluator = CocoEvaluator(base_ds, iou_types)

    panoptic_evaluator = None
    if "panoptic" in postprocessors:
        from datasets.panoptic_eval import PanopticEvaluator

        panoptic_evaluator = PanopticEvaluator(
            data_loader.dataset.ann_file,
            data_loader.dataset.ann_folder,
            output_dir=os.path.join(output_dir or "", "panoptic_eval"),
        )

    for samples, targets in console.evaluation_steps(metric_logger, data_loader, 10):
        samples = samples.to(device, non_blocking=True)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]

        outputs = run_model(model, samples, device, amp)
        loss_dict = criterion(outputs, targets)
        weight_dict = criterion.weight_dict

        loss_dict_reduced = utils.reduce_dict(loss_dict)
        loss_dict_reduced_scaled = {k: v * weight_dict[k] for k, v in loss_dict_reduced.items() if k in weight_dict}
        loss_dict_reduced_unscaled = {f"{k}_unscaled": v for k, v in loss_dict_reduced.items()}
        metric_logger.update(
            loss=sum(loss_dict_reduced_scaled.values()), **loss_dict_reduced_scaled, **loss_dict_reduced_unscaled
        )
        metric_logger.update(class_error=loss_dict_reduced["class_error"])

        orig_target_sizes = torch.stack([t["orig_size"] for t in targets], dim=0)
        results = postprocessors["bbox"](outputs, orig_target_sizes)
        if "segm" in postprocessors:
            target_sizes = torch.stack([t["size"] for t in targets], dim=0)
            results = postprocessors["segm"](results, outputs, orig_target_sizes, target_sizes)
        coco_evaluator.update({t["image_id"].item(): r for t, r in zip(targets, results)})

        if panoptic_evaluator is not None:
            target_sizes = torch.stack([t["size"] for t in targets], dim=0)
            res_pano = postprocessors["panoptic"](outputs, target_sizes, orig_target_sizes)
            for i, target in enumerate(targets):
                image_id = target["image_id"].item()
                res_pano[i]["image_id"] = image_id
                res_pano[i]["file_name"] = f"{image_id:012d}.png"
            panoptic_evaluator.update(res_pano)

    metric_logger.synchronize_between_processes()
    console.averaged(metric_logger)
    coco_evaluator.synchronize_between_processes()
    coco_evaluator.accumulate()
    coco_evaluator.summarize()
    panoptic_res = None
    if panoptic_evaluator is not None:
        panoptic_evaluator.synchronize_between_processes()
        panoptic_res = panoptic_evaluator.summarize()

    stats = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    if "bbox" in postprocessors:
        stats["coco_eval_bbox"] = coco_evaluator.coco_eval["bbox"].stats.tolist()
    if "segm" in postprocessors:
        stats["coco_eval_masks"] = coco_evaluator.coco_eval["segm"].stats.tolist()
    if panoptic_res is not None:
        stats["PQ_all"] = panoptic_res["All"]
        stats["PQ_th"] = panoptic_res["Things"]
        stats["PQ_st"] = panoptic_res["Stuff"]
    names = {int(k): v["name"] for k, v in coco_evaluator.coco_gt.cats.items()}
    if panoptic_evaluator is not None:
        names.update(panoptic_evaluator.category_names)
    # Kept beside the evaluation rather than in stats: stats is what log.txt holds, and its keys stay the original's.
    coco_evaluator.per_class = per_class_results(coco_evaluator, panoptic_res, names)
    return stats, coco_evaluator


def per_class_results(
    coco_evaluator: CocoEvaluator, panoptic_res: Optional[dict], names: Dict[int, str]
) -> Dict[str, List[dict]]:
    """{'bbox': [{'id', 'name', 'AP', 'AP50', 'AP75'} per category], 'segm' likewise with masks, 'panoptic':
    [{'id', 'name', 'PQ', 'SQ', 'RQ'}] with panoptic results}. A category without ground truth has AP None."""
    results = {}
    for iou_type, coco_eval in coco_evaluator.coco_eval.items():
        if getattr(coco_eval, "eval", None):
            per_category = per_category_ap(coco_eval.eval)
            results[iou_type] = [{"id": k, "name": names.get(k, str(k)), **v} for k, v in per_category.items()]
    if panoptic_res is not None and "per_class" in panoptic_res:
        results["panoptic"] = [
            {
                "id": int(k),
                "name": names.get(int(k), str(k)),
                "PQ": float(v["pq"]),
                "SQ": float(v["sq"]),
                "RQ": float(v["rq"]),
            }
            for k, v in sorted(panoptic_res["per_class"].items(), key=lambda kv: int(kv[0]))
        ]
    return results


def per_class_table(per_class: Dict[str, List[dict]]) -> str:
    """The per-category results as a text table: one row per category, AP / AP50 / AP75 (x100) per iou type
    and PQ / SQ / RQ (x100) for panoptic results; '-' where a category has no ground truth."""
    columns = [
        (kind, stat) for kind, rows in per_class.items() if rows for stat in rows[0] if stat not in ("id", "name")
    ]
    rows_by_id: Dict[int, Dict] = {}
    for kind, rows in per_class.items():
        for row in rows:
            entry = rows_by_id.setdefault(row["id"], {"name": row["name"]})
            entry.update({(kind, k): v for k, v in row.items() if k not in ("id", "name")})
    width = max([len(e["name"]) for e in rows_by_id.values()] + [8])
    heads = [f"{kind if kind != 'panoptic' else 'pano'} {stat}" for kind, stat in columns]
    lines = [f"{'category':<{width}}  " + "  ".join(f"{h:>10}" for h in heads)]
    for cat_id in sorted(rows_by_id):
        entry = rows_by_id[cat_id]
        cells = [entry.get(column) for column in columns]
        lines.append(
            f"{entry['name']:<{width}}  "
            + "  ".join(f"{100 * v:10.1f}" if v is not None else f"{'-':>10}" for v in cells)
        )
    return "\n".join(lines)
