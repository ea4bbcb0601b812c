"""util/amp.py and the float16 path of engine.py and main.py: --amp takes the autocast type the hardware computes
natively; float16 trains with a loss scaler that grows, backs off and skips overflowing steps, and whose state
survives an exact resume."""

import json
import math
import os
from argparse import Namespace
from contextlib import nullcontext

import pytest
import torch

import main as main_py
from engine import train_one_epoch
from helpers import load_checkpoint_safely, run_main, tiny_detr_and_optimizer, tiny_flags
from util import amp

CPU = torch.device("cpu")


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_auto_takes_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setattr(amp, "native_dtypes", lambda device: (torch.bfloat16,))
    dtype, why = amp.choose_amp_dtype(CPU)
    assert dtype == torch.bfloat16 and "bfloat16 autocast" in why and "natively" in why
    # An AVX2 CPU (no bfloat16 arithmetic): both reduced types would be emulated, so fp32.
    monkeypatch.setattr(amp, "native_dtypes", lambda device: ())
    dtype, why = amp.choose_amp_dtype(CPU)
    assert dtype is None and why.startswith("--amp: fp32") and "no native bfloat16" in why


def test_auto_on_this_cpu_follows_its_capability():
    dtype, why = amp.choose_amp_dtype(CPU)
    native = amp.native_dtypes(CPU)
    assert dtype == (torch.bfloat16 if torch.bfloat16 in native else None)
    assert amp.cpu_capability() in why and amp.cpu_name() in why
    if amp.cpu_capability() == "AVX2":
        assert native == ()


def test_auto_on_gpus_takes_bfloat16_from_compute_capability_8_and_float16_before(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    gpu = torch.device("cuda")
    dtype, why = amp.choose_amp_dtype(gpu)
    assert dtype == torch.float16 and "loss scaling" in why and "V100" in why
    assert isinstance(amp.make_grad_scaler(CPU, dtype), torch.amp.GradScaler)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert amp.choose_amp_dtype(gpu)[0] == torch.bfloat16
    assert amp.make_grad_scaler(CPU, torch.bfloat16) is None and amp.make_grad_scaler(CPU, None) is None


def test_an_emulated_type_runs_with_a_warning(monkeypatch):
    monkeypatch.setattr(amp, "native_dtypes", lambda device: ())
    with pytest.warns(UserWarning, match="--amp_dtype bfloat16: .* no native bfloat16; it runs emulated"):
        dtype, why = amp.choose_amp_dtype(CPU, "bfloat16")
    assert dtype == torch.bfloat16 and "emulated" in why


def test_a_type_the_device_cannot_run_stops_naming_the_flag():
    # torch has no autocast for the meta device: nothing can run there.
    with pytest.raises(ValueError, match="--amp_dtype float16: .*cannot run float16 autocast"):
        amp.choose_amp_dtype(torch.device("meta"), "float16")
    with pytest.raises(SystemExit, match="--amp_dtype float16"):
        amp.choose_precision(Namespace(amp=True, amp_dtype="float16"), torch.device("meta"))
    assert amp.choose_precision(Namespace(amp=False, amp_dtype="float16"), torch.device("meta")) == (None, None)
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        main_py.parse_args(["--amp_dtype", "float8"])


def test_the_autocast_probe_sees_a_type_that_autocast_would_disable():
    # CPU autocast turns itself off (with a warning only) for a type it does not support.
    assert "not supported" in amp.autocast_error(CPU, torch.float64)
    assert amp.autocast_error(CPU, torch.bfloat16) == ""


# The float16 runs train all but the backbone: CPUs compute float16 convolution weight gradients slowly (a reference
# kernel even on an Intel Xeon with AVX512-FP16: 7-12 s for the tiny model's backward, 2026-12-03), and what these
# tests check, the loss scaling, acts on every gradient alike.
FP16_FROZEN_BACKBONE = ("--lr_backbone", "0")


@pytest.fixture
def fp16_training(synthetic_root):
    """(model, criterion, optimizer, batches) for float16 steps of the tiny model on two synthetic batches."""
    import random

    import util.misc as utils
    from datasets import synthetic

    args = main_py.parse_args(tiny_flags(synthetic_root, "", *FP16_FROZEN_BACKBONE))
    args.num_classes = 6
    random.seed(0)
    torch.manual_seed(0)
    dataset = synthetic.build("train", args)
    batches = [utils.collate_fn([dataset[i] for i in range(j, j + 2)]) for j in (0, 2)]
    model, criterion, _, optimizer = tiny_detr_and_optimizer(args)
    return model, criterion, optimizer, batches


def test_the_loss_scale_grows_after_clean_steps_and_backs_off_on_an_overflow(fp16_training):
    model, criterion, optimizer, batches = fp16_training
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=2)
    stats = train_one_epoch(
        model, criterion, batches * 2, optimizer, CPU, epoch=0, max_norm=0.1, amp=torch.float16, scaler=scaler
    )
    # 4 clean steps, growth every 2: 8 -> 16 -> 32.
    assert stats["skipped_steps"] == 0 and stats["loss_scale"] == 32.0 and math.isfinite(stats["loss"])

    # One gradient becomes inf in the next step: the step is skipped, the weights stay, the scale halves.
    parameter = next(p for p in model.parameters() if p.requires_grad)
    handle = parameter.register_hook(lambda grad: torch.full_like(grad, math.inf))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adam_state = {k: v["exp_avg"].clone() for k, v in optimizer.state_dict()["state"].items()}
    stats = train_one_epoch(
        model, criterion, batches[:1], optimizer, CPU, epoch=1, max_norm=0.1, amp=torch.float16, scaler=scaler
    )
    handle.remove()
    assert stats["skipped_steps"] == 1 and stats["loss_scale"] == 16.0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    for k, v in optimizer.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], adam_state[k]), k

    # The run goes on: the next clean step updates the weights again.
    train_one_epoch(
        model, criterion, batches[:1], optimizer, CPU, epoch=2, max_norm=0.1, amp=torch.float16, scaler=scaler
    )
    assert not torch.equal(parameter, before[next(n for n, p in model.named_parameters() if p is parameter)])


