"""Checkpoints: reading them safely, writing them atomically, resuming a run exactly (weights, generators, log),
and fitting their state_dicts to a model with errors that say what differs."""

import argparse
import contextlib
import json
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from util import misc as utils
from util.config import architecture_flags, complete_args
from util.hf import HFFolderError, read_hf_folder


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: cut short, damaged, or holding more than tensors and containers."""


def check_checkpoint_file(path) -> None:
    """Raise CheckpointError naming `path` if the file is empty, cut short (a full disk, a killed copy) or no
    longer holds the bytes it was written with (bad storage): torch.load notices the first two only where it
    happens to read, and loads flipped bits in tensor data silently, so the zip's CRC-32s are checked here."""
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes), as a full disk or a killed copy leaves it")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):  # a zip (torch's format since 1.6) whose end, the directory, is missing
            raise CheckpointError(
                f"checkpoint {path} is cut short ({size} bytes, the end of the file is missing), "
                "as a full disk or a killed copy leaves it"
            )
        return  # torch's older non-zip format: torch.load checks what it can
    try:
        with zipfile.ZipFile(path) as archive:
            # torch.save(..., compute_crc32=False) writes zeros; there is nothing to compare then.
            if all(info.CRC == 0 for info in archive.infolist() if info.file_size):
                return
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({type(e).__name__}: {e})") from e
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: its part {bad!r} no longer matches the checksum "
            "written with it (bad storage or a corrupted copy)"
        )


