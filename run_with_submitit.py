"""Run main.py on a Slurm cluster through submitit: `python run_with_submitit.py --nodes 2 --ngpus 8 --coco_path ...`.

Takes every flag of main.py plus the job's size and place. The job runs one task per GPU; the tasks find each
other through a file in the job folder. When Slurm preempts the job or its time runs out, submitit calls
Trainer.checkpoint, which requeues the same training with --auto_resume: it continues from
output_dir/checkpoint.pth, the last finished epoch. `--cluster local` runs the same tasks on this machine
(CPU processes talking gloo when there is no GPU), to try a configuration before spending cluster time.
"""

import argparse
import copy
import os
import sys
import uuid
from pathlib import Path

import submitit
import torch

import main as detr_main
from datasets import parse_args_with_recipe

CODE_DIR = os.path.dirname(os.path.abspath(__file__))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Submit DETR training with submitit", parents=[detr_main.get_args_parser()])
    parser.add_argument(
        "--ngpus", default=8, type=int, help="GPUs per node, one task each (with --cluster local on a CPU: processes)"
    )
    parser.add_argument("--nodes", default=4, type=int, help="number of nodes")
    parser.add_argument(
        "--timeout",
        default=2800,
        type=int,
        help="minutes a job may run; it is then requeued and resumes from its checkpoint",
    )
    parser.add_argument(
        "--partition", default=None, type=str, help="Slurm partition (default: the cluster's default partition)"
    )
    parser.add_argument("--use_volta32", action="store_true", help="ask for 32 GB V100s (Slurm constraint volta32gb)")
    parser.add_argument(
        "--comment", default="", type=str, help="Slurm comment, e.g. why a job needs priority; shown by squeue"
    )
    parser.add_argument(
        "--job_dir",
        default="experiments/%j",
        type=str,
        help="folder of submitit's logs and the rendezvous file, and output_dir unless that is "
        "given; %%j becomes the job id. Every node must see it (a shared file system)",
    )
    parser.add_argument("--cpus_per_task", default=10, type=int, help="CPU cores per task (data loading)")
    parser.add_argument("--mem_per_gpu", default=40, type=int, help="GB of memory asked for each GPU's task")
    parser.add_argument(
        "--cluster",
        default="slurm",
        choices=("slurm", "local", "debug"),
        help="slurm: submit and return; local: run the tasks on this machine and wait for them "
        "(one node); debug: run a single task in this process, for a debugger",
    )
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, with main.py's dataset defaults applied as main.parse_args does, and the job's paths made
    absolute (the tasks start in the same directory, but a file:// URL has to be absolute)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    # The job folder is also where the output and the rendezvous file go, unless those flags are given.
    known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    job_dir = os.path.abspath(os.path.expanduser(known.job_dir))
    args = parse_args_with_recipe(parser, argv, defaults=dict(output_dir=job_dir, dist_url=new_dist_url(job_dir)))
    args.job_dir = job_dir
    if args.cluster != "slurm" and args.nodes != 1:
        parser.error(f"--cluster {args.cluster} runs on this machine only: pass --nodes 1")
    if args.cluster == "debug" and args.ngpus != 1:
        parser.error("--cluster debug runs one task in this process: pass --ngpus 1")
    if args.cluster != "slurm" and uses_local_gpus(args) and args.ngpus > torch.cuda.device_count():
        parser.error(
            f"--ngpus {args.ngpus}: this machine has {torch.cuda.device_count()} GPU(s); ask for at most "
            "that many, or pass --device cpu for CPU processes"
        )
    return args


def uses_local_gpus(args: argparse.Namespace) -> bool:
    """Whether tasks run on this machine (--cluster local or debug) get GPUs: main.py would fall back to the CPU
    without them, or with --device cpu."""
    return args.device.startswith("cuda") and torch.cuda.is_available()


def shared_folder(job_dir: str) -> Path:
    """The deepest folder of job_dir that does not depend on the job id (%j): it exists before the job does."""
    parts = Path(job_dir).parts
    for i, part in enumerate(parts):
        if "%j" in part:
            return Path(*parts[:i])
    return Path(job_dir)


def new_dist_url(job_dir: str) -> str:
    """A file:// rendezvous of a name never used before. A file left by a killed job must not be reused: its
    stale content would make the new tasks wait for processes that are gone."""
    return (shared_folder(job_dir) / f"{uuid.uuid4().hex}_init").absolute().as_uri()


class Trainer(submitit.helpers.Checkpointable):
    """What each task of the job runs: main.main on the parsed flags, as one process of the group."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __call__(self):
        args = copy.deepcopy(self.args)  # main.main adds the rank to args; a requeued job starts from the flags
        job_env = submitit.JobEnvironment()
        args.output_dir = args.output_dir.replace("%j", str(job_env.job_id))
        if job_env.num_tasks > 1:
            # What torchrun would set: main.py's init_distributed_mode reads them.
            os.environ.update(
                RANK=str(job_env.global_rank), WORLD_SIZE=str(job_env.num_tasks), LOCAL_RANK=str(job_env.local_rank)
            )
            if args.dist_url == "env://":  # asked for explicitly: the first node hosts the store
                submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        print(f"{job_env}: output in {args.output_dir}", flush=True)
        return detr_main.main(args)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on the first task when the job is preempted or times out: the job to requeue.

        main.py saves checkpoint.pth after every epoch, so nothing needs saving here; the requeued job resumes
        from it (--auto_resume), through a new rendezvous file."""
        new_args = copy.deepcopy(self.args)
        new_args.output_dir = new_args.output_dir.replace("%j", str(submitit.JobEnvironment().job_id))
        new_args.auto_resume = True
        checkpoint = os.path.join(new_args.output_dir, "checkpoint.pth")
        if os.path.isfile(checkpoint):
            new_args.resume = ""  # this run's own checkpoint wins over a --resume given at submission
        if new_args.dist_url.startswith("file://"):
            new_args.dist_url = new_dist_url(new_args.job_dir)
        print(
            f"Requeuing: the job will resume from {checkpoint}"
            if os.path.isfile(checkpoint)
            else f"Requeuing: no {checkpoint} yet, the job will start over",
            flush=True,
        )
        return submitit.helpers.DelayedSubmission(type(self)(new_args))


def make_executor(args: argparse.Namespace) -> submitit.Executor:
    """The submitit executor of --cluster, with the job's resources."""
    executor = submitit.AutoExecutor(folder=args.job_dir, cluster=args.cluster, slurm_max_num_timeout=30)
    gpus_per_node = args.ngpus
    if args.cluster != "slurm" and not uses_local_gpus(args):
        gpus_per_node = 0  # CPU processes, talking gloo
    executor.update_parameters(
        name="detr",
        nodes=args.nodes,
        tasks_per_node=args.ngpus,  # one task per GPU
        gpus_per_node=gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_per_gpu * args.ngpus,
        timeout_min=args.timeout,
        slurm_partition=args.partition,
        # Time between the signal (USR2) and the end of the job: requeuing takes seconds, the checkpoint is
        # already on disk.
        slurm_signal_delay_s=120,
        slurm_constraint="volta32gb" if args.use_volta32 else None,
        slurm_comment=args.comment or None,
    )
    return executor


def main(argv=None):
    args = parse_args(argv)
    # The tasks unpickle the Trainer, which imports main.py and the project's packages: make them importable
    # wherever the job starts (Slurm and the local controller pass the environment on).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (CODE_DIR, os.environ.get("PYTHONPATH")) if p)
    shared_folder(args.job_dir).mkdir(parents=True, exist_ok=True)  # where the rendezvous file goes
    executor = make_executor(args)
    job = executor.submit(Trainer(args))
    output_dir = args.output_dir.replace("%j", str(job.job_id))
    print(
        f"Submitted job {job.job_id} ({args.cluster}); submitit logs in {job.paths.folder}, "
        f"training output in {output_dir}",
        flush=True,
    )
    if args.cluster != "slurm":
        # The job runs on this machine: wait for it, and fail as it fails.
        job.results()  # one per task
        print(f"Job {job.job_id} finished; output in {output_dir}")
    return job


if __name__ == "__main__":
    main()
