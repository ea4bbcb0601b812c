"""Two processes (gloo, on this machine) do what one does: a DDP step on halves of a batch equals the step on
the whole batch, a split evaluation gives the same COCO stats, and main.py runs under torchrun and under the
original's torch.distributed.launch line."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler, Subset

import main as main_py
import util.misc as utils
from helpers import REPO_ROOT, OracleDETR, free_port, load_checkpoint_safely, tiny_detr_and_optimizer, tiny_flags
from datasets import get_coco_api_from_dataset, synthetic
from engine import evaluate, train_one_epoch
from util.distributed import buffer_broadcast, synchronize_batch_norms

WORLD_SIZE = 2
CPU = torch.device("cpu")
ORACLE_NOISE = 0.08


def ddp_args(root):
    """helpers.tiny_flags with frozen batch norm and the synthetic set's 5 classes (+1)."""
    # Frozen batch norm, as with pretrained backbones: trainable batch norm computes its statistics per
    # process, so only the frozen kind makes a step on two halves equal to one on the whole batch.
    args = main_py.parse_args(tiny_flags(root, "", "--backbone_norm", "frozen"))
    args.num_classes = 6
    return args


def global_batch():
    """4 images with 2 objects each: every process of 2 gets as many objects, so that the per-process mean of
    the classification loss and the box losses' num_boxes average to exactly the whole batch's values."""
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, 64, 64, generator=g) for _ in range(4)]
    targets = []
    for _ in range(4):
        centers = 0.3 + 0.4 * torch.rand(2, 2, generator=g)
        sizes = 0.1 + 0.3 * torch.rand(2, 2, generator=g)
        targets.append({"boxes": torch.cat([centers, sizes], 1), "labels": torch.randint(1, 6, (2,), generator=g)})
    return images, targets


def one_step(model, criterion, optimizer, images, targets, max_norm):
    """One training step by engine.train_one_epoch on one batch."""
    batch = [(utils.nested_tensor_from_tensor_list(images), tuple(targets))]
    return train_one_epoch(model, criterion, batch, optimizer, CPU, epoch=0, max_norm=max_norm)


def evaluation_loaders(dataset, distributed: bool):
    """Data loaders over the whole val set and over its first 7 images (which 2 processes cannot split
    evenly: DistributedSampler repeats one image)."""
    loaders = {}
    for name, data in (("all", dataset), ("first_7", Subset(dataset, range(7)))):
        sampler = DistributedSampler(data, shuffle=False) if distributed else SequentialSampler(data)
        loaders[name] = DataLoader(data, 2, sampler=sampler, collate_fn=utils.collate_fn)
    return loaders


def run_evaluations(args, distributed: bool):
    """{name: (COCO bbox stats, image ids this process evaluated, image ids of the merged evaluation)}."""
    dataset = synthetic.build("val", args)
    oracle = OracleDETR(dataset, num_classes=args.num_classes, num_queries=args.num_queries, noise=ORACLE_NOISE)
    _, criterion, postprocessors, _ = tiny_detr_and_optimizer(args)
    results = {}
    for name, loader in evaluation_loaders(dataset, distributed).items():
        stats, evaluator = evaluate(
            oracle, criterion, postprocessors, loader, get_coco_api_from_dataset(loader.dataset), CPU, output_dir=""
        )
        results[name] = (
            stats["coco_eval_bbox"],
            sorted(evaluator.img_ids),
            sorted(evaluator.coco_eval["bbox"].params.imgIds),
        )
    return results


