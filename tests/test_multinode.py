"""Several nodes on this machine: two torchrun "nodes" of one process each train exactly like one node with two
processes, and a rendezvous that cannot complete fails within --dist_timeout with a message saying what to check.

Also home of the launch helpers and of the two-process torchrun reference run that test_submitit.py compares with.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from helpers import REPO_ROOT, free_port, load_checkpoint_safely, tiny_flags
from util.visualize import read_log

# Dropout on: an exact match then also needs every process's own draws from torch's generator to line up.
# A bounded --dist_timeout: a process whose peers are gone fails in a minute instead of hanging the tests.
EXTRA_FLAGS = ("--epochs", "2", "--dropout", "0.1", "--no_plots", "--dist_timeout", "60")
RUN_TIMEOUT_S = 300


def training_flags(root) -> List[str]:
    """main.py's flags of the distributed runs compared here: the tiny configuration of the tests, two epochs,
    and no --output_dir (each launch sets its own)."""
    flags = tiny_flags(root, "", *EXTRA_FLAGS)
    i = flags.index("--output_dir")
    return flags[:i] + flags[i + 2 :]


def start(command: Sequence[str], env: Dict[str, str] = None, log_path=None) -> subprocess.Popen:
    """Start a command from the repository root in a session of its own (so that it and every process it starts
    can be stopped together), with one CPU thread; its output goes to log_path, or is captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    out = open(log_path, "w") if log_path else subprocess.PIPE
    process = subprocess.Popen(
        list(command), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    if log_path:
        out.close()  # the child has its own copy
    return process


def finish(process: subprocess.Popen, timeout: float = RUN_TIMEOUT_S) -> str:
    """Wait for a started command and return its captured output ("" when it went to a file). Past the timeout,
    its whole session is killed and the test fails."""
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"{process.args} did not finish within {timeout} s")
    return output or ""


def run(command: Sequence[str], env: Dict[str, str] = None, timeout: float = RUN_TIMEOUT_S) -> str:
    """Run a command to completion; it must succeed. Returns its output."""
    process = start(command, env)
    output = finish(process, timeout)
    assert process.returncode == 0, f"{command} failed:\n{output[-6000:]}"
    return output


def torchrun(*options: str) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", *options]


def torchrun_reference(root, tmp_path_factory) -> Path:
    """Output folder of `torchrun --nproc_per_node 2 main.py <training_flags>`: computed once per session."""
    out = tmp_path_factory.getbasetemp() / "torchrun_2_processes"
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)  # what a failed attempt left
        run(
            torchrun(
                "--nproc_per_node",
                "2",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(free_port()),
                "main.py",
                *training_flags(root),
                "--output_dir",
                str(out),
            )
        )
        (out / "done").touch()
    return out


def assert_same_training(expected_dir, actual_dir, atol: float = 1e-6) -> None:
    """Same final weights (within atol), and log.txt with the same epochs, once each, and the same losses."""
    expected, actual = (
        load_checkpoint_safely(expected_dir / "checkpoint.pth"),
        load_checkpoint_safely(actual_dir / "checkpoint.pth"),
    )
    assert actual["epoch"] == expected["epoch"]
    assert actual["model"].keys() == expected["model"].keys()
    for k, v in expected["model"].items():
        torch.testing.assert_close(actual["model"][k], v, rtol=0, atol=atol, msg=k)
    expected_log, actual_log = read_log(expected_dir / "log.txt"), read_log(actual_dir / "log.txt")
    assert [row["epoch"] for row in actual_log] == [row["epoch"] for row in expected_log]
    for e, a in zip(expected_log, actual_log):
        losses = [k for k in e if "loss" in k]
        assert losses and set(losses) <= set(a)
        assert [a[k] for k in losses] == pytest.approx([e[k] for k in losses], rel=1e-6, abs=1e-6), e["epoch"]


@pytest.mark.slow
def test_two_nodes_of_one_process_train_like_one_node_of_two(synthetic_root, tmp_path_factory, tmp_path):
    reference = torchrun_reference(synthetic_root, tmp_path_factory)
    out = tmp_path / "out"
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [
        start(
            torchrun(
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                endpoint,
                "--rdzv_id",
                "two_nodes",
                "main.py",
                *training_flags(synthetic_root),
                "--output_dir",
                str(out),
            ),
            log_path=tmp_path / f"node{rank}.log",
        )
        for rank in (0, 1)
    ]
    for rank, node in enumerate(nodes):
        finish(node)
        assert node.returncode == 0, (tmp_path / f"node{rank}.log").read_text()[-6000:]
    logs = "".join((tmp_path / f"node{rank}.log").read_text() for rank in (0, 1))
    assert "rank 0 of 2" in logs and "rank 1 of 2" in logs  # one process per node, one group of two
    assert_same_training(reference, out)


@pytest.mark.slow
def test_a_rendezvous_that_cannot_complete_fails_within_the_timeout_and_says_what_to_check(synthetic_root, tmp_path):
    flags = tiny_flags(synthetic_root, tmp_path / "out", "--dist_timeout", "5")
    port = free_port()
    cases = {
        # A second node whose first node never came up: nobody listens at MASTER_ADDR:MASTER_PORT.
        "nobody listens": dict(
            RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        ),
        # The first node, told the world has two processes, alone.
        "world size too large": dict(
            RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        ),
    }
    began = time.monotonic()
    processes = {name: start([sys.executable, "main.py", *flags], env) for name, env in cases.items()}
    for name, process in processes.items():
        output = finish(process, timeout=180)
        elapsed = time.monotonic() - began
        assert process.returncode != 0, output[-3000:]
        # 5 s of waiting, the rest is starting Python and torch (on a busy machine); the default is 30 minutes.
        assert elapsed < 120, f"{name}: failed only after {elapsed:.0f} s"
        message = output[output.index("could not join") :] if "could not join" in output else output[-3000:]
        assert (
            f"rank {cases[name]['RANK']} of 2 could not join the other processes (within --dist_timeout 5 s)" in output
        ), message
        assert f"MASTER_ADDR:MASTER_PORT = 127.0.0.1:{cases[name]['MASTER_PORT']}" in message
        assert "all WORLD_SIZE = 2 processes were started" in message
    assert not (tmp_path / "out" / "log.txt").exists()
