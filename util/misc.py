"""Small shared pieces: padded image batches, metric logging, and torch.distributed helpers."""

import contextlib
import datetime
import math
import os
import random
import statistics
import subprocess
import time
from collections import defaultdict, deque
from typing import Any, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


class NestedTensor:
    """A padded batch of images `tensors` [B, C, H, W] with `mask` [B, H, W], True on padding."""

    def __init__(self, tensors: Tensor, mask: Optional[Tensor]):
        self.tensors = tensors
        self.mask = mask

    def to(self, device: torch.device, non_blocking: bool = False) -> "NestedTensor":
        mask = self.mask
        if mask is not None:
            mask = mask.to(device, non_blocking=non_blocking)
        return NestedTensor(self.tensors.to(device, non_blocking=non_blocking), mask)

    @torch.jit.unused
    def pin_memory(self) -> "NestedTensor":
        """The batch in page-locked memory, from which to(device, non_blocking=True) copies to a GPU without waiting
        for it (a DataLoader with pin_memory=True calls this on every batch)."""
        mask = self.mask.pin_memory() if self.mask is not None else None
        return NestedTensor(self.tensors.pin_memory(), mask)

    def decompose(self):
        return self.tensors, self.mask

    def __repr__(self) -> str:
        return "NestedTensor(tensors=" + str(self.tensors.shape) + ", mask=" + str(self.mask is not None) + ")"


def nested_tensor_from_tensor_list(tensor_list: List[Tensor]) -> NestedTensor:
    """Zero-pad tensors [C_i, H_i, W_i] at the end of every dimension to one batch [B, C, H, W]; the mask
    [B, H, W] is True on the padded pixels. (Target masks [N_i, H, W] with different N_i pad the same way.)

    Written with F.pad rather than in-place copies into a preallocated batch so that the same code runs
    eagerly, under torch.jit.script, and in ONNX export.
    """
    if len(tensor_list) == 0:
        raise ValueError("nested_tensor_from_tensor_list: got an empty list of images")
    for img in tensor_list:
        if img.dim() != 3:
            raise ValueError(f"expected tensors of shape [C, H, W], got one of shape {list(img.shape)}")
    max_c = max([int(img.shape[0]) for img in tensor_list])
    max_h = max([int(img.shape[1]) for img in tensor_list])
    max_w = max([int(img.shape[2]) for img in tensor_list])
    padded: List[Tensor] = []
    masks: List[Tensor] = []
    for img in tensor_list:
        pad_hw = [0, max_w - int(img.shape[2]), 0, max_h - int(img.shape[1])]
        padded.append(F.pad(img, pad_hw + [0, max_c - int(img.shape[0])]))
        valid = torch.zeros((int(img.shape[1]), int(img.shape[2])), dtype=torch.uint8, device=img.device)
        masks.append(F.pad(valid, pad_hw, value=1.0).to(torch.bool))
    return NestedTensor(torch.stack(padded), torch.stack(masks))


@torch.jit.unused
def to_nested_tensor(samples) -> NestedTensor:
    """A NestedTensor from a 4-D batch (no padding) or a list of 3-D images (padded to the largest)."""
    if isinstance(samples, Tensor):
        if samples.dim() == 3:
            samples = samples.unsqueeze(0)
        if samples.dim() != 4:
            raise ValueError(
                f"DETR expects images [B, 3, H, W] or [3, H, W], got a tensor of shape {list(samples.shape)}"
            )
        _check_channels(samples.shape[1])
        # A batch of equal-sized images has no padding: an all-False mask, built without a per-image loop.
        mask = torch.zeros(
            (samples.shape[0], samples.shape[2], samples.shape[3]), dtype=torch.bool, device=samples.device
        )
        return NestedTensor(samples, mask)
    if isinstance(samples, (list, tuple)):
        for img in samples:
            if not isinstance(img, Tensor) or img.dim() != 3:
                raise ValueError(
                    "DETR expects a list of images [3, H, W]; got an element of shape "
                    f"{list(img.shape) if isinstance(img, Tensor) else type(img).__name__}"
                )
            _check_channels(img.shape[0])
        return nested_tensor_from_tensor_list(list(samples))
    raise TypeError(f"DETR expects a NestedTensor, a tensor or a list of tensors, got {type(samples).__name__}")


def _check_channels(c: int) -> None:
    if c != 3:
        raise ValueError(f"DETR expects RGB images with 3 channels, got {c} channels")


