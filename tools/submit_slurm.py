#!/usr/bin/env python
"""Submit tools/train_net.py to SLURM with submitit: one task per GPU on one or more nodes, requeued
with an exact resume when the job is preempted or reaches its time limit.

python tools/submit_slurm.py --nodes 2 --gpus-per-node 8 --partition PART --time 4320 \\
    --config-file configs/COCO-InstanceSegmentation/mask_rcnn_acm_R_50_FPN_1x.yaml OUTPUT_DIR /shared/out

Every argument this script does not know goes to train_net (checked here, before anything is
submitted). The job writes to its OUTPUT_DIR, which its main process locks (two jobs on one folder: the
second stops at its start, naming the first); submitit's own files (the sbatch script, pickles, logs)
go to --job-dir, by default OUTPUT_DIR/submitit. SLURM sends submitit's signal (SIGUSR2) --signal-delay
seconds before the time limit: training writes a checkpoint at the next iteration boundary
(acm_d2.engine.preemption), then submitit requeues the job, which resumes from it. See docs/cluster.md.
"""

import argparse
import os
import runpy
import sys

TRAIN_NET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net.py")


class TrainJob:
    """What each SLURM task runs: tools/train_net.py with `argv`, as a process that srun started
    (acm_d2.engine.cluster), after submitit's helper exported the env:// variables. submitit calls
    checkpoint() on its preemption signal (after acm_d2 wrote the checkpoint) and requeues the job with
    the object it returns: the same job with --resume."""

    def __init__(self, argv):
        self.argv = list(argv)

    def __call__(self):
        import submitit

        # All GPUs of the node stay visible; each task takes its local rank's (acm_d2.engine.cluster).
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=False, overwrite=True
        )
        sys.argv = [TRAIN_NET, *self.argv]
        runpy.run_path(TRAIN_NET, run_name="__main__")

    def checkpoint(self):
        import submitit

        argv = self.argv if "--resume" in self.argv else ["--resume", *self.argv]
        return submitit.helpers.DelayedSubmission(TrainJob(argv))


def submission_parser():
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other argument is tools/train_net.py's (e.g. --config-file FILE KEY VALUE ...).",
    )
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="GPUs per node (one task per GPU)"
    )
    parser.add_argument("--partition", default=None, help="SLURM partition")
    parser.add_argument("--time", type=int, default=60 * 72, help="time limit per job, minutes")
    parser.add_argument("--cpus-per-task", type=int, default=10)
    parser.add_argument("--mem-gb", type=int, default=None, help="memory per node (GiB)")
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument("--comment", default=None)
    parser.add_argument("--job-name", default="acm_d2")
    parser.add_argument(
        "--job-dir", default=None, help="submitit's files (default: OUTPUT_DIR/submitit)"
    )
    parser.add_argument(
        "--signal-delay",
        type=int,
        default=120,
        metavar="SECONDS",
        help="how long before the time limit SLURM signals the job to checkpoint",
    )
    parser.add_argument(
        "--max-requeues",
        type=int,
        default=20,
        help="how often a job reaching its limit is requeued",
    )
    parser.add_argument(
        "--cluster",
        default=None,
        choices=["slurm", "local", "debug"],
        help="submitit's executor (default: SLURM when srun exists; local: run the tasks here)",
    )
    return parser


def _output_dir(train_args):
    """OUTPUT_DIR as given among train_net's KEY VALUE overrides (the last one wins), or None."""
    opts = train_args.opts
    values = [opts[i + 1] for i in range(0, len(opts) - 1, 2) if opts[i] == "OUTPUT_DIR"]
    return values[-1] if values else None


def build_executor(args, train_args):
    import submitit

    job_dir = args.job_dir
    if job_dir is None:
        output_dir = _output_dir(train_args)
        if output_dir is None:
            raise SystemExit(
                "submit_slurm.py: give OUTPUT_DIR among the train_net arguments (OUTPUT_DIR /shared/out), "
                "or --job-dir, on a file system that every node reads: submitit's files go there"
            )
        job_dir = os.path.join(output_dir, "submitit")
    executor = submitit.AutoExecutor(
        folder=os.path.join(job_dir, "%j"),
        cluster=args.cluster,
        slurm_max_num_timeout=args.max_requeues,
    )
    extra = {
        f"slurm_{k}": v
        for k, v in (
            ("partition", args.partition),
            ("account", args.account),
            ("qos", args.qos),
            ("constraint", args.constraint),
            ("comment", args.comment),
        )
        if v is not None
    }
    executor.update_parameters(
        name=args.job_name,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        slurm_signal_delay_s=args.signal_delay,
        **({"mem_gb": args.mem_gb} if args.mem_gb else {}),
        **extra,
    )
    return executor


def main(argv=None):
    from acm_d2.engine import argument_parser

    args, train_argv = submission_parser().parse_known_args(argv)
    train_args = argument_parser().parse_args(
        train_argv
    )  # a mistake fails here, not on the cluster
    if train_args.num_gpus is not None or train_args.num_machines != 1:
        raise SystemExit(
            "submit_slurm.py: give the job's size with --nodes and --gpus-per-node, not train_net's "
            "--num-gpus / --num-machines"
        )
    if not os.path.isfile(train_args.config_file):
        raise SystemExit(
            f"submit_slurm.py: --config-file {train_args.config_file!r} does not exist"
        )
    executor = build_executor(args, train_args)
    job = executor.submit(TrainJob(train_argv))
    print(f"Submitted job {job.job_id}: {args.nodes} node(s) x {args.gpus_per_node} task(s)")
    print(f"Logs: {job.paths.stdout} (and .err); submitit's files: {job.paths.folder}")
    if args.cluster in ("local", "debug"):
        job.results()  # the tasks run on this machine: wait for them (raises if one failed)
    return job


if __name__ == "__main__":
    main()
