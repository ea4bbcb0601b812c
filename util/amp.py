"""Mixed precision chosen by the hardware: which autocast type `--amp` runs on this device, and what the machine is.

bfloat16 is fast only where the hardware computes in it (CPUs with AVX-512 BF16 or AMX, CUDA GPUs of compute
capability 8.0 and up); elsewhere torch emulates it, many times slower than fp32. GPUs without bfloat16 (V100, T4)
accelerate float16, which needs loss scaling (torch.amp.GradScaler). docs/performance.md has the measurements.
"""

import argparse
import os
import platform
import warnings
from typing import Dict, Optional, Tuple

import torch

from util.flags import add_switch

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)

# torch's CPU capabilities (torch.backends.cpu.get_cpu_capability()) whose kernels have no bfloat16 arithmetic.
_CPU_KINDS_WITHOUT_BFLOAT16 = ("DEFAULT", "NO AVX", "AVX2")


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instructions torch's CPU kernels use here: 'AVX512', 'AVX2', ... (ATEN_CPU_CAPABILITY lowers it)."""
    return torch.backends.cpu.get_cpu_capability()


def native_dtypes(device: torch.device) -> Tuple[torch.dtype, ...]:
    """The reduced-precision types `device` computes in natively (not emulated)."""
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return (torch.bfloat16, torch.float16) if major >= 8 else (torch.float16,)
    if device.type == "cpu":
        # oneDNN answers for its kernels (ONEDNN_MAX_CPU_ISA lowers it); torch's own for the rest.
        vector_ok = cpu_capability() not in _CPU_KINDS_WITHOUT_BFLOAT16
        native = []
        if vector_ok and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            native.append(torch.bfloat16)
        # float16 is left out even where oneDNN has float16 kernels (AVX512-FP16): their convolution weight
        # gradients run a reference kernel, hundreds of times slower than bfloat16's (docs/performance.md).
        return tuple(native)
    return ()


def autocast_error(device: torch.device, dtype: torch.dtype) -> str:
    """Why `device` cannot run autocast in `dtype` at all ('' when it can): a small matmul is tried."""
    if not torch.amp.is_autocast_available(device.type):
        return f"torch has no autocast for device type {device.type!r}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.autocast(device_type=device.type, dtype=dtype):
                out = torch.ones(2, 2, device=device) @ torch.ones(2, 2, device=device)
    except (RuntimeError, ValueError, AssertionError) as e:
        return str(e).strip().splitlines()[0]
    if out.dtype != dtype:
        said = "; ".join(str(w.message).replace("\n", " ") for w in caught)
        return said or f"autocast on {device.type} did not compute in {dtype}"
    return ""


def choose_amp_dtype(device: torch.device, requested: str = "auto") -> Tuple[Optional[torch.dtype], str]:
    """(the autocast type --amp runs, None for fp32; a line saying what was chosen and why).

    'auto': bfloat16 where the device computes in it, float16 on CUDA GPUs without it, fp32 elsewhere (a CPU
    without bfloat16 emulates both types, slower than fp32). An explicit type the device only emulates runs, with
    a warning; one it cannot run at all raises ValueError naming --amp_dtype."""
    if requested not in AMP_CHOICES:
        raise ValueError(f"--amp_dtype {requested!r}: expected one of {', '.join(AMP_CHOICES)}")
    native = native_dtypes(device)
    where = describe_device(device)
    if requested == "auto":
        if torch.bfloat16 in native:
            return torch.bfloat16, f"--amp: bfloat16 autocast, which {where} computes natively"
        if device.type == "cuda" and torch.float16 in native:
            return torch.float16, (
                f"--amp: float16 autocast with loss scaling, as {where} has no bfloat16 "
                "(--amp_dtype bfloat16 to force it)"
            )
        return None, (
            f"--amp: fp32, since {where} would only emulate bfloat16 and float16, slower than fp32 "
            "(--amp_dtype bfloat16 or float16 forces one)"
        )
    dtype = AMP_DTYPES[requested]
    error = autocast_error(device, dtype)
    if error:
        raise ValueError(
            f"--amp_dtype {requested}: {where} cannot run {requested} autocast ({error}); "
            "use --amp_dtype auto or --no_amp"
        )
    scaling = " with loss scaling" if dtype == torch.float16 else ""
    if dtype not in native:
        lacking = f"no native {requested}"
        if device.type == "cpu" and dtype == torch.float16 and torch.ops.mkldnn._is_mkldnn_fp16_supported():
            lacking = "float16 kernels without the convolutions' weight gradients"
        warnings.warn(
            f"--amp_dtype {requested}: {where} has {lacking}; it runs emulated, usually "
            "slower than fp32 (--amp_dtype auto picks what this device computes natively)",
            stacklevel=2,
        )
        return dtype, f"--amp: {requested} autocast{scaling}, as --amp_dtype asks (emulated on {where})"
    return dtype, f"--amp: {requested} autocast{scaling}, as --amp_dtype asks"