# The class-head sizes of the original's COCO models: the largest category id + 1 (90 + 1 for COCO; the
# panoptic ids end at 200, and the original rounded up to 250, a size its published checkpoints keep).
COCO_NUM_CLASSES = {"coco": 91, "coco_panoptic": 250}


def original_num_classes(dataset_file: str) -> int:
    """The class-head size the original DETR's build_model gives --dataset_file when the flags name none (91 for
    COCO, 250 for COCO panoptic, 20 for any other): models.build_model keeps it for a namespace main.py did not
    fill. main.py itself asks the dataset (datasets.num_classes)."""
    return COCO_NUM_CLASSES.get(dataset_file, 20)


def coco_panoptic_is_thing_map() -> Dict[int, bool]:
    """{class id: is a thing} over the COCO panoptic class head: ids up to 90 are things (the COCO detection
    categories), the others stuff."""
    return {i: i <= 90 for i in range(COCO_NUM_CLASSES["coco_panoptic"])}


def original_is_thing_map(dataset_file: str) -> Optional[Dict[int, bool]]:
    """The thing map the original DETR's build_model gives --dataset_file when the flags name no thing classes:
    COCO panoptic's, None for any other (no panoptic post-processor)."""
    return coco_panoptic_is_thing_map() if dataset_file == "coco_panoptic" else None


def collate_fn(batch):
    """Collate (image, target) pairs into (NestedTensor of images, tuple of targets)."""
    images, targets = tuple(zip(*batch))
    return nested_tensor_from_tensor_list(list(images)), targets


