"""Tests of util/misc.py: padded batches, accuracy, metric logging and the single-process distributed helpers."""

import argparse
import builtins
import os

import pytest
import torch
import torch.nn.functional as F

from util import misc
from util.config import complete_args
from util.misc import (
    MetricLogger,
    NestedTensor,
    SmoothedValue,
    accuracy,
    all_gather,
    collate_fn,
    interpolate,
    nested_tensor_from_tensor_list,
    reduce_dict,
)


# ---------------------------------------------------------------------------------------------- NestedTensor


def two_images():
    g = torch.Generator().manual_seed(0)
    # Values in [1, 2) so that a zero in the batch can only come from padding.
    return [torch.rand(3, 2, 3, generator=g) + 1, torch.rand(3, 4, 2, generator=g) + 1]


def test_nested_tensor_pads_with_zeros_and_masks_the_padding():
    a, b = two_images()
    nested = nested_tensor_from_tensor_list([a, b])
    tensors, mask = nested.decompose()
    assert tensors.shape == (2, 3, 4, 3) and mask.shape == (2, 4, 3) and mask.dtype == torch.bool
    # Images sit in the top-left corner, unchanged.
    assert torch.equal(tensors[0, :, :2, :3], a)
    assert torch.equal(tensors[1, :, :4, :2], b)
    expected_mask = torch.tensor(
        [[[0, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]], [[0, 0, 1], [0, 0, 1], [0, 0, 1], [0, 0, 1]]], dtype=torch.bool
    )
    assert torch.equal(mask, expected_mask)
    # Padding is exactly the masked area, and it is zero in every channel.
    assert torch.equal(tensors == 0, mask[:, None].expand_as(tensors))


def test_nested_tensor_of_equal_sizes_has_no_padding():
    images = [torch.rand(3, 5, 4), torch.rand(3, 5, 4)]
    tensors, mask = nested_tensor_from_tensor_list(images).decompose()
    assert torch.equal(tensors, torch.stack(images))
    assert not mask.any()


@pytest.mark.parametrize(
    "images, message",
    [
        ([], "empty"),
        ([torch.rand(3, 4)], "[C, H, W]"),
        ([torch.rand(1, 3, 4, 4)], "[C, H, W]"),
    ],
)
def test_nested_tensor_rejects_bad_lists(images, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        nested_tensor_from_tensor_list(images)


def test_nested_tensor_pads_the_first_dimension_too():
    # Target masks [N_i, H, W] of images with different object counts batch the same way as images.
    a = torch.ones(1, 2, 2)
    b = torch.ones(3, 3, 1)
    tensors, mask = nested_tensor_from_tensor_list([a, b]).decompose()
    assert tensors.shape == (2, 3, 3, 2)
    assert tensors[0].sum() == 4 and tensors[0, 0, :2, :2].eq(1).all()
    assert tensors[1].sum() == 9 and tensors[1, :, :, 0].eq(1).all()
    assert torch.equal(mask[1], torch.tensor([[False, True]] * 3))


def test_nested_tensor_from_tensor_list_under_torchscript():
    scripted = torch.jit.script(nested_tensor_from_tensor_list)
    images = two_images()
    eager = nested_tensor_from_tensor_list(images)
    script = scripted(images)
    assert torch.equal(script.tensors, eager.tensors)
    assert torch.equal(script.mask, eager.mask)


def test_nested_tensor_to_and_repr():
    nested = nested_tensor_from_tensor_list(two_images())
    moved = nested.to(torch.device("cpu"))
    assert isinstance(moved, NestedTensor)
    assert torch.equal(moved.tensors, nested.tensors) and torch.equal(moved.mask, nested.mask)
    no_mask = NestedTensor(torch.zeros(1, 3, 2, 2), None).to(torch.device("cpu"))
    assert no_mask.mask is None
    assert "NestedTensor" in repr(nested)


def test_collate_fn_pads_images_and_keeps_targets():
    a, b = two_images()
    targets = ({"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 3])})
    images, out_targets = collate_fn([(a, targets[0]), (b, targets[1])])
    assert isinstance(images, NestedTensor) and images.tensors.shape == (2, 3, 4, 3)
    assert out_targets == targets


# ---------------------------------------------------------------------------------------------- small functions


def test_accuracy_hand_computed():
    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.2, 0.0], [0.3, 0.7, 0.0], [0.1, 0.2, 0.7]])
    target = torch.tensor([1, 1, 1, 0])
    top1, top2 = accuracy(output, target, topk=(1, 2))
    # top-1 right for rows 0 and 2; top-2 also for row 1 (0.2 is second); row 3's class 0 is third.
    assert top1.item() == pytest.approx(50.0)
    assert top2.item() == pytest.approx(75.0)


