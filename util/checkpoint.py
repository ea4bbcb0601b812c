"""Loading checkpoints safely, and fitting their state_dicts to a model with errors that say what differs."""
import argparse
import os
import pickle
import re
import zipfile
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn


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
            raise CheckpointError(f"checkpoint {path} is cut short ({size} bytes, the end of the file is missing), "
                                  "as a full disk or a killed copy leaves it")
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
        raise CheckpointError(f"checkpoint {path} is damaged: its part {bad!r} no longer matches the checksum "
                              "written with it (bad storage or a corrupted copy)")


def load_checkpoint(path_or_url: str, map_location="cpu", check_hash: bool = False) -> dict:
    """torch.load with weights_only=True (no arbitrary code from the file), allowing the argparse.Namespace
    that DETR checkpoints carry under 'args'. A URL is fetched through torch.hub's cache. A local file is
    checked first (check_checkpoint_file); every problem raises CheckpointError naming the file."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        if str(path_or_url).startswith(("http://", "https://")):
            try:
                return torch.hub.load_state_dict_from_url(path_or_url, map_location=map_location,
                                                          check_hash=check_hash, weights_only=True)
            except OSError as e:  # URLError and friends: no network, unknown host, ...
                file_name = os.path.basename(path_or_url)
                cached = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
                raise RuntimeError(
                    f"could not download {path_or_url} ({type(e).__name__}: {e}). To use a local copy, put the "
                    f"file at {cached} (torch.hub's cache; set TORCH_HOME to move it), or pass its path "
                    "instead of the URL (--resume PATH, or pretrained=PATH for the hub entry points).") from e
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f"checkpoint {path_or_url!r} does not exist")
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
                "it was run. Load only files you trust; a DETR checkpoint needs no such objects.") from e
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
    mismatched = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    return missing, unexpected, mismatched


def load_state_dict_checked(model: nn.Module, state_dict: Dict[str, Tensor], source: str = "checkpoint") -> None:
    """load_state_dict(strict=True), but a mismatch raises one error listing every offending key."""
    missing, unexpected, mismatched = compare_state_dict(model, state_dict)
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")
                lines.append(f"  {title}: {shown}")
        if any(k.startswith("class_embed") or ".class_embed" in k for k in mismatched):
            lines.append("  (the class head differs: set --num_classes to the checkpoint's, or fine-tune with "
                         "--finetune to re-initialize the mismatched head)")
        raise ValueError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def load_state_dict_for_finetuning(model: nn.Module, state_dict: Dict[str, Tensor],
                                   source: str = "checkpoint") -> List[str]:
    """Load every parameter whose key and shape match; keep the model's own (fresh) values for those whose
    shapes differ, e.g. a class head of another size. Returns and prints the keys left re-initialized."""
    missing, unexpected, mismatched = compare_state_dict(model, state_dict)
    if missing or unexpected:
        raise ValueError(f"{source} is not a checkpoint of this architecture: missing keys {missing[:20]}, "
                         f"unexpected keys {unexpected[:20]}")
    own = model.state_dict()
    reinit = [k for k in own if state_dict[k].shape != own[k].shape]
    merged = {k: (own[k] if k in reinit else state_dict[k]) for k in own}
    model.load_state_dict(merged, strict=True)
    if reinit:
        print(f"Loaded {source}; re-initialized because their shapes differ: " + "; ".join(mismatched))
    return reinit