class SameSizeBatchSampler(torch.utils.data.Sampler):
    """Batches of up to `batch_size` dataset indices whose images share one size (`sizes[i]`, after the
    transforms), in dataset order within each size, so that no image of a batch is padded: a ResNet's convolutions
    then see each image as they would alone, and the results do not depend on the batch size. With several
    processes every one forms the same batches and takes every `num_replicas`-th from `rank` on, the list first
    padded with repeated batches to a multiple of `num_replicas` (as DistributedSampler repeats images), so that
    all processes run as many batches."""

    def __init__(self, sizes: Sequence[Hashable], batch_size: int, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        batches, open_batches = [], {}
        for index, size in enumerate(sizes):
            batch = open_batches.setdefault(size, [])
            batch.append(index)
            if len(batch) == batch_size:
                batches.append(open_batches.pop(size))
        batches += [batch for batch in open_batches.values()]
        if batches and len(batches) % num_replicas:
            batches += batches[: num_replicas - len(batches) % num_replicas]
        self.batches = batches[rank::num_replicas]

    def __iter__(self) -> Iterator[List[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class EpochSeededBatches(torch.utils.data.Sampler):
    """The batches of `batch_sampler`, each index paired with a seed drawn once per epoch from torch's global
    generator, as a DataLoader draws its workers' base seed each time it starts them. With persistent workers
    (started once, at the first epoch) EpochSeededDataset reseeds them from it: every epoch's augmentations, and
    the draws the training process makes, are then those of workers started afresh for each epoch, so that a
    seed gives the same run, and a resumed run the same as one never stopped."""

    def __init__(self, batch_sampler):
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[List[tuple]]:
        # Drawn before the batches' own sampler draws, in the order a DataLoader draws its base seed and then
        # starts its sampler.
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        for batch in self.batch_sampler:
            yield [(seed, index) for index in batch]

    def __len__(self) -> int:
        return len(self.batch_sampler)


class EpochSeededDataset(torch.utils.data.Dataset):
    """`dataset` read with the (seed, index) pairs of EpochSeededBatches: a data-loader worker seeds Python's,
    torch's and NumPy's generators as DataLoader seeds a worker it starts (base seed + worker id) whenever the
    epoch's seed changes. Attributes of `dataset` (ann_file, coco, ...) are read through."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.seed: Optional[int] = None

    def __getitem__(self, seeded_index: tuple):
        seed, index = seeded_index
        if seed != self.seed:
            self.seed = seed
            worker = torch.utils.data.get_worker_info()
            worker_id = worker.id if worker is not None else 0
            random.seed(seed + worker_id)
            torch.manual_seed(seed + worker_id)
            # DataLoader's own derivation of a worker's NumPy seed (private, unchanged since torch 1.9).
            from torch.utils.data._utils.worker import _generate_state

            np.random.seed(_generate_state(seed, worker_id))
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name.startswith("__") or "dataset" not in self.__dict__:  # copying and pickling ask before __init__
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


class EpochDecay(torch.optim.lr_scheduler.LRScheduler):
    """--lr_schedule linear or cosine: the learning rate of epoch e (from 0) is the base rate times 1 - e / E
    (linear) or (1 + cos(pi e / E)) / 2 (cosine), E being `total_epochs`; stepped once per epoch, as StepLR is.
    --time_budget changes E as it refits the run (`set_total_epochs`); E is part of the state_dict, so a resumed
    run continues the same decay."""

    KINDS = ("linear", "cosine")

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_epochs: int, last_epoch: int = -1):
        if kind not in self.KINDS:
            raise ValueError(f"--lr_schedule {kind!r}: expected step, {' or '.join(self.KINDS)}")
        if total_epochs < 1:
            raise ValueError(f"--epochs {total_epochs}: a decaying --lr_schedule needs at least 1 epoch")
        self.kind, self.total_epochs = kind, total_epochs
        super().__init__(optimizer, last_epoch)

    def factor(self, epoch: int) -> float:
        progress = min(max(epoch, 0) / self.total_epochs, 1.0)
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> List[float]:
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]

    def set_total_epochs(self, total_epochs: int) -> None:
        """Stretch or shrink the decay to `total_epochs`; the current epoch's rate follows at once."""
        self.total_epochs = max(int(total_epochs), 1)
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


def interpolate(
    input: Tensor,
    size: Optional[List[int]] = None,
    scale_factor: Optional[float] = None,
    mode: str = "nearest",
    align_corners: Optional[bool] = None,
) -> Tensor:
    """F.interpolate that also accepts empty batches."""
    return F.interpolate(input, size=size, scale_factor=scale_factor, mode=mode, align_corners=align_corners)


@torch.no_grad()
def accuracy(output: Tensor, target: Tensor, topk=(1,)) -> List[Tensor]:
    """Top-k accuracy in percent of `output` [N, C] against `target` [N]; 0 for an empty target."""
    if target.numel() == 0:
        return [torch.zeros([], device=output.device)]
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand(maxk, -1))
    return [correct[:k].reshape(-1).float().sum(0) * (100.0 / target.shape[0]) for k in topk]


# ----------------------------------------------------------------------------------------------------------
# Logging


def read_to_host(values: List[Any]) -> List[Any]:
    """`values` with every tensor among them (one element each) read to the host as .item() reads it: one stacked
    copy per (device, dtype) rather than one per tensor, since each copy from a GPU waits for all queued work."""
    out = list(values)
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            groups[(v.device, v.dtype)].append(i)
    for indices in groups.values():
        read = torch.stack([values[i].reshape(()) for i in indices]).tolist()
        for i, v in zip(indices, read):
            out[i] = v
    return out


class SmoothedValue:
    """Tracks a series of values; reports the median/average over a window and the global average.

    Tensors given to update() stay where they are until a statistic is asked for: reading a GPU tensor to the host
    waits for the GPU, so a training step that is not printed never waits for its logged values."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None):
        self.deque = deque(maxlen=window_size)
        self._total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"
        self.pending: List[tuple] = []  # (value, n) not yet in the window and the total, in the order given

    def update(self, value, n: int = 1) -> None:
        self.pending.append((value.detach() if isinstance(value, Tensor) else value, n))
        self.count += n

    def absorb(self, values: List[Any]) -> None:
        """Add the pending values, read to the host (`values`, in the order of self.pending)."""
        for value, (_, n) in zip(values, self.pending):
            self.deque.append(value)
            self._total += value * n
        self.pending = []

    def flush(self) -> None:
        if self.pending:
            self.absorb(read_to_host([v for v, _ in self.pending]))

    @property
    def total(self) -> float:
        self.flush()
        return self._total

    def synchronize_between_processes(self) -> None:
        """Sum count and total over processes (the window stays local)."""
        self.flush()
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor(
            [self.count, self._total], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu"
        )
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self._total = t[1].item()

    # The window's statistics in plain Python: the values are on the host already.
    @property
    def median(self) -> float:
        self.flush()
        return statistics.median_low(self.deque)  # the lower middle value for an even count, as torch.median

    @property
    def avg(self) -> float:
        self.flush()
        return sum(self.deque) / len(self.deque)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        self.flush()
        return max(self.deque)

    @property
    def value(self) -> float:
        self.flush()
        return self.deque[-1]

    def __str__(self):
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value
        )


class MetricLogger:
    """Keeps named SmoothedValues and prints progress lines with ETA while iterating. Logged tensors are read to
    the host together, in one copy, on the steps that print (see flush)."""

    def __init__(self, delimiter: str = "\t"):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if isinstance(v, Tensor) and v.numel() != 1 or not isinstance(v, (Tensor, float, int)):
                raise TypeError(f"MetricLogger.update: {k} must be a number or a one-element tensor, got {type(v)}")
            self.meters[k].update(v)

    def flush(self) -> None:
        """Read every meter's pending tensors to the host in one copy (per device and dtype)."""
        meters = [m for m in self.meters.values() if m.pending]
        values = read_to_host([v for m in meters for v, _ in m.pending])
        start = 0
        for m in meters:
            count = len(m.pending)
            m.absorb(values[start : start + count])
            start += count

    def __getattr__(self, attr):
        if attr in self.__dict__.get("meters", {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        self.flush()
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        self.flush()
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable, print_freq: int, header: Optional[str] = None):
        """Yield from `iterable`, printing every `print_freq` steps the meters, ETA, step and data time."""
        header = header or ""
        start = end = time.time()
        iter_time = SmoothedValue(fmt="{avg:.4f}")
        data_time = SmoothedValue(fmt="{avg:.4f}")
        n = len(iterable)
        width = len(str(n))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == n - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (n - i - 1)))
                parts = [
                    header,
                    f"[{i:{width}d}/{n}]",
                    f"eta: {eta}",
                    str(self),
                    f"time: {iter_time}",
                    f"data: {data_time}",
                ]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}")
                print(self.delimiter.join(p for p in parts if p))
            end = time.time()
        total = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(total))} ({total / max(n, 1):.4f} s / it)")


