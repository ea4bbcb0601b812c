"""run_with_submitit.py: its flags and Slurm script, the Trainer's environment and requeue, and end to end through
submitit's local executor on this CPU: the same training as torchrun, a preempted job that resumes exactly, and
the refusal to resume a checkpoint of another model configuration."""

import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path

import pytest
import submitit
import torch

import datasets
import main as main_py
import run_with_submitit
from helpers import REPO_ROOT, run_main, tiny_flags
from test_multinode import assert_same_training, finish, read_log, run, start, torchrun_reference, training_flags


def submit_flags(job_dir, *extra: str):
    return ["--job_dir", f"{job_dir}/%j", *extra]


# ---------------------------------------------------------------------------------------------- flags


def test_defaults_are_the_originals_and_the_output_goes_to_the_job_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = run_with_submitit.parse_args(["--coco_path", "/data/coco"])
    assert (args.ngpus, args.nodes, args.timeout, args.partition, args.use_volta32) == (8, 4, 2800, None, False)
    assert args.cluster == "slurm"
    assert args.job_dir == str(tmp_path / "experiments" / "%j")
    assert args.output_dir == args.job_dir  # %j becomes the job id when the job runs
    # A fresh rendezvous file per submission, next to the job folders.
    assert args.dist_url.startswith(f"file://{tmp_path / 'experiments'}/") and args.dist_url.endswith("_init")
    assert run_with_submitit.parse_args(["--coco_path", "/data/coco"]).dist_url != args.dist_url
    # main.py's flags and defaults come along.
    assert (args.lr, args.batch_size, args.backbone, args.epochs) == (1e-4, 2, "resnet50", 300)


def test_dataset_defaults_apply_as_in_main_and_given_flags_win(tmp_path):
    argv = [
        "--dataset_file",
        "synthetic",
        "--hidden_dim",
        "32",
        "--output_dir",
        str(tmp_path / "out"),
        "--dist_url",
        "env://",
        "--job_dir",
        str(tmp_path / "jobs"),
    ]
    args = run_with_submitit.parse_args(argv)
    expected = main_py.parse_args(argv[:6])
    for name in datasets.recipe("synthetic"):
        assert getattr(args, name) == getattr(expected, name), name
    assert args.hidden_dim == 32 and args.backbone == "resnet18"
    assert args.dist_url == "env://"


def test_local_and_debug_clusters_refuse_what_they_cannot_run(capsys, monkeypatch):
    with pytest.raises(SystemExit):
        run_with_submitit.parse_args(["--cluster", "local"])  # --nodes 4 by default
    assert "--cluster local runs on this machine only: pass --nodes 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_with_submitit.parse_args(["--cluster", "debug", "--nodes", "1", "--ngpus", "2"])
    assert "--ngpus 1" in capsys.readouterr().err
    # On a machine with one GPU: two GPU tasks cannot run, two CPU processes can.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    local = ["--cluster", "local", "--nodes", "1", "--ngpus", "2"]
    with pytest.raises(SystemExit):
        run_with_submitit.parse_args(local)
    assert "--ngpus 2: this machine has 1 GPU(s)" in capsys.readouterr().err
    assert run_with_submitit.parse_args(local + ["--device", "cpu"]).ngpus == 2


