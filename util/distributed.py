"""What a model needs to train in several processes (torch.distributed), and the flags of the processes' group
beside the original's --world_size and --dist_url."""

import argparse
import inspect
from typing import Dict

import torch


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """The flags of launchers and of waiting for the other processes."""
    group = parser.add_argument_group("Distributed training: launchers and timeouts (util/distributed.py)")
    # python -m torch.distributed.launch without --use_env passes --local-rank=N (--local_rank before torch 2.0).
    # The ranks are read from LOCAL_RANK, RANK and WORLD_SIZE, which the launcher sets either way.
    group.add_argument(
        "--local_rank",
        "--local-rank",
        default=None,
        type=int,
        help="accepted from torch.distributed.launch and ignored: the rank comes from LOCAL_RANK",
    )
    group.add_argument(
        "--dist_timeout",
        default=1800,
        type=int,
        help="seconds to wait for the other processes (rendezvous, collectives) before failing",
    )


def synchronize_batch_norms(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` for a distributed run: on CUDA its trainable batch norms (--backbone_norm batch) become SyncBatchNorm,
    which normalizes by the statistics of the whole global batch, as one GPU given that batch would. On the CPU they
    stay: SyncBatchNorm runs on GPUs only (gloo has no kernel for it), so each process normalizes by its own share.
    Frozen batch norms hold fixed statistics and stay as they are."""
    trainable = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not trainable:
        return model
    if device.type != "cuda":
        print(f"{trainable} trainable batch norms: each process normalizes by its own batch (no SyncBatchNorm on CPUs)")
        return model
    print(f"{trainable} trainable batch norms synchronized across the processes (SyncBatchNorm)")
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def buffer_broadcast(model: torch.nn.Module) -> Dict[str, bool]:
    """DistributedDataParallel's option that copies rank 0's buffers to every process before each forward: on only
    for trainable batch norms, whose running statistics each process would otherwise update from its own share of
    the batch (SyncBatchNorm's agree already; the copy, some kB, keeps them equal to the bit). Without them the
    model's buffers are those of frozen batch norms: constants that every process builds or loads alike, which the
    copy would write over themselves at every step."""
    trainable = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # torch 2.13 renamed the option (the old name warns there); the new one still syncs buffers once, at the start.
    ddp_options = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers": trainable}


def distributed_data_parallel(model: torch.nn.Module, device: torch.device, gpu: int):
    """`model` in DistributedDataParallel, on its process's GPU (`gpu`, the local rank) or the CPU."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[gpu] if device.type == "cuda" else None, **buffer_broadcast(model)
    )