# ----------------------------------------------------------------------------------------------------------
# Distributed helpers


@contextlib.contextmanager
def training_targets(model: torch.nn.Module, targets: List[Dict[str, Tensor]]) -> Iterator[None]:
    """Within the block, every submodule of `model` that declares `uses_training_targets` (a model whose
    training-only queries are built from the ground truth, models/train_only.py) sees the batch's targets as
    its `training_targets`; they are dropped after it. A plain DETR has none and is untouched."""
    users = [m for m in model.modules() if getattr(m, "uses_training_targets", False)]
    for m in users:
        m.training_targets = targets
    try:
        yield
    finally:
        for m in users:
            m.training_targets = None


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def local_rank() -> int:
    """This process's rank among those of its machine: 0 outside a distributed run. join_process_group reads it
    from the same variables (torchrun's first, then Slurm's)."""
    if not is_dist_avail_and_initialized():
        return 0
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_gather(data: Any) -> List[Any]:
    """Gather any picklable object from every process; returns the list ordered by rank."""
    if get_world_size() == 1:
        return [data]
    gathered: List[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, data)
    return gathered


def reduce_dict(input_dict: Dict[str, Tensor], average: bool = True) -> Dict[str, Tensor]:
    """Sum (or average) each value of a dict of scalar tensors over processes; same keys on every process."""
    world_size = get_world_size()
    if world_size < 2:
        return input_dict
    with torch.no_grad():
        names = sorted(input_dict.keys())
        values = torch.stack([input_dict[k] for k in names])
        dist.all_reduce(values)
        if average:
            values /= world_size
        return dict(zip(names, values))


def get_sha() -> str:
    """The git commit, state and branch of this checkout, for the run's log."""
    cwd = os.path.dirname(os.path.abspath(__file__))

    def run(command):
        return subprocess.check_output(command, cwd=cwd, stderr=subprocess.DEVNULL).decode("ascii").strip()

    sha, diff, branch = "N/A", "clean", "N/A"
    try:
        sha = run(["git", "rev-parse", "HEAD"])
        subprocess.check_output(["git", "diff"], cwd=cwd)
        diff = "has uncommited changes" if run(["git", "diff-index", "HEAD"]) else "clean"
        branch = run(["git", "rev-parse", "--abbrev-ref", "HEAD"])
    except Exception:
        pass
    return f"sha: {sha}, status: {diff}, branch: {branch}"


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on all processes but the master; print(..., force=True) still prints."""
    import builtins

    builtin_print = builtins.print

    def print_(*args, **kwargs):
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_


def save_on_master(*args, **kwargs) -> None:
    """torch.save on the main process only. A path is written atomically: to a temporary file, then renamed,
    so a process killed while saving leaves the previous file intact."""
    if not is_main_process():
        return
    if len(args) >= 2 and isinstance(args[1], (str, os.PathLike)):
        path = os.fspath(args[1])
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            torch.save(args[0], tmp, *args[2:], **kwargs)
            # On disk before the rename, so that a machine that goes down right after keeps a whole file.
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except BaseException:  # a full disk, an interrupt: do not leave a partial copy filling the disk
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        os.replace(tmp, path)
    else:
        torch.save(*args, **kwargs)


def choose_device(requested: str, name: str = "--device") -> torch.device:
    """The requested device, or the CPU (with a message naming the flag or key `name`) when CUDA is asked for but
    absent."""
    if requested.startswith("cuda") and not torch.cuda.is_available():
        print(f"{name} {requested}: no CUDA device is available here, using the CPU instead")
        return torch.device("cpu")
    return torch.device(requested)


class ProcessGroup(NamedTuple):
    """This process's place among the run's, as torchrun/launch or Slurm told it."""

    distributed: bool
    rank: int
    world_size: int
    gpu: int  # the local rank: the GPU this process drives
    backend: Optional[str] = None

    def as_args(self) -> Dict[str, Any]:
        """The entries the original's init_distributed_mode writes into args (and checkpoints record)."""
        entries = dict(distributed=self.distributed, rank=self.rank, world_size=self.world_size, gpu=self.gpu)
        return entries if self.backend is None else {**entries, "dist_backend": self.backend}