@contextlib.contextmanager
def safe_globals(allowed: list):
    """torch.serialization.safe_globals: within it, weights_only loads may also rebuild the objects `allowed`. An
    entry may be an (object, 'module.name') pair, for an object saved under another name; torch reads such pairs
    from 2.6 on, and older ones leave them out. torch 2.4 has no context manager: add_safe_globals, undone on exit."""
    if torch.__version__ < (2, 6):
        allowed = [entry for entry in allowed if not isinstance(entry, tuple)]
    if hasattr(torch.serialization, "safe_globals"):
        with torch.serialization.safe_globals(allowed):
            yield
        return
    before = list(torch.serialization.get_safe_globals())
    torch.serialization.add_safe_globals(allowed)
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def load_checkpoint(path_or_url: str, map_location="cpu", check_hash: bool = False) -> dict:
    """torch.load with weights_only=True (no arbitrary code from the file), allowing the argparse.Namespace
    that DETR checkpoints carry under 'args'. A URL is fetched through torch.hub's cache. A local file is
    checked first (check_checkpoint_file); every problem raises CheckpointError naming the file. A folder is read
    as a Hugging Face DETR model folder (config.json + model.safetensors), converted in memory (util/hf.py)."""
    if not str(path_or_url).startswith(("http://", "https://")) and os.path.isdir(path_or_url):
        return read_hf_folder(path_or_url)
    with safe_globals([argparse.Namespace]):
        if str(path_or_url).startswith(("http://", "https://")):
            try:
                return torch.hub.load_state_dict_from_url(
                    path_or_url, map_location=map_location, check_hash=check_hash, weights_only=True
                )
            except OSError as e:  # URLError and friends: no network, unknown host, ...
                file_name = os.path.basename(path_or_url)
                cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
                raise RuntimeError(
                    f"could not download {path_or_url} ({type(e).__name__}: {e}). To use a local copy, put the "
                    f"file at {cached} (torch.hub's cache; set TORCH_HOME to move it), or pass its path "
                    "instead of the URL (--resume PATH, or pretrained=PATH for the hub entry points)."
                ) from e
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(
                f"checkpoint {path_or_url!r} does not exist (a checkpoint file, or a Hugging Face model folder)"
            )
        check_checkpoint_file(path_or_url)
        try:
            return torch.load(path_or_url, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses any Python object it does not know before creating it: nothing of the
            # file's own code has run. torch's first line names the object.
            found = re.search(r"GLOBAL [\w.]+ |Unsupported operand \S+", str(e))
            reason = found.group(0).strip() if found else type(e).__name__
            raise CheckpointError(
                f"could not read checkpoint {path_or_url!r}: refused, it holds Python objects beyond tensors and "
                f"containers, which could run code when loaded (Weights only load failed: {reason}). Nothing in "
                "it was run. Load only files you trust; a DETR checkpoint needs no such objects."
            ) from e
        except Exception as e:
            raise CheckpointError(f"could not read checkpoint {path_or_url!r}: {type(e).__name__}: {e}") from e


def model_state_from(checkpoint, source: str = "checkpoint") -> Dict[str, Tensor]:
    """The model state_dict inside a checkpoint dict (its 'model' entry), or the dict itself if it is one."""
    if isinstance(checkpoint, dict) and "model" in checkpoint:
        return checkpoint["model"]
    if isinstance(checkpoint, dict) and all(isinstance(v, Tensor) for v in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{source} holds no 'model' state_dict (keys: {sorted(checkpoint)[:10]})")


def compare_state_dict(model: nn.Module, state_dict: Dict[str, Tensor]) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: checkpoint shape vs model shape' for shape mismatches)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own and not k.endswith("num_batches_tracked")]
    mismatched = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
        for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    return missing, unexpected, mismatched


def load_state_dict_checked(model: nn.Module, state_dict: Dict[str, Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict=True), but a mismatch raises one error listing every offending key."""
    missing, unexpected, mismatched = compare_state_dict(model, state_dict)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title}: {shown}")
        if any(k.startswith("class_embed") or ".class_embed" in k for k in mismatched):
            lines.append(
                "  (the class head differs: set --num_classes to the checkpoint's, or fine-tune with "
                "--finetune to re-initialize the mismatched head)"
            )
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_state_dict_for_finetuning(
    model: nn.Module, state_dict: Dict[str, Tensor], source: str = "checkpoint"
) -> List[str]:
    """Load every parameter whose key and shape match; keep the model's own (fresh) values for those whose
    shapes differ, e.g. a class head of another size. Returns and prints the keys left re-initialized."""
    missing, unexpected, mismatched = compare_state_dict(model, state_dict)
    if missing or unexpected:
        raise ValueError(
            f"{source} is not a checkpoint of this architecture: missing keys {missing[:20]}, "
            f"unexpected keys {unexpected[:20]}"
        )
    own = model.state_dict()
    reinit = [k for k in own if state_dict[k].shape != own[k].shape]
    merged = {k: (own[k] if k in reinit else state_dict[k]) for k in own}
    model.load_state_dict(merged, strict=True)
    if reinit:
        print(f"Loaded {source}; re-initialized because their shapes differ: " + "; ".join(mismatched))
    return reinit


# Writing, and resuming a run --------------------------------------------------------------------------------------


def read_checkpoint(flag: str, path: str) -> dict:
    """load_checkpoint, stopping with a message that names the flag and the file when it cannot be used."""
    try:
        return load_checkpoint(path)
    except (CheckpointError, HFFolderError) as e:
        raise SystemExit(f"{flag}: {e}") from None


def save_checkpoint(checkpoint: dict, path: Path) -> None:
    """Write a checkpoint atomically; a failed write (a full disk) stops the run and leaves the previous file."""
    try:
        utils.save_on_master(checkpoint, path)
    except OSError as e:
        kept = f"the previous {path} is intact" if path.exists() else f"no earlier {path.name} existed"
        raise SystemExit(
            f"could not write checkpoint {path} ({e}); {kept}. Free some space (or fix the folder) "
            "and rerun with --auto_resume to continue from the last saved epoch."
        ) from e


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
        way_out = (
            f"The newest intact checkpoint of this run is {intact[0]}: resume from it with --resume "
            f"{intact[0]}, or move {latest} away to start again."
            if intact
            else f"No intact copy of an earlier epoch is in {output_dir}: move {latest} away to start again."
        )
        raise SystemExit(f"--auto_resume: {e}. Nothing was overwritten. {way_out}") from None
    print(f"--auto_resume: resuming from {latest}")
    return str(latest)


def architecture_differences(saved_args, args) -> List[str]:
    """'--flag: checkpoint X, this run Y' for every flag that defines the network (util.config.architecture_flags)
    whose value differs between the args a checkpoint was trained with and this run's. A flag the checkpoint
    predates is at its default, the network it was trained with; one it leaves open (None, as --num_classes
    without a value) is not compared."""
    if not isinstance(saved_args, argparse.Namespace):
        return []  # a plain state_dict records no flags: its weights are checked when they load
    saved_args = complete_args(saved_args)
    aliases = {"v2": "sine", "v3": "learned"}  # the original's old names of the position encodings
    differences = []
    for name in architecture_flags():
        saved, current = getattr(saved_args, name), getattr(args, name)
        if saved is None:
            continue
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


# The best epoch ----------------------------------------------------------------------------------------------------

# A stat of log.txt: a key ('test_loss'), an entry of a list ('test_coco_eval_bbox[0]') or a field of a dict
# ('test_PQ_all.pq').
LOGGED_STAT = re.compile(r"(\w+?)(?:\[(\d+)\]|\.(\w+))?")


def logged_stat(row: dict, name: str) -> float:
    """The value of the stat `name` (see LOGGED_STAT) in a log.txt row; ValueError saying what is missing."""
    match = LOGGED_STAT.fullmatch(name)
    if match is None:
        raise ValueError(
            f"{name!r} is not a logged stat: expected KEY, KEY[INDEX] or KEY.FIELD, e.g. "
            "test_coco_eval_bbox[0] or test_PQ_all.pq"
        )
    key, index, field = match.groups()
    if key not in row:
        raise ValueError(f"log.txt has no key {key!r}; its keys are {', '.join(sorted(row))}")
    value = row[key]
    try:
        if index is not None:
            value = value[int(index)]
        elif field is not None:
            value = value[field]
        return float(value)
    except (IndexError, KeyError, TypeError, ValueError):
        raise ValueError(f"{name!r}: log.txt's {key} is {value!r}") from None


def improves(value: float, best, name: str) -> bool:
    """Whether `value` of the stat `name` beats the `best` record ({'value', ...} or None): losses and errors
    improve downwards, everything else (AP, AR, PQ) upwards."""
    if best is None:
        return True
    lower_is_better = "loss" in name or "error" in name
    return value < best["value"] if lower_is_better else value > best["value"]


# The random generators -------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every random generator training draws from, so a resumed run continues exactly where it stopped."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
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
        print(
            f"--resume: the checkpoint holds the random states of {len(states)} process(es) but this run has "
            f"{utils.get_world_size()}; continuing with freshly seeded generators instead"
        )
        return
    set_rng_state(states[utils.get_rank()])
