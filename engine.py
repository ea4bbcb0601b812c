"""The training and evaluation loops: one epoch of training, one pass of COCO-style evaluation."""

import functools
import math
import os
import shutil
import sys
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

import util.misc as utils
from datasets.coco_eval import CocoEvaluator, per_category_ap
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


# --compile: the models marked by enable_compile, each with its torch.compile'd twin (which shares its weights).
# Kept here rather than on the model so that copies of it (the --ema_decay average) get their own twin, and
# state_dict keys stay unprefixed.
_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def compile_unavailable_reason(device: torch.device) -> str:
    """Why torch.compile cannot run on `device` here ('' when it can)."""
    if not hasattr(torch, "compile"):
        return f"this torch ({torch.__version__}) has no torch.compile"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "no C++ compiler (g++, c++ or clang++) on PATH, which inductor needs for CPU kernels"
    return ""


def enable_compile(model: torch.nn.Module, device: torch.device, backend: str = "inductor") -> bool:
    """--compile: have run_model call `model` through torch.compile from now on, with dynamic shapes (DETR's
    batches change size at every step: one graph for all sizes instead of a recompilation per size). Returns
    False, with a printed message, where compile is unavailable; the model then runs eagerly. `backend`: torch.compile's
    ('eager' captures the graphs without generating code: seconds instead of minutes, for checks of the plumbing)."""
    reason = compile_unavailable_reason(device)
    if reason:
        print(f"--compile: {reason}; running without compiling")
        return False
    # Plain attributes: deep copies (the EMA) inherit them and are compiled on their own first call.
    model.compile_forward = True
    model.compile_backend = backend
    return True


def forward_function(model: torch.nn.Module):
    """What run_model calls: `model`, or its compiled twin when enable_compile marked it (or the module
    that DistributedDataParallel wraps)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not getattr(inner, "compile_forward", False):
        return model
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(model, dynamic=True, backend=getattr(inner, "compile_backend", "inductor"))
    return _COMPILED[model]


def _is_compile_error(error: Exception) -> bool:
    """Whether `error` came from dynamo or inductor, rather than from the model's own code."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def compile_counts() -> Dict[str, int]:
    """torch.compile's tallies in this process so far, from dynamo's own counters (internal, so read with care):
    frames compiled, frames it gave up on (they run eagerly), recompilations (a frame's compilations after its
    first: new shapes or modes its guards reject) and recompile-limit hits (the frame then runs eagerly for every
    input its compiled graphs do not fit). {} where torch has no dynamo."""
    try:
        from torch._dynamo import convert_frame
        from torch._dynamo.utils import counters
    except ImportError:
        return {}
    per_frame = getattr(convert_frame, "FRAME_COMPILE_COUNTER", {})
    return {
        "frames_compiled": counters["frames"]["ok"],
        "frames_failed": counters["frames"]["total"] - counters["frames"]["ok"],
        "recompiles": sum(max(n - 1, 0) for n in per_frame.values()),
        "recompile_limit_hits": sum(
            # The reason's wording: torch 2.6 and later, and the older one.
            n
            for reason, n in counters["unimplemented"].items()
            if "recompile limit" in reason or "cache_size_limit" in reason
        ),
    }


def compile_record(model: torch.nn.Module) -> Dict[str, object]:
    """What --compile did with `model` (or the module DistributedDataParallel wraps): 'fallback', why it runs
    eagerly now (None while compiled), and 'recompile_limit_hits', the calls that hit dynamo's recompile limit."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if "compile_record" not in vars(inner):
        inner.compile_record = {"fallback": None, "recompile_limit_hits": 0}
    return inner.compile_record


def stop_compiling(model: torch.nn.Module, error: Exception, where: str) -> bool:
    """After `error` in the compiled twin's `where` pass ('forward' or 'backward'): when `model` runs compiled and
    the error came from dynamo or inductor, run it eagerly from now on, saying so and recording why
    (compile_record), and return True; False otherwise (the error is the model's own: raise it)."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if not getattr(inner, "compile_forward", False) or not _is_compile_error(error):
        return False
    inner.compile_forward = False
    why = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}" if str(error).strip() else ""
    compile_record(model)["fallback"] = f"torch.compile failed in the {where} pass ({why or type(error).__name__})"
    print(f"--compile: {compile_record(model)['fallback']}; running without compiling")
    return True


def _note_recompile_limit(model: torch.nn.Module, hits_before: int) -> None:
    """Record the calls that hit dynamo's recompile limit (they ran eagerly), and say so at the first one."""
    new_hits = compile_counts().get("recompile_limit_hits", 0) - hits_before
    if new_hits <= 0:
        return
    record = compile_record(model)
    if not record["recompile_limit_hits"]:
        print(
            f"--compile: torch.compile reached its recompile limit ({_recompile_limit()} compilations of a "
            "function); inputs its compiled graphs do not fit now run eagerly "
            '(TORCH_LOGS="recompiles" shows why it recompiled)'
        )
    record["recompile_limit_hits"] += new_hits


def _recompile_limit() -> int:
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or config.cache_size_limit  # the older name


def autocast_dtype(amp) -> Optional[torch.dtype]:
    """The autocast type an `amp` argument asks for: a dtype as it is, True for bfloat16, False or None for none."""
    if amp is True:
        return torch.bfloat16
    return amp or None


def run_model(model: torch.nn.Module, samples, device: torch.device, amp=False):
    """model(samples); with `amp` (an autocast dtype, as util.amp.choose_amp_dtype picks it; True: bfloat16), the
    forward runs under autocast and its outputs come back in float32, so the losses, the matching and the
    post-processing stay in full precision. A model marked by enable_compile runs compiled, and eagerly from
    then on if compiling fails (with a message); a call that hits dynamo's recompile limit is said and recorded
    (compile_record)."""
    forward = forward_function(model)
    compiled = forward is not model
    limit_hits = compile_counts().get("recompile_limit_hits", 0) if compiled else 0
    dtype = autocast_dtype(amp)
    try:
        if dtype is not None:
            with torch.autocast(device_type=device.type, dtype=dtype):
                outputs = forward(samples)
        else:
            outputs = forward(samples)
    except Exception as e:
        if not compiled or not stop_compiling(model, e, "forward"):
            raise
        return run_model(model, samples, device, amp)
    if compiled:
        _note_recompile_limit(model, limit_hits)
    return to_float32(outputs) if dtype is not None else outputs


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
