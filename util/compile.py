"""--compile: a model run through torch.compile, with its weights and state_dict its own, and eager mode as the
fallback wherever compiling is unavailable or fails (with a printed message and a record of why)."""

import shutil
import weakref
from typing import Dict

import torch

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
    """--compile: have call_model run `model` through torch.compile from now on, with dynamic shapes (DETR's
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
    """What call_model calls: `model`, or its compiled twin when enable_compile marked it (or the module
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


def call_model(model: torch.nn.Module, samples):
    """model(samples), through its compiled twin when enable_compile marked it. Where compiling fails, the model
    runs eagerly from then on (stop_compiling) and this call is made again eagerly; a call that hits dynamo's
    recompile limit is said and recorded (compile_record)."""
    forward = forward_function(model)
    if forward is model:
        return model(samples)
    limit_hits = compile_counts().get("recompile_limit_hits", 0)
    try:
        outputs = forward(samples)
    except Exception as e:
        if not stop_compiling(model, e, "forward"):
            raise
        return model(samples)
    _note_recompile_limit(model, limit_hits)
    return outputs
