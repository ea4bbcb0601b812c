"""--ema_decay: the moving average of the weights (util/ema.py), what main.py evaluates and saves with it, and
resuming with it."""

import pytest
import torch
from torch import nn

from helpers import load_checkpoint_safely, run_main, tiny_flags
from models import build_model
from util.ema import ModelEMA
from util.visualize import read_log

EMA_FLAGS = ("--ema_decay", "0.9", "--no_plots", "--lr_drop", "2")


def test_the_average_follows_the_weights_with_a_rising_decay():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.5)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any(p.requires_grad for p in ema.module.parameters())

    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # train mode: the batch-norm statistics move too
    ema.update(model)
    d = 2 / 11  # (1 + n) / (10 + n) after the first update, below 0.5
    for k, v in ema.module.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, d * start[k] + (1 - d) * model.state_dict()[k], rtol=0, atol=1e-6, msg=k)
    assert ema.module[1].num_batches_tracked.item() == 1  # integer buffers are copied

    for _ in range(20):  # the decay has risen to its cap: a step now moves the average halfway
        ema.update(model)
    before = ema.module[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(2.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, 0.5 * before + 0.5 * model[0].weight)
    assert ema.updates == 22


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_a_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="--ema_decay"):
        ModelEMA(nn.Linear(2, 2), decay)


@pytest.fixture(scope="module")
def ema_run(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("ema")
    run_main(tiny_flags(synthetic_root, out, "--epochs", "3", *EMA_FLAGS))
    return out


def test_the_checkpoint_holds_the_evaluated_average_and_the_weights_training_resumes_from(
    ema_run, synthetic_root, tmp_path
):
    checkpoint = load_checkpoint_safely(ema_run / "checkpoint.pth")
    assert checkpoint["ema_updates"] == 3 * 4  # 16 training images in batches of 4, 3 epochs
    assert checkpoint["model"].keys() == checkpoint["train_model"].keys()
    differ = [
        k
        for k, v in checkpoint["model"].items()
        if v.is_floating_point() and not torch.allclose(v, checkpoint["train_model"][k])
    ]
    assert "class_embed.weight" in differ
    model, _, _ = build_model(checkpoint["args"])
    model.load_state_dict(checkpoint["model"])  # the average is a model of the same layout

    # 'model' is what was evaluated: --eval on the checkpoint gives the AP of the last log line.
    stats, _ = run_main(tiny_flags(synthetic_root, tmp_path, "--eval", "--resume", str(ema_run / "checkpoint.pth")))
    assert stats["coco_eval_bbox"] == pytest.approx(read_log(ema_run / "log.txt")[-1]["test_coco_eval_bbox"], abs=1e-12)


def test_resuming_with_the_average_continues_exactly(ema_run, synthetic_root, tmp_path):
    run_main(tiny_flags(synthetic_root, tmp_path, "--epochs", "1", *EMA_FLAGS))
    run_main(
        tiny_flags(synthetic_root, tmp_path, "--epochs", "3", *EMA_FLAGS, "--resume", str(tmp_path / "checkpoint.pth"))
    )
    straight, resumed = read_log(ema_run / "log.txt"), read_log(tmp_path / "log.txt")
    assert [row["epoch"] for row in resumed] == [0, 1, 2]
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["test_coco_eval_bbox"] == pytest.approx(b["test_coco_eval_bbox"], abs=1e-6)
    a = load_checkpoint_safely(ema_run / "checkpoint.pth")
    b = load_checkpoint_safely(tmp_path / "checkpoint.pth")
    assert a["ema_updates"] == b["ema_updates"]
    for entry in ("model", "train_model"):
        for k in a[entry]:
            torch.testing.assert_close(b[entry][k], a[entry][k], rtol=0, atol=1e-6, msg=f"{entry} {k}")
