"""Detectron2's launch, with worker processes that stop when their launcher is stopped.

With `--num-gpus N` (N > 1) the launcher spawns N non-daemonic workers and waits for them. A SIGINT
that reaches only the launcher (`kill -INT`, `timeout -s INT`, job managers; a terminal's Ctrl-C signals
the whole process group) raised KeyboardInterrupt in it while the workers kept training, and Python then
waited for them at exit; a SIGTERM killed the launcher and left the workers training as orphans. Here
either signal stops every worker of this machine (SIGTERM, then SIGKILL after a grace period) and the
launcher exits with 128 + the signal number. SIGUSR1 (SLURM's warning before the time limit) is passed
on to the workers, which checkpoint and stop (acm_d2.engine.preemption); the launcher then exits with
their status, PREEMPTED_EXIT_CODE.

launch_from_args is what the tools call: it runs a process that torchrun or srun started through
acm_d2.engine.cluster, and everything else through launch().
"""

import logging
import multiprocessing
import os
import signal
import sys

import torch
from detectron2.engine import launch as detectron2_launch
from torch.multiprocessing import ProcessExitedException

from .cluster import ClusterLaunchError, resume_after_restart, run_started_worker, started_by
from .preemption import PREEMPTED_EXIT_CODE

__all__ = ["launch", "launch_from_args", "WORKER_STOP_GRACE_S"]

WORKER_STOP_GRACE_S = 10.0  # how long a worker may take to exit on SIGTERM before it is killed

logger = logging.getLogger(__name__)


class _Stopped(BaseException):
    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


def _stop_workers(signum) -> None:
    workers = multiprocessing.active_children()
    print(
        f"{signal.Signals(signum).name} received: stopping {len(workers)} worker process(es) "
        f"(pids {[w.pid for w in workers]})",
        file=sys.stderr,
        flush=True,
    )
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(WORKER_STOP_GRACE_S)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _pass_on(signum, frame):
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signum)


def launch(main_func, num_gpus_per_machine, num_machines=1, **kwargs):
    """detectron2.engine.launch(main_func, num_gpus_per_machine, num_machines, **kwargs); when this
    machine runs several workers, SIGINT or SIGTERM to the launcher stops them all (see module doc)."""
    if (
        num_gpus_per_machine * num_machines <= 1
    ):  # main_func runs in this process: nothing to forward
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs
        )
    previous = {s: signal.signal(s, _raise_stopped) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _pass_on)
    try:
        return detectron2_launch(
            main_func, num_gpus_per_machine, num_machines=num_machines, **kwargs
        )
    except ProcessExitedException as exited:
        if exited.exit_code == PREEMPTED_EXIT_CODE:  # every worker checkpointed and stopped
            raise SystemExit(PREEMPTED_EXIT_CODE) from None
        raise
    except _Stopped as stopped:
        for s in (
            previous
        ):  # a repeated Ctrl-C must not cut the stop short (it ends within the grace period)
            signal.signal(s, signal.SIG_IGN)
        _stop_workers(stopped.signum)
        raise SystemExit(128 + stopped.signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def launch_from_args(main_func, args):
    """main_func(args) as the command line (acm_d2.engine.argument_parser) asks: in a process that
    torchrun or srun started (acm_d2.engine.cluster; `--num-gpus` is then an error), else through
    launch() with --num-gpus (default 1), --num-machines, --machine-rank and --dist-url."""
    launcher = started_by()
    if launcher == "srun" and args.num_gpus is not None:
        launcher = (
            None  # one srun task per node, each spawning --num-gpus workers: Detectron2's way
        )
    if launcher:
        return run_started_worker(main_func, args, launcher, args.rendezvous_timeout)
    num_gpus = 1 if args.num_gpus is None else args.num_gpus
    if num_gpus > 1 and torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        raise ClusterLaunchError(
            f"--num-gpus {num_gpus} but this machine has {torch.cuda.device_count()} visible GPUs: "
            "give at most that many (or check CUDA_VISIBLE_DEVICES)"
        )
    resume_after_restart(args)
    return launch(
        main_func,
        num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