def test_float16_steps_follow_fp32_within_half_precision(fp16_training, synthetic_root):
    model, criterion, optimizer, batches = fp16_training
    # A scale the untrained model's large gradients fit in float16 (the default 65536 skips the first steps).
    fp16 = train_one_epoch(
        model,
        criterion,
        batches,
        optimizer,
        CPU,
        epoch=0,
        max_norm=0.1,
        amp=torch.float16,
        scaler=torch.amp.GradScaler("cpu", init_scale=8.0),
    )
    args = main_py.parse_args(tiny_flags(synthetic_root, "", *FP16_FROZEN_BACKBONE))
    args.num_classes = 6
    model32, criterion32, _, optimizer32 = tiny_detr_and_optimizer(args)
    fp32 = train_one_epoch(model32, criterion32, batches, optimizer32, CPU, epoch=0, max_norm=0.1)
    assert fp16["skipped_steps"] == 0 and fp16["loss"] != fp32["loss"]
    assert fp16["loss"] == pytest.approx(fp32["loss"], rel=0.01)


@pytest.mark.slow
def test_the_scaler_state_survives_an_exact_resume(synthetic_root, tmp_path):
    flags = ("--no_plots", "--amp", "--amp_dtype", "float16", "--lr_drop", "5", *FP16_FROZEN_BACKBONE)
    with pytest.warns(UserWarning, match="emulated") if torch.float16 not in amp.native_dtypes(CPU) else nullcontext():
        _, printed = run_main(tiny_flags(synthetic_root, tmp_path / "straight", "--epochs", "2", *flags))
        run_main(tiny_flags(synthetic_root, tmp_path / "resumed", "--epochs", "1", *flags))
        run_main(
            tiny_flags(
                synthetic_root,
                tmp_path / "resumed",
                "--epochs",
                "2",
                *flags,
                "--resume",
                str(tmp_path / "resumed" / "checkpoint.pth"),
            )
        )
    assert "--amp: float16 autocast with loss scaling, as --amp_dtype asks" in printed
    straight, resumed = read_log(tmp_path / "straight" / "log.txt"), read_log(tmp_path / "resumed" / "log.txt")
    assert [r["epoch"] for r in resumed] == [0, 1]
    for a, b in zip(straight, resumed):
        assert a["train_loss"] == b["train_loss"] and a["test_coco_eval_bbox"] == b["test_coco_eval_bbox"]
        assert a["train_skipped_steps"] == b["train_skipped_steps"] and a["train_loss_scale"] == b["train_loss_scale"]
    a = load_checkpoint_safely(tmp_path / "straight" / "checkpoint.pth")
    b = load_checkpoint_safely(tmp_path / "resumed" / "checkpoint.pth")
    assert a["scaler"] == b["scaler"] and a["scaler"]["scale"] > 0
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_the_synthetic_recipe_is_sized_by_the_automatic_choice(monkeypatch):
    import datasets

    full, fp32 = datasets.recipe("synthetic"), datasets.recipe("synthetic", reduced_precision=False)
    assert (full["epochs"], full["batch_size"], full.get("backbone_width", 1.0)) == (15, 8, 1.0)
    assert (fp32["epochs"], fp32["batch_size"], fp32["backbone_width"]) == (15, 8, 0.5)
    assert fp32["amp"] is True  # --amp stays on: its automatic choice is fp32 there, and bfloat16 where it is fast
    monkeypatch.setattr(datasets, "automatic_choice_is_reduced", lambda device: False)
    args = main_py.parse_args(["--dataset_file", "synthetic"])
    assert (args.backbone_width, args.epochs, args.batch_size, args.amp_dtype) == (0.5, 15, 8, "auto")
    assert main_py.parse_args(["--dataset_file", "synthetic", "--backbone_width", "1"]).backbone_width == 1  # flags win
    monkeypatch.setattr(datasets, "automatic_choice_is_reduced", lambda device: True)
    assert main_py.parse_args(["--dataset_file", "synthetic"]).backbone_width == 1
    # This machine: the recipe follows what --amp would run here.
    assert amp.automatic_choice_is_reduced("cpu") == (amp.choose_amp_dtype(CPU)[0] is not None)