def worker(rank: int, port: int, root: str, out_dir: str):
    """One of the 2 processes: a DDP step on its half of the global batch, then the split evaluations."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    args = ddp_args(root)
    utils.init_distributed_mode(args)
    assert args.distributed and args.dist_backend == "gloo" and utils.get_world_size() == WORLD_SIZE
    try:
        model, criterion, _, optimizer = tiny_detr_and_optimizer(args)
        ddp_model = torch.nn.parallel.DistributedDataParallel(model)
        images, targets = global_batch()
        half = slice(2 * rank, 2 * rank + 2)
        stats = one_step(ddp_model, criterion, optimizer, images[half], targets[half], args.clip_max_norm)
        torch.save(
            {
                "params": {n: p.detach().clone() for n, p in model.named_parameters()},
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "loss": stats["loss"],
            },
            Path(out_dir) / f"step_rank{rank}.pth",
        )
        with open(Path(out_dir) / f"evaluation_rank{rank}.json", "w") as f:
            json.dump(run_evaluations(args, distributed=True), f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(synthetic_root, tmp_path_factory):
    """What each of 2 processes (spawned, joined through gloo) wrote, by rank."""
    out = tmp_path_factory.mktemp("two_processes")
    # fork, not spawn: the children start in a second instead of importing torch again (25 s on a busy box).
    context = mp.start_processes(
        worker, args=(free_port(), str(synthetic_root), str(out)), nprocs=WORLD_SIZE, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):  # raises if a process failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 processes did not finish within 300 s")
    steps = [torch.load(out / f"step_rank{r}.pth", weights_only=True) for r in range(WORLD_SIZE)]
    evaluations = [json.loads((out / f"evaluation_rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    return steps, evaluations


def test_a_ddp_step_on_two_halves_equals_the_step_on_the_whole_batch(two_processes, synthetic_root):
    steps, _ = two_processes
    args = ddp_args(synthetic_root)
    model, criterion, _, optimizer = tiny_detr_and_optimizer(args)
    images, targets = global_batch()
    stats = one_step(model, criterion, optimizer, images, targets, args.clip_max_norm)

    for name, p in model.named_parameters():
        # The replicas stay identical, and equal to the one-process step.
        assert torch.equal(steps[0]["params"][name], steps[1]["params"][name]), name
        torch.testing.assert_close(steps[0]["params"][name], p.detach(), rtol=0, atol=1e-5, msg=name)
        if p.grad is not None:
            torch.testing.assert_close(steps[0]["grads"][name], p.grad, rtol=1e-4, atol=1e-8, msg=name)
    assert steps[0]["grads"].keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    # The logged loss is the mean over processes, here the whole batch's loss.
    assert steps[0]["loss"] == pytest.approx(stats["loss"], rel=1e-5) == steps[1]["loss"]

    # The comparison has power: a step on one half alone ends elsewhere.
    alone, criterion, _, optimizer = tiny_detr_and_optimizer(args)
    one_step(alone, criterion, optimizer, images[:2], targets[:2], args.clip_max_norm)
    difference = max((a - p).abs().max().item() for a, p in zip(alone.parameters(), model.parameters()))
    assert difference > 1e-4


@pytest.mark.parametrize("subset", ["all", "first_7"])
def test_a_split_evaluation_gives_the_stats_of_one_process(two_processes, synthetic_root, subset):
    _, evaluations = two_processes
    alone = run_evaluations(ddp_args(synthetic_root), distributed=False)[subset]
    stats, _, merged_ids = alone
    assert 0.05 < stats[0] < 0.95  # a score with room to differ
    local_ids = []
    for evaluation in evaluations:
        rank_stats, rank_ids, rank_merged_ids = evaluation[subset]
        assert rank_stats == stats  # exactly
        assert rank_merged_ids == merged_ids
        local_ids.append(rank_ids)
    # Each process evaluated its share (one image twice when the count is odd), together all of them.
    assert len(local_ids[0]) == len(local_ids[1]) == 4
    assert sorted(set(local_ids[0]) | set(local_ids[1])) == merged_ids
    assert len(merged_ids) == (8 if subset == "all" else 7)


def test_trainable_batch_norms_are_synchronized_on_cuda(synthetic_root):
    args = main_py.parse_args(tiny_flags(synthetic_root, "", "--backbone_norm", "batch"))
    args.num_classes = 6
    model, _, _, _ = tiny_detr_and_optimizer(args)
    norms = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(norms) == 20  # ResNet-18's
    weights = dict(model.state_dict())
    # The conversion needs no GPU: a device object of type cuda says where the model will run.
    synced = synchronize_batch_norms(model, torch.device("cuda"))
    assert {n: type(m) for n, m in synced.named_modules() if n in norms} == dict.fromkeys(norms, torch.nn.SyncBatchNorm)
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    # The same weights and statistics under the same names: checkpoints load either way.
    assert synced.state_dict().keys() == weights.keys()
    assert all(torch.equal(synced.state_dict()[k], v) for k, v in weights.items())
    assert buffer_broadcast(synced) in ({"forward_sync_buffers": True}, {"broadcast_buffers": True})

    # On the CPU (gloo) they stay batch norms; frozen ones stay frozen anywhere, and skip the buffer broadcast.
    model, _, _, _ = tiny_detr_and_optimizer(args)
    assert synchronize_batch_norms(model, CPU) is model
    assert {n: type(m) for n, m in model.named_modules() if n in norms} == norms
    frozen, _, _, _ = tiny_detr_and_optimizer(ddp_args(synthetic_root))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert synchronize_batch_norms(frozen, torch.device("cuda")) is frozen
    assert buffer_broadcast(frozen) in ({"forward_sync_buffers": False}, {"broadcast_buffers": False})


def test_ddp_broadcasts_buffers_only_for_trainable_batch_norms(synthetic_root, tmp_path):
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    try:
        for norm, broadcast in (("frozen", False), ("batch", True)):
            args = main_py.parse_args(tiny_flags(synthetic_root, "", "--backbone_norm", norm))
            args.num_classes, args.distributed, args.gpu = 6, True, 0
            model, _, _, _ = tiny_detr_and_optimizer(args)
            ddp, inner = main_py.prepare_model(model, args, CPU)
            assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel) and ddp.module is inner is model
            assert ddp.broadcast_buffers is broadcast, norm
    finally:
        dist.destroy_process_group()


# The training-only supervision (models/train_only.py): every extra part's weights get a gradient at every step,
# as DistributedDataParallel requires, and the dense and denoising counts are averaged over the processes.
TRAIN_ONLY_FLAGS = ("--query_groups", "2", "--hybrid_queries", "6", "--dn_groups", "1", "--dense_aux", "layer2",
                    "--dense_queries", "4", "--dense_boxes", "absolute")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), TRAIN_ONLY_FLAGS, ("--two_stage",)], ids=["detr", "train_only", "two_stage"])
def test_main_runs_under_torchrun(synthetic_root, tmp_path, extra):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(WORLD_SIZE),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "main.py",
        *tiny_flags(synthetic_root, out, "--epochs", "1", *extra),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "distributed init from the torchrun" in done.stdout + done.stderr
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0]  # written once, by the main process
    assert len(log[0]["test_coco_eval_bbox"]) == 12
    checkpoint = load_checkpoint_safely(out / "checkpoint.pth")
    assert checkpoint["epoch"] == 0 and checkpoint["args"].world_size == WORLD_SIZE
    assert ("model_train_only" in checkpoint) == (extra == TRAIN_ONLY_FLAGS)
    assert checkpoint["args"].two_stage == ("--two_stage" in extra)
    # Each process's generators are kept, for an exact resume: they were seeded differently (seed + rank).
    rng = checkpoint["rng"]
    assert len(rng) == WORLD_SIZE and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pth",
        "checkpoint_best.pth",
        "curves.png",
        "eval",
        "log.txt",
        "per_class.png",
        "predictions.png",
        "recipe.json",
        "tensorboard",
    ]
    assert len(list((out / "tensorboard").iterdir())) == 1  # the main process's events only


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("torch.distributed.launch") is None,
    reason="this torch no longer ships torch.distributed.launch",
)
def test_main_runs_under_the_original_launcher_line(synthetic_root, tmp_path):
    """python -m torch.distributed.launch --nproc_per_node=N --use_env main.py ..., as the original's README."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.launch",
        f"--nproc_per_node={WORLD_SIZE}",
        "--use_env",
        "main.py",
        *tiny_flags(synthetic_root, out, "--epochs", "1", "--no_plots"),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert f"distributed init from the torchrun/torch.distributed.launch environment (rank 0 of {WORLD_SIZE}" in printed
    assert f"(rank 1 of {WORLD_SIZE}" in printed
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [0] and len(log[0]["test_coco_eval_bbox"]) == 12
    args = load_checkpoint_safely(out / "checkpoint.pth")["args"]
    assert args.world_size == WORLD_SIZE and args.local_rank is None  # --use_env: no --local-rank passed
