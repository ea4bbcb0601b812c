"""The GPU check: what docs/performance.md needs from a machine with a CUDA GPU, in one command that fits a
10-minute window. On one H100 it is designed to take at most 6 minutes, with DETR-R50 at a COCO-like size
(800x1066); every stage also has its own time limit, and the whole run a budget (--budget_s) that it never exceeds.

    python tools/gpu_check.py --output_dir outputs/gpu_check              # on a CUDA GPU
    python tools/gpu_check.py --device cpu --tiny --output_dir /tmp/check  # every stage on the CPU, tiny (the test)

Stages, each in a process of its own with its own time limit, so that one failure (or a hang) does not stop the
others:
  environment     one line: torch, CUDA, cuDNN, the device, the CPU
  inference       ms per image at batch 1 and 8 (synchronized on CUDA): fp32 (--exact), bf16 and fp16 autocast,
                  --fast (fp32, TF32 allowed)
  train_bfloat16  200 training steps under bfloat16 autocast on four fixed batches of synthetic images (rectangles
                  on noise, COCO-like size): the loss must fall and stay finite
  train_float16   the same under float16 autocast with loss scaling, counting the steps the scaler skipped
  torchrun        main.py under a one-rank torchrun (NCCL on CUDA, gloo on the CPU) on a small synthetic set: an
                  epoch, then a second run with --auto_resume that must continue from the first one's checkpoint
  compiled        --fast --compile under the automatic autocast type, ms per image at batch 1 and 8, the
                  compilation timed apart; it fails where the compiled graphs did not run (util.compile.compile_record)
Each stage reports its peak memory; `memory` gathers them. OUTPUT_DIR/gpu_check.json holds one entry per stage
({ok, seconds, figures, error}); OUTPUT_DIR/<stage>.log what each printed. --tiny: the benchmark's tiny model at
64x64, 30 training steps, and the compiled stage on dynamo's eager backend (graph capture without code generation,
which would take minutes on a CPU).
"""