def numeric_settings():
    return {
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
    }


@pytest.fixture
def restored_numeric_settings(monkeypatch):
    """The process-wide settings that set_numeric_policy changes, put back after the test."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = numeric_settings()
    yield
    torch.backends.cuda.matmul.allow_tf32 = before["matmul_tf32"]
    torch.backends.cudnn.allow_tf32 = before["cudnn_tf32"]
    torch.backends.cudnn.deterministic = before["cudnn_deterministic"]
    torch.backends.cudnn.benchmark = before["cudnn_benchmark"]
    torch.use_deterministic_algorithms(before["deterministic"], warn_only=before["warn_only"])
    assert numeric_settings() == before


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default_kernels", "deterministic"])
def test_the_numeric_policy_sets_tf32_and_determinism_from_the_flags(restored_numeric_settings, fast, deterministic):
    # Start from the opposite of what the flags ask, so that every setting must be made.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not fast
    torch.backends.cudnn.deterministic = not deterministic
    torch.backends.cudnn.benchmark = True
    torch.use_deterministic_algorithms(not deterministic)
    line = amp.set_numeric_policy(fast, deterministic)
    settings = numeric_settings()
    assert settings["matmul_tf32"] is fast and settings["cudnn_tf32"] is fast
    assert settings["deterministic"] is deterministic and settings["cudnn_deterministic"] is deterministic
    if deterministic:
        # An operation without a deterministic kernel warns (naming it) instead of stopping the run.
        assert settings["warn_only"] and not settings["cudnn_benchmark"]
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    else:
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    assert ("TF32 allowed (--fast)" if fast else "TF32 off (--exact)") in line
    assert ("deterministic kernels" in line) is deterministic


def test_the_deterministic_setting_keeps_a_cublas_workspace_the_user_chose(restored_numeric_settings, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    amp.set_numeric_policy(fast=False, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize(
    "flags, expected",
    [([], (False, False)), (["--fast"], (True, False)), (["--fast", "--exact", "--deterministic"], (False, True))],
)
def test_main_sets_the_numeric_policy_of_its_flags_before_anything_else(monkeypatch, flags, expected):
    class Stop(Exception):
        pass

    calls = []

    def record(fast, deterministic):
        calls.append((fast, deterministic))
        raise Stop

    monkeypatch.setattr(main_py, "set_numeric_policy", record)
    monkeypatch.setattr(main_py.utils, "join_process_group", lambda args: pytest.fail("set after distributed"))
    with pytest.raises(Stop):
        main_py.main(main_py.parse_args(["--device", "cpu", *flags]))
    assert calls == [expected]