def join_process_group(args) -> ProcessGroup:
    """Read the process's rank, world size and local rank from torchrun/launch or Slurm variables and join the
    group (--dist_url, --dist_timeout); a single process when neither is present. The backend is nccl on GPUs and
    gloo on CPUs. args is left as it is."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun/torch.distributed.launch environment"
        rank, world_size, gpu = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        source = "Slurm environment"
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        gpu = int(env.get("SLURM_LOCALID", 0))
    else:
        print("Not using distributed mode (no RANK/WORLD_SIZE or multi-task SLURM_* variables)")
        return ProcessGroup(False, 0, 1, 0)
    use_cuda = torch.cuda.is_available() and str(args.device).startswith("cuda")
    group = ProcessGroup(True, rank, world_size, gpu, "nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(gpu)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not below the world size {world_size} given by the {source}")
    print(
        f"| distributed init from the {source} (rank {rank} of {world_size}, backend {group.backend}): {args.dist_url}",
        flush=True,
    )
    timeout_s = int(args.dist_timeout)
    try:
        # The timeout bounds the rendezvous too (TCPStore connection and join, file store), not only collectives.
        dist.init_process_group(
            backend=group.backend,
            init_method=args.dist_url,
            world_size=world_size,
            rank=rank,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        dist.barrier()
    except (RuntimeError, ValueError, OSError) as e:  # DistStoreError, DistNetworkError, gloo's "Wait timeout"
        raise RuntimeError(rendezvous_failure_message(args, group, timeout_s, e)) from e
    setup_for_distributed(rank == 0)
    return group


def init_distributed_mode(args) -> None:
    """The original's: join_process_group, its findings written into args (distributed, rank, world_size, gpu and,
    in a group, dist_backend), for code written against the original's util.misc."""
    vars(args).update(join_process_group(args).as_args())


def rendezvous_failure_message(args, group: "ProcessGroup", timeout_s: int, error: BaseException) -> str:
    """What went wrong when joining the process group, and what to check, by kind of --dist_url."""
    lines = [
        f"rank {group.rank} of {group.world_size} could not join the other processes (within --dist_timeout "
        f"{timeout_s} s): {type(error).__name__}: {error}"
    ]
    url = str(args.dist_url)
    if url == "env://":
        address = f"{os.environ.get('MASTER_ADDR', '(unset)')}:{os.environ.get('MASTER_PORT', '(unset)')}"
        lines.append(
            f"Check that MASTER_ADDR:MASTER_PORT = {address} is the rank-0 machine and reachable from here "
            "(name, firewall), that nothing else uses that port, that all WORLD_SIZE = "
            f"{group.world_size} processes were started (torchrun: the same --nnodes and --nproc_per_node on "
            "every node) and that they all got the same address."
        )
    elif url.startswith("file://"):
        lines.append(
            f"Check that {url[len('file://') :]} is on a file system every node sees, that it is not left "
            "over from an earlier run (use a new name for each job), and that all "
            f"{group.world_size} processes were started with this --dist_url."
        )
    else:
        lines.append(
            f"Check that {url} is reachable from every process and that all {group.world_size} processes "
            "were started with this --dist_url."
        )
    lines.append("--dist_timeout sets how many seconds to wait.")
    return "\n".join(lines)
