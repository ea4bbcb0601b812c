"""The fault matrix: a run killed anywhere, damaged and hostile checkpoints, a lost process of a distributed run.
Whatever happens, the run can continue and nothing already saved is lost. (A full disk, a non-finite loss and bad
annotations are in test_main.py; bad images and boxes in test_coco.py. docs/checkpoints.md lists every case.)"""

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import (
    MASK_HEAD_FLAGS,
    REPO_ROOT,
    file_digest,
    free_port,
    load_checkpoint_safely,
    run_main,
    tensorboard_scalars,
    tiny_flags,
)

# Three epochs with a learning-rate drop after the second (so checkpoint0001.pth is kept), dropout on so that
# the model draws from the generators too.
RUN_FLAGS = ("--epochs", "3", "--lr_drop", "2", "--dropout", "0.1")

# Runs main.py in a child process that SIGKILLs itself at the N-th time it reaches POINT: no handler, no
# clean-up, as the OOM killer or a lost node stops a job.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, os.getcwd())
    import torch
    import main as main_py
    import util.misc
    from datasets.coco_eval import CocoEvaluator

    point, nth = os.environ["KILL_AT"], int(os.environ["KILL_NTH"])
    rank = int(os.environ.get("RANK", "0"))
    calls = 0

    def reached(last_act=None):
        global calls
        calls += 1
        if calls == nth and rank == int(os.environ.get("KILL_RANK", "0")):
            if last_act is not None:
                last_act()
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(owner, name, before=None):
        real = getattr(owner, name)
        def wrapped(*args, **kwargs):
            if before is None or before(*args, **kwargs):
                reached()
            return real(*args, **kwargs)
        setattr(owner, name, wrapped)

    if point == "mid-step":  # after the backward pass, before the weights change
        wrap(torch.optim.AdamW, "step")
    elif point == "during evaluation":
        wrap(CocoEvaluator, "update")
    elif point == "between the log line and the checkpoint":
        wrap(util.misc, "save_on_master", lambda obj, path, *a, **k: Path(path).name == "checkpoint.pth")
    elif point == "during the checkpoint write":
        real_save = torch.save
        def save(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            if ".tmp." in str(f) and Path(f).name.startswith("checkpoint.pth"):
                # Half of the file on disk when the process dies.
                reached(lambda: os.truncate(f, os.path.getsize(f) // 2))
        torch.save = save
    main_py.main(main_py.parse_args(sys.argv[1:]))
""")


def run_killed(flags, point: str, nth: int, tmp_path: Path, command_prefix=(), env_extra=None):
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = dict(os.environ, OMP_NUM_THREADS="1", KILL_AT=point, KILL_NTH=str(nth), **(env_extra or {}))
    command = [*command_prefix, str(script), *flags] if command_prefix else [sys.executable, str(script), *flags]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(synthetic_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_main(tiny_flags(synthetic_root, out, *RUN_FLAGS))
    return out


def assert_same_run(a: Path, b: Path) -> None:
    assert (a / "log.txt").read_text() == (b / "log.txt").read_text()
    for name in ("checkpoint.pth", "checkpoint0001.pth"):
        x, y = load_checkpoint_safely(a / name), load_checkpoint_safely(b / name)
        assert x["epoch"] == y["epoch"]
        for k in x["model"]:
            assert torch.equal(x["model"][k], y["model"][k]), (name, k)
        assert x["optimizer"]["state"].keys() == y["optimizer"]["state"].keys()
        for i in x["optimizer"]["state"]:
            assert torch.equal(x["optimizer"]["state"][i]["exp_avg"], y["optimizer"]["state"][i]["exp_avg"])


# ------------------------------------------------------------------------------------------ killed anywhere

# 16 training images in batches of 4: 4 steps an epoch; 8 val images: 2 evaluation batches an epoch.
KILL_POINTS = [
    ("mid-step", 6),  # epoch 1, second step
    ("during evaluation", 4),  # epoch 1, second batch
    ("during the checkpoint write", 2),  # epoch 1's checkpoint.pth, half written
    ("between the log line and the checkpoint", 2),  # epoch 1 logged, not saved
    ("between the log line and the checkpoint", 1),  # epoch 0 logged, no checkpoint yet
]


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", KILL_POINTS, ids=[f"{p.replace(' ', '_')}_{n}" for p, n in KILL_POINTS])
def test_a_run_killed_anywhere_resumes_to_the_same_weights_and_log(point, nth, uninterrupted, synthetic_root, tmp_path):
    out = tmp_path / "out"
    killed = run_killed(tiny_flags(synthetic_root, out, *RUN_FLAGS), point, nth, tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    if point == "during the checkpoint write":
        assert list(out.glob("checkpoint.pth.tmp.*")), "the kill did not land in the write"
    _, printed = run_main(tiny_flags(synthetic_root, out, *RUN_FLAGS, "--auto_resume"))
    assert_same_run(uninterrupted, out)
    assert not list(out.glob("**/*.tmp*")), "temporary files left behind"
    if point == "during the checkpoint write":
        assert "left half-written by a stopped run" in printed


@pytest.mark.slow
def test_tensorboard_after_a_kill_and_auto_resume_holds_every_step_once(uninterrupted, synthetic_root, tmp_path):
    out = tmp_path / "out"
    # Epoch 1 trained, evaluated and its events on disk, then killed before its checkpoint: it is redone. (No
    # pictures, to save time: drawn under isolated_rng, they change nothing of the run.)
    killed = run_killed(
        tiny_flags(synthetic_root, out, *RUN_FLAGS, "--no_plots"),
        "between the log line and the checkpoint",
        2,
        tmp_path,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    before = tensorboard_scalars(out / "tensorboard")
    assert [step for step, _ in before["train/loss"]] == [0, 3, 4, 7]  # epoch 1's steps were written
    run_main(tiny_flags(synthetic_root, out, *RUN_FLAGS, "--no_plots", "--auto_resume"))
    expected, got = tensorboard_scalars(uninterrupted / "tensorboard"), tensorboard_scalars(out / "tensorboard")
    assert got.keys() == expected.keys() and "test/bbox/AP" in got
    for tag in expected:
        steps = [step for step, _ in got[tag]]
        assert steps == sorted(set(steps)) == [step for step, _ in expected[tag]], tag
        # The same run to the last bit: the redone epoch's values, not the killed one's, and those match too.
        assert [value for _, value in got[tag]] == [value for _, value in expected[tag]], tag


# ------------------------------------------------------------------------------------------ damaged checkpoints


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def flip_a_bit_in_the_weights(path: Path) -> None:
    data = bytearray(path.read_bytes())
    # The tensor data sits in the middle of the file, between the pickle and the zip directory.
    data[len(data) // 2] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.fixture
def damaged_run(uninterrupted, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


def digests(folder: Path) -> dict:
    return {p.relative_to(folder): file_digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "damage, what",
    [(truncate, "is cut short"), (flip_a_bit_in_the_weights, "is damaged")],
    ids=["truncated", "bit_flipped"],
)
def test_a_damaged_checkpoint_is_named_by_resume_and_auto_resume(damage, what, damaged_run, synthetic_root):
    damage(damaged_run / "checkpoint.pth")
    before = digests(damaged_run)
    with pytest.raises(SystemExit) as stopped:
        run_main(tiny_flags(synthetic_root, damaged_run, *RUN_FLAGS, "--resume", str(damaged_run / "checkpoint.pth")))
    message = str(stopped.value.code)
    assert message.startswith(f"--resume: checkpoint {damaged_run / 'checkpoint.pth'} {what}"), message

    with pytest.raises(SystemExit) as stopped:
        run_main(tiny_flags(synthetic_root, damaged_run, *RUN_FLAGS, "--auto_resume"))
    message = str(stopped.value.code)
    assert f"checkpoint {damaged_run / 'checkpoint.pth'} {what}" in message
    assert "Nothing was overwritten" in message
    assert f"--resume {damaged_run / 'checkpoint0001.pth'}" in message  # the copy kept before the lr drop
    assert digests(damaged_run) == before


def test_auto_resume_with_no_intact_copy_says_so(damaged_run, synthetic_root):
    flip_a_bit_in_the_weights(damaged_run / "checkpoint.pth")
    truncate(damaged_run / "checkpoint0001.pth")
    before = digests(damaged_run)
    with pytest.raises(SystemExit, match="No intact copy of an earlier epoch"):
        run_main(tiny_flags(synthetic_root, damaged_run, *RUN_FLAGS, "--auto_resume"))
    assert digests(damaged_run) == before


def test_the_named_intact_copy_resumes(damaged_run, uninterrupted, synthetic_root):
    truncate(damaged_run / "checkpoint.pth")
    run_main(tiny_flags(synthetic_root, damaged_run, *RUN_FLAGS, "--resume", str(damaged_run / "checkpoint0001.pth")))
    assert_same_run(uninterrupted, damaged_run)


# ------------------------------------------------------------------------------------------ hostile files


class Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do instead (run any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture
def hostile(uninterrupted, tmp_path):
    """A checkpoint of the tiny model that also carries a payload; and the file the payload would create."""
    marker = tmp_path / "payload_ran"
    checkpoint = load_checkpoint_safely(uninterrupted / "checkpoint.pth")
    checkpoint["extra"] = Payload(marker)
    path = tmp_path / "hostile.pth"
    torch.save(checkpoint, path)
    return path, marker


def assert_refused(message: str, path: Path, marker: Path) -> None:
    assert str(path) in message and "refused" in message and "GLOBAL io.open" in message, message
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("flag", ["--resume", "--finetune", "--frozen_weights"])
def test_main_refuses_a_hostile_checkpoint(flag, hostile, synthetic_root, tmp_path):
    path, marker = hostile
    # The mask head's group norms need a wider model than the tiny one.
    extra = ("--masks", *MASK_HEAD_FLAGS) if flag == "--frozen_weights" else ()
    with pytest.raises(SystemExit) as stopped:
        run_main(tiny_flags(synthetic_root, tmp_path / "out", *RUN_FLAGS, *extra, flag, str(path)))
    assert str(stopped.value.code).startswith(f"{flag}: ")
    assert_refused(str(stopped.value.code), path, marker)


def test_hub_entry_points_refuse_a_hostile_local_file(tmp_path):
    import hubconf

    marker = tmp_path / "payload_ran"
    path = tmp_path / "hostile.pth"
    torch.save({"model": {}, "extra": Payload(marker)}, path)
    with pytest.raises(RuntimeError) as error:
        hubconf.detr_resnet50(pretrained=str(path))
    assert_refused(str(error.value), path, marker)


@pytest.mark.parametrize(
    "tool, extra",
    [
        ("predict", ["--output_dir", "{out}"]),
        ("attention", ["--output_dir", "{out}"]),
        ("export_onnx", ["--output", "{out}/model.onnx"]),
    ],
)
def test_tools_refuse_a_hostile_checkpoint(tool, extra, hostile, synthetic_root, tmp_path):
    import importlib

    path, marker = hostile
    module = importlib.import_module(f"tools.{tool}")
    image = next((synthetic_root / "val2017").glob("*.jpg"))
    argv = ["--resume", str(path), "--device", "cpu"] + [a.format(out=tmp_path) for a in extra]
    if tool != "export_onnx":
        argv.append(str(image))
    with pytest.raises(SystemExit) as stopped:
        module.main(argv)
    assert_refused(str(stopped.value.code), path, marker)


def test_backbone_weights_refuse_a_hostile_file(tmp_path):
    from models.backbone import load_backbone_weights

    marker = tmp_path / "payload_ran"
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_backbone_weights("resnet18", str(path))
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ distributed


@pytest.mark.slow
def test_a_lost_process_of_a_distributed_run_stops_the_others_and_the_run_resumes(
    uninterrupted, synthetic_root, tmp_path
):
    out = tmp_path / "out"
    flags = tiny_flags(synthetic_root, out, *RUN_FLAGS, "--dist_timeout", "120")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    ]
    # Two processes, each with half of the 16 images in batches of 4: 2 steps an epoch each; rank 1 dies in
    # epoch 1's second step.
    started = time.monotonic()
    killed = run_killed(flags, "mid-step", 4, tmp_path, command_prefix=torchrun, env_extra={"KILL_RANK": "1"})
    # The whole run, start-up included, ends well within --dist_timeout: rank 0 is stopped, not left waiting.
    assert time.monotonic() - started < 120
    assert killed.returncode != 0
    # torchrun names the lost process as the root cause of the failure.
    root_cause = killed.stderr.partition("Root Cause")[2]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause) and "SIGKILL" in root_cause, killed.stderr[-3000:]
    checkpoint = load_checkpoint_safely(out / "checkpoint.pth")  # intact, from the last finished epoch
    assert checkpoint["epoch"] == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun[-1] = str(free_port())
    resumed = subprocess.run(
        [*torchrun, "main.py", *flags, "--auto_resume"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len((out / "log.txt").read_text().splitlines()) == 3
    assert load_checkpoint_safely(out / "checkpoint.pth")["epoch"] == 2
    assert not list(out.glob("**/*.tmp*"))


@pytest.mark.slow
def test_without_torchrun_the_survivor_says_a_process_was_lost(synthetic_root, tmp_path):
    """Processes started one by one (as Slurm's srun starts them): the survivor stops at once and says so."""
    out = tmp_path / "out"
    flags = tiny_flags(synthetic_root, out, *RUN_FLAGS, "--dist_timeout", "120")
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    base = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        KILL_AT="mid-step",
        KILL_NTH="4",
        KILL_RANK="1",
    )
    started = time.monotonic()
    survivor = subprocess.Popen(
        [sys.executable, "main.py", *flags],
        cwd=REPO_ROOT,
        env=dict(base, RANK="0", LOCAL_RANK="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim = subprocess.Popen(
        [sys.executable, str(script), *flags],
        cwd=REPO_ROOT,
        env=dict(base, RANK="1", LOCAL_RANK="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, stderr = survivor.communicate(timeout=300)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert survivor.returncode == 1 and time.monotonic() - started < 120
    assert "rank 0 of 2: another process of this run was lost" in stderr, stderr[-3000:]
    assert f"The last checkpoint, {out / 'checkpoint.pth'}, is intact" in stderr
    assert load_checkpoint_safely(out / "checkpoint.pth")["epoch"] == 0