def automatic_choice_is_reduced(device_flag: str) -> bool:
    """Whether --amp_dtype auto computes in 16 bits on the device that --device names (CUDA falls back to the CPU
    where absent, as main.py does): what the synthetic recipes are sized by."""
    device = torch.device(device_flag)
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")
    try:
        return choose_amp_dtype(device)[0] is not None
    except (RuntimeError, AssertionError):  # a device this torch cannot query: size for the slow case
        return False


def set_numeric_policy(fast: bool, deterministic: bool = False) -> str:
    """The process-wide settings of fp32 arithmetic on a GPU, set explicitly whatever torch's defaults are; returns a
    line saying what was set. None of them changes a CPU's results.

    fast False (--exact): TF32 off for matrix products and cuDNN convolutions. cuDNN's default is on for
    convolutions, which on GPUs of compute capability 8.0 and up rounds their inputs to 10 bits of mantissa.
    fast True (--fast): TF32 allowed for both (within float rounding of the exact path's, as the fast path is).
    deterministic (--deterministic): torch's deterministic kernels wherever it has one, cuDNN's deterministic
    convolution algorithms, and a cuBLAS workspace that makes its products repeatable; an operation without a
    deterministic kernel is named in a warning (once) rather than stopping the run."""
    torch.backends.cuda.matmul.allow_tf32 = fast
    torch.backends.cudnn.allow_tf32 = fast
    if deterministic:
        # cuBLAS reads it when it creates its handle, at the first product on a GPU: before any here.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    tf32 = "TF32 allowed (--fast)" if fast else "TF32 off (--exact)"
    kernels = "deterministic kernels (--deterministic)" if deterministic else "torch's default kernels"
    return f"fp32 on a GPU: {tf32}, {kernels}"


@torch.jit.unused  # TorchScript never calls it (the models test torch.jit.is_scripting() first)
def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for `device_type` ('cpu', 'cuda') here: the models' output heads then compute in
    float32 (DETR.output_heads)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch before 2.4 takes no device type
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def make_grad_scaler(device: torch.device, dtype: Optional[torch.dtype]) -> Optional["torch.amp.GradScaler"]:
    """A GradScaler for float16 autocast (its gradients underflow without one), None for bfloat16 and fp32."""
    if dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def describe_device(device: torch.device) -> str:
    """'the CPU (AMD EPYC, AVX512, native bfloat16)' or 'the GPU NVIDIA ... (compute capability 8.0)'."""
    info = hardware(device)
    if device.type == "cuda":
        return f"the GPU {info['name']} (compute capability {info['compute_capability']})"
    if device.type == "cpu":
        bf16 = "native bfloat16" if info["native_bfloat16"] else "no native bfloat16"
        return f"the CPU ({info['name']}, {info['capability']}, {bf16})"
    return f"device {device}"


def hardware(device: torch.device) -> Dict[str, object]:
    """What runs the model: for a CPU its model name, torch's capability and native bfloat16 yes or no; for a
    GPU its name and compute capability (for tools/benchmark.py's table and JSON)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return {
            "device": "cuda",
            "name": torch.cuda.get_device_name(device),
            "compute_capability": f"{major}.{minor}",
            "native_bfloat16": major >= 8,
        }
    return {
        "device": device.type,
        "name": cpu_name(),
        "capability": cpu_capability(),
        "native_bfloat16": torch.bfloat16 in native_dtypes(device),
        "threads": torch.get_num_threads(),
    }


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    """The speed and precision flags, in one argument group; every default keeps the original's numbers."""
    group = parser.add_argument_group("Speed and precision (util/amp.py, models/fast.py)")
    add_switch(
        group,
        "amp",
        "run the forward pass under autocast in the type --amp_dtype picks (losses stay in fp32)",
        "fp32 forward pass",
    )
    group.add_argument(
        "--amp_dtype",
        default="auto",
        choices=AMP_CHOICES,
        help="with --amp: 'auto' takes what the device computes natively (docs/flags.md)",
    )
    add_switch(
        group,
        "channels_last",
        "run the ResNet in the channels-last memory layout (same weights and checkpoints)",
        "the ResNet in the default layout",
    )
    # Measured in docs/performance.md (tools/benchmark.py).
    group.add_argument(
        "--fast",
        action="store_true",
        help="the fast path: folded batch norms, channels-last, fused attention and AdamW; each "
        "step within float rounding of the original's (docs/flags.md)",
    )
    group.add_argument(
        "--exact",
        dest="fast",
        action="store_false",
        help="the bit-exact path: the original DETR's numbers to the last bit (undoes --fast)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="run the model through torch.compile (eager mode, with a message, where it fails)",
    )
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels on a GPU, for reruns equal to the last bit (slower; docs/flags.md)",
    )


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
