"""Explaining a distributed run that stopped because another of its processes died: the error a surviving process
gets names only a socket or a timeout, and the user needs to hear which process to look at and what is kept."""

from pathlib import Path

import torch

import util.misc as utils

# The errors torch.distributed gives a process whose peer died or stopped answering (gloo and NCCL).
LOST_PEER = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "timed out",
    "Timed out",
    "NCCL communicator was aborted",
    "Socket Timeout",
)


def lost_a_peer(error: BaseException) -> bool:
    """Whether `error` is how torch.distributed tells a process that another one of its run was lost. Only once the
    processes had met: a rendezvous that fails says what to check itself."""
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    return joined and any(text in str(error) for text in LOST_PEER)


def explain_lost_process(error: BaseException, output_dir: str) -> str:
    """What to tell a user whose distributed run stopped because another of its processes died."""
    checkpoint = Path(output_dir) / "checkpoint.pth" if output_dir else None
    kept = (
        f"The last checkpoint, {checkpoint}, is intact: rerun with --auto_resume to continue from it."
        if checkpoint is not None and checkpoint.exists()
        else "No checkpoint had been written yet."
    )
    return (
        f"rank {utils.get_rank()} of {utils.get_world_size()}: another process of this run was lost "
        f"({str(error).splitlines()[0][:300]}). Its own log (or torchrun's summary, which names the failed rank) says "
        "why it stopped. " + kept
    )