import argparse
import functools
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# In the order they run: the compilation, the slowest and likeliest to fail, last.
STAGES = ("environment", "inference", "train_bfloat16", "train_float16", "torchrun", "compiled")
# Seconds each stage may take (on an H100 they take a fraction of it; see docs/performance.md).
TIME_LIMITS = {
    "environment": 60,
    "inference": 150,
    "train_bfloat16": 120,
    "train_float16": 120,
    "torchrun": 180,
    "compiled": 300,
}
TINY_MODEL = dict(
    backbone="resnet18", hidden_dim=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=8
)
# --tiny times batches of 2 and 8: a batch of 1 would cost the compiled stage a second graph capture (dynamo
# specializes sizes of 1), which is what the full check measures.
SIZES = {
    "full": dict(
        image=[800, 1066], batches=[1, 8], repeats=5, warmup=1, train_batch=2, steps=200, synthetic=(256, 16, 8)
    ),
    "tiny": dict(image=[64, 64], batches=[2, 8], repeats=1, warmup=0, train_batch=2, steps=12, synthetic=(64, 8, 4)),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DETR GPU check: every stage timed apart, JSON to --output_dir")
    parser.add_argument("--device", default="", help="cuda or cpu (default: cuda where there is one)")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes: every stage in seconds")
    parser.add_argument("--output_dir", required=True, help="gpu_check.json and each stage's log go here")
    parser.add_argument(
        "--budget_s", default=540, type=float, help="seconds for the whole check; a stage gets what is left"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, from {', '.join(STAGES)}")
    parser.add_argument("--stage", default="", help=argparse.SUPPRESS)  # run one stage in this process
    return parser


# ------------------------------------------------------------------------------------------------- the stages


def sizes(args: Namespace) -> Dict[str, Any]:
    return SIZES["tiny" if args.tiny else "full"]


def model_args(args: Namespace) -> Namespace:
    """main.py's flags at their defaults (DETR-R50), random backbone weights (nothing downloaded), on the device;
    with --tiny the tiny sizes."""
    from main import get_args_parser

    values = dict(vars(get_args_parser().parse_args([])), backbone_weights="none", device=args.device)
    if args.tiny:
        values.update(TINY_MODEL)
    return Namespace(**values)


def peak_memory_mb(device) -> float:
    """The stage's peak memory: the GPU's allocated peak on CUDA, the process's resident peak on the CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stage_environment(args: Namespace) -> Dict[str, Any]:
    import torch

    from util.amp import hardware

    device = torch.device(args.device)
    figures = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "hardware": hardware(device),
        "gpus": torch.cuda.device_count(),
    }
    where = figures["hardware"]["name"]
    if device.type == "cuda":
        where += f" (compute capability {figures['hardware']['compute_capability']})"
    figures["line"] = (
        f"torch {figures['torch']}, CUDA {figures['cuda']}, cuDNN {figures['cudnn']}, Python {figures['python']}, "
        f"{device.type}: {where}, {os.cpu_count()} CPU cores"
    )
    print(figures["line"])
    return figures


def build_detr(args: Namespace, seed: int = 0):
    """(model on the device, criterion, main.py's flags) with random weights, the same for every mode."""
    import torch

    from models import build_model

    margs = model_args(args)
    torch.manual_seed(seed)
    model, criterion, _ = build_model(margs)
    return model.to(args.device), criterion.to(args.device), margs


def time_per_image(run: Callable[[Any], Any], images_by_batch, device, args: Namespace) -> Dict[str, float]:
    """{'ms_per_image_b<B>'} for each batch: the median of the repeated synchronized calls after the first (timed
    apart as 'first_call_s_b<B>': where a compiled graph is built) and the warm-up calls."""
    from util.benchmark import time_call

    figures = {}
    for batch, images in images_by_batch.items():
        call = functools.partial(run, images)
        figures[f"first_call_s_b{batch}"] = time_call(call, device)
        for _ in range(sizes(args)["warmup"]):
            time_call(call, device)
        times = sorted(time_call(call, device) for _ in range(sizes(args)["repeats"]))
        figures[f"ms_per_image_b{batch}"] = 1000 * times[len(times) // 2] / batch
    return figures


def inference_images(args: Namespace, device) -> Dict[int, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    return {b: torch.randn(b, 3, *sizes(args)["image"], generator=generator).to(device) for b in sizes(args)["batches"]}


def stage_inference(args: Namespace) -> Dict[str, Any]:
    import copy

    import torch

    from engine import run_model
    from models.fast import enable_fast_path
    from util.amp import autocast_error, set_numeric_policy

    device = torch.device(args.device)
    model, _, _ = build_detr(args)
    model.eval()
    fast_model = enable_fast_path(copy.deepcopy(model)).eval()
    images = inference_images(args, device)
    modes = {  # name: (model, autocast type, --fast)
        "fp32": (model, None, False),
        "bf16": (model, torch.bfloat16, False),
        "fp16": (model, torch.float16, False),
        "fast": (fast_model, None, True),
    }
    figures: Dict[str, Any] = {"size": sizes(args)["image"]}
    set_numeric_policy(fast=False)
    with torch.no_grad():
        smallest = images[min(images)]
        reference = run_model(model, smallest, device)["pred_boxes"]
        for name, (mode_model, dtype, fast) in modes.items():
            error = autocast_error(device, dtype) if dtype is not None else ""
            if error:
                figures[name] = {"skipped": error}
                continue
            set_numeric_policy(fast)

            def run(batch, mode_model=mode_model, dtype=dtype):
                return run_model(mode_model, batch, device, dtype)

            boxes = run(smallest)["pred_boxes"]
            figures[name] = {
                **time_per_image(run, images, device, args),
                "max_box_difference_from_fp32": (boxes - reference).abs().max().item(),
            }
            print(name, json.dumps(figures[name]), flush=True)
    return figures


def synthetic_batches(args: Namespace, count: int = 4, seed: int = 0):
    """`count` fixed batches of images with 2 to 6 bright rectangles on noise, and their targets (cxcywh)."""
    import torch

    from util.misc import nested_tensor_from_tensor_list

    generator = torch.Generator().manual_seed(seed)
    height, width = sizes(args)["image"]
    batches = []
    for _ in range(count):
        images, targets = [], []
        for _ in range(sizes(args)["train_batch"]):
            image = torch.randn(3, height, width, generator=generator) * 0.3
            n = int(torch.randint(2, 7, (1,), generator=generator))
            wh = torch.rand(n, 2, generator=generator) * 0.3 + 0.1
            centre = wh / 2 + torch.rand(n, 2, generator=generator) * (1 - wh)
            labels = torch.randint(1, 10, (n,), generator=generator)
            for (cx, cy), (w, h), label in zip(centre.tolist(), wh.tolist(), labels.tolist()):
                x0, x1 = int((cx - w / 2) * width), int((cx + w / 2) * width)
                y0, y1 = int((cy - h / 2) * height), int((cy + h / 2) * height)
                image[label % 3, y0:y1, x0:x1] += 1.5  # the class shows in the colour
            images.append(image)
            targets.append({"labels": labels, "boxes": torch.cat([centre, wh], 1)})
        batches.append((nested_tensor_from_tensor_list(images), targets))
    return batches


def train_steps(args: Namespace, dtype_name: str) -> Dict[str, Any]:
    """sizes(args)['steps'] training steps under `dtype_name` autocast, as engine.train_one_epoch takes them."""
    import math

    import torch

    from engine import optimizer_step, param_groups, training_losses
    from models.fast import adamw_options
    from util.amp import AMP_DTYPES, autocast_error, make_grad_scaler, set_numeric_policy

    device = torch.device(args.device)
    dtype = AMP_DTYPES[dtype_name]
    error = autocast_error(device, dtype)
    if error:
        raise RuntimeError(f"{dtype_name} autocast cannot run on {device}: {error}")
    set_numeric_policy(fast=False)
    model, criterion, margs = build_detr(args)
    optimizer = torch.optim.AdamW(  # main.py's optimizer
        param_groups(model, margs.lr_backbone),
        lr=margs.lr,
        weight_decay=margs.weight_decay,
        **adamw_options(device, exact=not margs.fast),
    )
    scaler = make_grad_scaler(device, dtype)
    batches = [
        (samples.to(device), [{k: v.to(device) for k, v in t.items()} for t in targets])
        for samples, targets in synthetic_batches(args)
    ]
    model.train()
    losses, skipped, step_times = [], 0, []
    for step in range(sizes(args)["steps"]):
        samples, targets = batches[step % len(batches)]
        start = time.perf_counter()
        _, loss = training_losses(model, criterion, samples, targets, device, dtype)
        value = loss.item()
        if not math.isfinite(value):
            raise AssertionError(f"{dtype_name}: the loss is {value} at step {step}")
        skipped += not optimizer_step(loss, model, optimizer, margs.clip_max_norm, scaler)
        step_times.append(time.perf_counter() - start)
        losses.append(value)
    window = max(len(losses) // 10, len(batches))  # whole rounds of the batches, so that each counts alike
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    non_finite = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    figures = {
        "steps": len(losses),
        "batch": sizes(args)["train_batch"],
        "size": sizes(args)["image"],
        "loss_first": first,
        "loss_last": last,
        "skipped_steps": skipped,
        "ms_per_step_median": 1000 * sorted(step_times)[len(step_times) // 2],
    }
    print(json.dumps(figures), flush=True)
    if non_finite:
        raise AssertionError(f"{dtype_name}: non-finite weights after training: {non_finite[:5]}")
    if not last < first:
        raise AssertionError(f"{dtype_name}: the loss did not fall ({first:.4f} over the first steps, {last:.4f} last)")
    return figures


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_torchrun(args: Namespace) -> Dict[str, Any]:
    """Two one-rank torchrun runs of main.py into one folder: an epoch, then --epochs 2 with --auto_resume."""
    out = Path(args.output_dir) / "torchrun"
    image_size, train_size, val_size = sizes(args)["synthetic"]
    flags = [
        "--dataset_file", "synthetic", "--synthetic_path", str(out / "data"), "--synthetic_train_size",
        str(train_size), "--synthetic_val_size", str(val_size), "--synthetic_image_size", str(image_size),
        "--batch_size", "4", "--num_workers", "0", "--device", args.device, "--output_dir", str(out / "run"),
        "--auto_resume", "--no_plots", "--no_tensorboard",
    ]  # fmt: skip
    if args.tiny:
        flags += [f"--{k}={v}" for k, v in TINY_MODEL.items()] + ["--no_amp", "--no_two_stage"]
    figures: Dict[str, Any] = {}
    for epochs in (1, 2):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), str(REPO_ROOT / "main.py"), *flags, "--epochs", str(epochs),
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True)
        printed = done.stdout + done.stderr
        print(printed[-4000:], flush=True)
        figures[f"run{epochs}_s"] = time.perf_counter() - start
        if done.returncode != 0:
            raise AssertionError(f"torchrun run {epochs} exited with {done.returncode}")
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        if f"backend {backend}" not in printed:
            raise AssertionError(f"run {epochs} did not initialize torch.distributed with {backend}")
    log = [json.loads(line) for line in (out / "run" / "log.txt").read_text().splitlines()]
    figures["logged_epochs"] = [row["epoch"] for row in log]
    if figures["logged_epochs"] != [0, 1]:
        raise AssertionError(f"--auto_resume: log.txt holds epochs {figures['logged_epochs']}, expected [0, 1]")
    figures["backend"] = backend
    figures["peak_memory_mb_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return figures


def stage_compiled(args: Namespace) -> Dict[str, Any]:
    import torch

    from engine import run_model
    from util.compile import compile_counts, compile_record, enable_compile
    from models.fast import enable_fast_path
    from util.amp import choose_amp_dtype, set_numeric_policy

    device = torch.device(args.device)
    model, _, _ = build_detr(args)
    enable_fast_path(model).eval()
    set_numeric_policy(fast=True)
    dtype, why = choose_amp_dtype(device)
    backend = "eager" if args.tiny else "inductor"
    if not enable_compile(model, device, backend):
        raise RuntimeError("torch.compile is unavailable here (see the line above)")
    before = compile_counts()
    with torch.no_grad():
        figures = time_per_image(
            lambda batch: run_model(model, batch, device, dtype),
            inference_images(args, device),
            device,
            args,
        )
    after = compile_counts()
    figures.update(
        backend=backend,
        amp=str(dtype).replace("torch.", "") if dtype else "float32",
        amp_choice=why,
        recompiles=after.get("recompiles", 0) - before.get("recompiles", 0),
        recompile_limit_hits=after.get("recompile_limit_hits", 0) - before.get("recompile_limit_hits", 0),
        fallback=compile_record(model)["fallback"],
    )
    print(json.dumps(figures), flush=True)
    if figures["fallback"] or figures["recompile_limit_hits"] or not after.get("frames_compiled"):
        raise AssertionError(f"the compiled graphs did not run: {figures}")
    return figures


STAGE_FUNCTIONS: Dict[str, Callable[[Namespace], Dict[str, Any]]] = {
    "environment": stage_environment,
    "inference": stage_inference,
    "train_bfloat16": lambda args: train_steps(args, "bfloat16"),
    "train_float16": lambda args: train_steps(args, "float16"),
    "torchrun": stage_torchrun,
    "compiled": stage_compiled,
}


def run_stage(args: Namespace) -> None:
    """--stage NAME: run it in this process and write its figures (and peak memory) to stages/NAME.json."""
    import torch

    figures = STAGE_FUNCTIONS[args.stage](args)
    if args.stage != "torchrun":
        figures["peak_memory_mb"] = peak_memory_mb(torch.device(args.device))
    path = Path(args.output_dir) / "stages" / f"{args.stage}.json"
    path.write_text(json.dumps(figures, indent=1))


# -------------------------------------------------------------------------------------------- the whole check


def run_in_subprocess(name: str, args: Namespace, time_limit: float) -> Dict[str, Any]:
    """One stage in a process of its own (its own session, so that a timeout ends what it started too)."""
    out = Path(args.output_dir)
    command = [sys.executable, __file__, "--stage", name, "--device", args.device, "--output_dir", str(out)]
    command += ["--tiny"] if args.tiny else []
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode: Optional[int] = process.wait(timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
    seconds = time.perf_counter() - start
    figures_file = out / "stages" / f"{name}.json"
    if returncode == 0 and figures_file.exists():
        return {"ok": True, "seconds": seconds, "figures": json.loads(figures_file.read_text())}
    if returncode is None:
        error = f"timed out after {time_limit:.0f} s"
    else:
        lines = [line for line in (out / f"{name}.log").read_text().splitlines() if line.strip()]
        error = f"exit code {returncode}: " + " | ".join(lines[-3:])[-600:]
    return {"ok": False, "seconds": seconds, "error": error}


def memory_summary(stages: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The peak memory each stage reported (MB), and the largest."""
    peaks = {}
    for name, result in stages.items():
        figures = result.get("figures", {})
        peak = figures.get("peak_memory_mb", figures.get("peak_memory_mb_children"))
        if peak is not None:
            peaks[name] = peak
    if not peaks:
        return {"ok": False, "seconds": 0.0, "error": "no stage reported its memory"}
    return {"ok": True, "seconds": 0.0, "figures": {"peak_memory_mb": peaks, "largest_mb": max(peaks.values())}}


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not args.device:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.stage:
        run_stage(args)
        return 0
    chosen = [s for s in args.stages.split(",") if s]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown}; choose from {', '.join(STAGES)}")
    out = Path(args.output_dir)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    results: Dict[str, Any] = {"device": args.device, "tiny": args.tiny, "budget_s": args.budget_s, "stages": {}}
    for name in [s for s in STAGES if s in chosen]:
        left = deadline - time.monotonic()
        if left < 5:
            result = {"ok": False, "seconds": 0.0, "error": f"not run: the {args.budget_s:.0f} s budget was spent"}
        else:
            print(f"[{name}] up to {min(TIME_LIMITS[name], left):.0f} s", flush=True)
            result = run_in_subprocess(name, args, min(TIME_LIMITS[name], left))
        results["stages"][name] = result
        summary = "ok" if result["ok"] else f"FAILED: {result['error']}"
        print(f"[{name}] {summary} ({result['seconds']:.1f} s)", flush=True)
    results["stages"]["memory"] = memory_summary(results["stages"])
    results["seconds"] = sum(r["seconds"] for r in results["stages"].values())
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    failed = [name for name, r in results["stages"].items() if not r["ok"]]
    ok = len(results["stages"]) - len(failed)
    print(
        f"{ok} of {len(results['stages'])} stages ok, {results['seconds']:.0f} s; written to {out / 'gpu_check.json'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