def fake_slurm(folder: Path) -> Path:
    """sbatch and srun stand-ins: sbatch keeps the script it is given and answers with a job id."""
    folder.mkdir()
    (folder / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n')
    (folder / "srun").write_text("#!/bin/sh\nexit 0\n")
    for name in ("sbatch", "srun"):
        (folder / name).chmod(stat.S_IRWXU)
    return folder


def test_slurm_job_asks_for_one_task_per_gpu_and_requeues_on_usr2(tmp_path, monkeypatch, capsys):
    bin_dir = fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() extends it; restored after
    job = run_with_submitit.main(
        [
            "--coco_path",
            "/data/coco",
            "--nodes",
            "2",
            "--ngpus",
            "4",
            "--timeout",
            "60",
            "--partition",
            "gpu",
            "--use_volta32",
            "--comment",
            "deadline soon",
            *submit_flags(tmp_path / "jobs"),
        ]
    )
    assert job.job_id == "4242"
    assert "Submitted job 4242 (slurm)" in capsys.readouterr().out
    script = (bin_dir / "submitted.sh").read_text()
    for line in (
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--cpus-per-task=10",
        "--mem=160GB",
        "--time=60",
        "--partition=gpu",
        "--constraint=volta32gb",
        "--comment='deadline soon'",
        "--signal=USR2@120",
        "--job-name=detr",
    ):
        assert f"#SBATCH {line}\n" in script, line
    # The tasks import main.py wherever they start.
    assert str(REPO_ROOT) in os.environ["PYTHONPATH"].split(os.pathsep)
    submitted = submitit.core.utils.DelayedSubmission.load(tmp_path / "jobs" / "4242" / "4242_submitted.pkl")
    trainer = submitted.function
    assert isinstance(trainer, run_with_submitit.Trainer)
    assert trainer.args.output_dir == str(tmp_path / "jobs" / "%j") and not trainer.args.auto_resume


def local_task_environment(monkeypatch, job_id="77", rank=1, tasks=2):
    """The variables submitit's local executor gives task `rank` of `tasks`."""
    for name, value in dict(
        SUBMITIT_EXECUTOR="local",
        SUBMITIT_LOCAL_JOB_ID=job_id,
        SUBMITIT_LOCAL_GLOBALID=str(rank),
        SUBMITIT_LOCAL_LOCALID=str(rank),
        SUBMITIT_LOCAL_NTASKS=str(tasks),
        SUBMITIT_LOCAL_NODEID="0",
        SUBMITIT_LOCAL_JOB_NUM_NODES="1",
    ).items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # absent, and removed again after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_trainer_runs_main_as_one_process_of_the_job(tmp_path, monkeypatch):
    local_task_environment(monkeypatch, job_id="77", rank=1, tasks=2)
    args = run_with_submitit.parse_args(
        [
            "--dataset_file",
            "synthetic",
            "--cluster",
            "local",
            "--nodes",
            "1",
            "--ngpus",
            "2",
            *submit_flags(tmp_path / "jobs"),
        ]
    )
    seen = {}

    def fake_main(main_args):
        seen.update(args=main_args, env={k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
        main_args.start_epoch = 5  # main fills in args; the Trainer's own copy must not change
        return "stats"

    monkeypatch.setattr(main_py, "main", fake_main)
    assert run_with_submitit.Trainer(args)() == "stats"
    assert seen["env"] == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert seen["args"].output_dir == str(tmp_path / "jobs" / "77")
    assert seen["args"].dist_url == args.dist_url and args.start_epoch == 0


def test_checkpoint_requeues_the_same_training_with_auto_resume_and_a_new_rendezvous(tmp_path, monkeypatch):
    local_task_environment(monkeypatch, job_id="77", rank=0)
    args = run_with_submitit.parse_args(
        ["--dataset_file", "synthetic", "--resume", "/models/start.pth", *submit_flags(tmp_path / "jobs")]
    )
    trainer = run_with_submitit.Trainer(args)

    requeued = trainer.checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    new = requeued.function
    assert isinstance(new, run_with_submitit.Trainer) and new is not trainer
    assert new.args.auto_resume and not args.auto_resume
    assert new.args.output_dir == str(tmp_path / "jobs" / "77")
    assert new.args.dist_url != args.dist_url and new.args.dist_url.endswith("_init")
    # No checkpoint of its own yet: it starts again from the given one.
    assert new.args.resume == "/models/start.pth"
    for name in ("lr", "epochs", "hidden_dim", "backbone", "job_dir", "dataset_file"):
        assert getattr(new.args, name) == getattr(args, name)

    (tmp_path / "jobs" / "77").mkdir(parents=True)
    (tmp_path / "jobs" / "77" / "checkpoint.pth").touch()
    assert trainer.checkpoint().function.args.resume == ""  # --auto_resume takes output_dir/checkpoint.pth


# ---------------------------------------------------------------------------------------------- end to end


def local_job(root, job_dir, *extra: str):
    """The command training on 2 CPU processes through submitit's local executor."""
    return [
        sys.executable,
        "run_with_submitit.py",
        "--cluster",
        "local",
        "--nodes",
        "1",
        "--ngpus",
        "2",
        *submit_flags(job_dir),
        *training_flags(root),
        *extra,
    ]


def job_output(job_dir: Path) -> Path:
    """The one job folder under job_dir (the job's output_dir by default)."""
    folders = [p for p in job_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    assert len(folders) == 1, folders
    return folders[0]


@pytest.mark.slow
def test_local_executor_generates_its_data_and_trains_exactly_like_torchrun(synthetic_root, tmp_path_factory, tmp_path):
    reference = torchrun_reference(synthetic_root, tmp_path_factory)
    # The job draws the data itself, as a first run does: rank 0 in a pool of 2 processes (where a pool forked from
    # the threaded task could hang), rank 1 waiting for it. The same flags give the same files as synthetic_root.
    root = tmp_path / "data"
    output = run(local_job(root, tmp_path / "jobs", "--synthetic_workers", "2"))
    out = job_output(tmp_path / "jobs")
    assert f"training output in {out}" in output
    task_logs = [(out / f"{out.name}_{rank}_log.out").read_text() for rank in (0, 1)]
    assert "rank 0 of 2, backend gloo" in task_logs[0]
    generating = f"Generating the synthetic dataset in {root} (16 train, 8 val images of 64x64, seed 0; 2 drawing"
    assert generating in task_logs[0]
    assert "Generating" not in task_logs[1]
    assert sorted(p.name for p in root.parent.iterdir() if p.name.startswith(".data")) == [".data.lock"]
    assert_same_training(reference, out)


def task_processes(session: int):
    """Process ids of the submitit tasks started in `session`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if os.getsid(int(entry)) == session and b"submitit.core._submit" in command:
                pids.append(int(entry))
        except (OSError, ProcessLookupError):
            continue  # ended meanwhile
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the job's tasks through /proc")
def test_a_preempted_job_requeues_and_ends_like_an_uninterrupted_run(synthetic_root, tmp_path_factory, tmp_path):
    reference = torchrun_reference(synthetic_root, tmp_path_factory)
    job_dir = tmp_path / "jobs"
    launcher = start(local_job(synthetic_root, job_dir), log_path=tmp_path / "launcher.log")
    # Wait until the second epoch's first iteration is done, then signal every task as Slurm does when it
    # preempts a job (SIGTERM, which submitit ignores, then its USR2): the epoch is cut in the middle.
    deadline = time.monotonic() + 240
    task_log = None
    while task_log is None or "epoch 1/2  step 0/2" not in task_log.read_text():
        assert launcher.poll() is None, (tmp_path / "launcher.log").read_text()[-5000:]
        assert time.monotonic() < deadline, "the job did not reach its second epoch"
        time.sleep(0.05)
        logs = list(job_dir.glob("*/*_0_log.out"))
        task_log = logs[0] if logs else None
    tasks = task_processes(launcher.pid)
    assert len(tasks) == 2
    for sig in (signal.SIGTERM, signal.SIGUSR2):
        for pid in tasks:
            os.kill(pid, sig)
    finish(launcher)
    assert launcher.returncode == 0, (tmp_path / "launcher.log").read_text()[-5000:]

    out = job_output(job_dir)
    log = task_log.read_text()
    # Requeued once; the second run resumed from the checkpoint of epoch 0 and redid epoch 1.
    assert log.count(f"Requeuing: the job will resume from {out}/checkpoint.pth") == 1
    assert log.count(f"--auto_resume: resuming from {out}/checkpoint.pth") == 1
    assert log.count("epoch 0/2  step 0/2") == 1 and log.count("epoch 1/2  step 0/2") == 2
    assert [row["epoch"] for row in read_log(out / "log.txt")] == [0, 1]
    assert_same_training(reference, out)


@pytest.fixture(scope="module")
def finished_run(synthetic_root, tmp_path_factory):
    """A single-process run of 2 epochs that keeps the checkpoint of each (--lr_drop 1)."""
    out = tmp_path_factory.mktemp("finished")
    run_main(tiny_flags(synthetic_root, out, "--epochs", "2", "--lr_drop", "1", "--dropout", "0.1", "--no_plots"))
    return out


@pytest.mark.slow
def test_a_job_stopped_between_its_log_line_and_its_checkpoint_logs_each_epoch_once(
    finished_run, synthetic_root, tmp_path
):
    # The state a job leaves when stopped after writing epoch 1's line but before saving its checkpoint.
    shutil.copy(finished_run / "log.txt", tmp_path / "log.txt")
    shutil.copy(finished_run / "checkpoint0000.pth", tmp_path / "checkpoint.pth")
    assert [row["epoch"] for row in read_log(tmp_path / "log.txt")] == [0, 1]
    with open(tmp_path / "log.txt", "a") as f:
        f.write('{"train_lr": 0.0001, "train_cl')  # and a line cut short by a kill, for good measure
    _, printed = run_main(
        tiny_flags(
            synthetic_root,
            tmp_path,
            "--epochs",
            "2",
            "--lr_drop",
            "1",
            "--dropout",
            "0.1",
            "--no_plots",
            "--auto_resume",
        )
    )
    assert f"--auto_resume: resuming from {tmp_path / 'checkpoint.pth'}" in printed
    assert "removed 2 line(s) of epochs from 1 on" in printed
    assert_same_training(finished_run, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, named",
    [
        (("--hidden_dim", "16"), "--hidden_dim: checkpoint 32, this run 16"),
        # These change no weight's shape or name: the weights alone would load.
        (("--nheads", "4"), "--nheads: checkpoint 2, this run 4"),
        (("--backbone_norm", "frozen"), "--backbone_norm: checkpoint 'batch', this run 'frozen'"),
    ],
)
def test_a_requeued_job_refuses_a_checkpoint_of_another_configuration(
    finished_run, synthetic_root, tmp_path, flags, named
):
    shutil.copy(finished_run / "checkpoint.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError) as error:
        run_main(tiny_flags(synthetic_root, tmp_path, "--epochs", "3", "--no_plots", "--auto_resume", *flags))
    message = str(error.value)
    assert f"--resume {tmp_path / 'checkpoint.pth'} was trained with another model configuration" in message
    assert named in message
    if flags[0] == "--hidden_dim":
        assert "shape mismatches" in message  # and the weights that do not fit
    assert not (tmp_path / "log.txt").exists()