def test_accuracy_of_no_targets_is_zero():
    (acc,) = accuracy(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert acc.item() == 0.0


def test_interpolate_matches_functional_and_accepts_empty_batches():
    x = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(
        interpolate(x, size=[8, 10], mode="bilinear", align_corners=False),
        F.interpolate(x, size=[8, 10], mode="bilinear", align_corners=False),
    )
    assert interpolate(torch.rand(0, 3, 4, 5), scale_factor=2.0).shape == (0, 3, 8, 10)


# ---------------------------------------------------------------------------------------------- logging


def test_smoothed_value_window_and_global_statistics():
    meter = SmoothedValue(window_size=3)
    for v in [1.0, 2.0, 3.0, 10.0]:
        meter.update(v)
    # The window holds the last three values; the global average covers all four.
    assert meter.median == 3.0
    assert meter.avg == pytest.approx(5.0)
    assert meter.max == 10.0
    assert meter.value == 10.0
    assert meter.global_avg == pytest.approx(4.0)
    assert meter.count == 4 and meter.total == pytest.approx(16.0)
    assert str(meter) == "3.0000 (4.0000)"


def test_smoothed_value_weighted_updates_and_format():
    meter = SmoothedValue(window_size=20, fmt="{value:.1f} {global_avg:.2f} {max:.0f}")
    meter.update(2.0, n=3)
    meter.update(6.0, n=1)
    assert meter.global_avg == pytest.approx((2.0 * 3 + 6.0) / 4)
    assert str(meter) == "6.0 3.00 6"


def test_metric_logger_update_and_str():
    logger = MetricLogger(delimiter=" | ")
    logger.update(loss=torch.tensor(2.0), lr=0.5)
    logger.update(loss=4.0)
    assert logger.loss.global_avg == pytest.approx(3.0)
    assert logger.meters["lr"].value == 0.5
    # torch's median of an even count is the lower of the two middle values: median(2, 4) = 2.
    assert str(logger) == "loss: 2.0000 (3.0000) | lr: 0.5000 (0.5000)"
    logger.add_meter("step", SmoothedValue(window_size=1, fmt="{value:.0f}"))
    logger.update(step=7)
    assert str(logger).endswith("step: 7")
    with pytest.raises(TypeError, match="loss"):
        logger.update(loss="high")
    with pytest.raises(AttributeError, match="missing"):
        _ = logger.missing


def test_metric_logger_log_every_yields_everything_and_prints_progress(capsys):
    logger = MetricLogger(delimiter="  ")
    seen = []
    for item in logger.log_every(list(range(5)), print_freq=2, header="Epoch: [0]"):
        logger.update(loss=float(item))
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    lines = capsys.readouterr().out.strip().splitlines()
    # Steps 0, 2 and the last one (4), then the total.
    assert len(lines) == 4
    assert lines[0].startswith("Epoch: [0]  [0/5]") and "eta: " in lines[0] and "time: " in lines[0]
    assert "data: " in lines[0] and "loss: 0.0000" in lines[0]
    assert lines[2].startswith("Epoch: [0]  [4/5]") and "loss: 2.0000 (2.0000)" in lines[2]
    assert lines[3].startswith("Epoch: [0] Total time: ")


# ---------------------------------------------------------------------------------------------- distributed


def test_single_process_distributed_helpers():
    assert not misc.is_dist_avail_and_initialized()
    assert misc.get_world_size() == 1 and misc.get_rank() == 0 and misc.is_main_process()
    data = {"a": [1, 2], "b": torch.tensor([3.0])}
    gathered = all_gather(data)
    assert len(gathered) == 1 and gathered[0] is data
    losses = {"loss_ce": torch.tensor(1.5), "loss_bbox": torch.tensor(0.25)}
    reduced = reduce_dict(losses)
    assert set(reduced) == set(losses)
    assert all(torch.equal(reduced[k], losses[k]) for k in losses)
    assert reduce_dict(losses, average=False)["loss_ce"].item() == 1.5


def test_init_distributed_mode_without_launcher_is_single_process(monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    args = complete_args(argparse.Namespace(dist_url="env://", device="cpu"))
    misc.init_distributed_mode(args)
    assert args.distributed is False and args.rank == 0 and args.world_size == 1
    assert "Not using distributed mode" in capsys.readouterr().out


def test_local_rank_is_the_launchers_in_a_distributed_run_and_0_outside(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert misc.local_rank() == 0  # no process group: a single process
    monkeypatch.setattr(misc, "is_dist_avail_and_initialized", lambda: True)
    assert misc.local_rank() == 3  # torchrun's, as init_distributed_mode reads it first
    monkeypatch.delenv("LOCAL_RANK")
    assert misc.local_rank() == 2  # Slurm's


def test_setup_for_distributed_silences_non_master(monkeypatch, capsys):
    monkeypatch.setattr(builtins, "print", builtins.print)  # restored after the test
    misc.setup_for_distributed(is_master=False)
    print("hidden")
    print("shown", force=True)
    assert capsys.readouterr().out == "shown\n"


def test_save_on_master_writes_atomically(tmp_path):
    path = tmp_path / "checkpoint.pth"
    misc.save_on_master({"epoch": 3, "w": torch.arange(4)}, str(path))
    loaded = torch.load(path, weights_only=True)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]  # no temporary file left behind


def test_get_sha_reports_commit_state_and_branch():
    sha = misc.get_sha()
    assert sha.startswith("sha: ") and ", status: " in sha and ", branch: " in sha


def test_same_size_batch_sampler_batches_one_size_at_a_time():
    from util.misc import SameSizeBatchSampler

    sizes = ["a", "b", "a", "a", "c", "b", "a", "a"]
    batches = list(SameSizeBatchSampler(sizes, batch_size=2))
    # Full batches as they fill up, then the partial ones; within a size, the dataset's order.
    assert batches == [[0, 2], [1, 5], [3, 6], [4], [7]]
    assert sorted(i for batch in batches for i in batch) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)
    # Three processes: as many batches each (the list padded with repeated batches), together all of them.
    per_rank = [list(SameSizeBatchSampler(sizes, 2, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]
    assert sorted(map(tuple, sum(per_rank, []))) == sorted(map(tuple, batches + batches[:1]))
    assert len(SameSizeBatchSampler(sizes, 8)) == 3
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        SameSizeBatchSampler(sizes, 0)


class RandomDraws(torch.utils.data.Dataset):
    """Items that are the draws of Python's, torch's and NumPy's generators where they are read (as augmentations
    draw), with the index and the reading process."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        import random

        import numpy as np

        return (index, os.getpid(), random.random(), torch.rand(()).item(), float(np.random.rand()))


def epochs_of(loader, epochs: int = 3):
    """Each epoch's items, and a draw of torch's global generator after it (as the training steps draw)."""
    out = []
    for _ in range(epochs):
        out.append(([item for batch in loader for item in batch], torch.rand(()).item()))
    return out


def test_persistent_workers_reseeded_every_epoch_draw_as_workers_started_every_epoch():
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    dataset = RandomDraws()
    fresh = DataLoader(
        dataset, batch_sampler=BatchSampler(RandomSampler(dataset), 2, False), num_workers=2, collate_fn=list
    )
    kept = DataLoader(
        misc.EpochSeededDataset(dataset),
        batch_sampler=misc.EpochSeededBatches(BatchSampler(RandomSampler(dataset), 2, False)),
        num_workers=2,
        collate_fn=list,
        persistent_workers=True,
        generator=torch.Generator(),
    )
    torch.manual_seed(0)
    expected = epochs_of(fresh)
    torch.manual_seed(0)
    got = epochs_of(kept)
    strip = [([item[:1] + item[2:] for item in items], after) for items, after in got]
    assert strip == [([item[:1] + item[2:] for item in items], after) for items, after in expected]
    # New processes every epoch, against the same two throughout.
    assert len({item[1] for items, _ in expected for item in items}) == 6
    assert len({item[1] for items, _ in got for item in items}) == 2
    # Epochs that differ: every epoch has draws of its own.
    assert len({tuple(items) for items, _ in strip}) == 3
    assert misc.EpochSeededDataset(dataset).__len__() == 8 and len(kept) == 4
