"""Preemption: a signal makes the run checkpoint at the next iteration boundary and exit to be requeued.

SLURM warns a job before its time limit with the signal of `--signal` (SIGUSR1 here; submitit's jobs
use submitit's, SIGUSR2 by default) and stops a preempted or cancelled job with SIGTERM; torchrun
forwards SIGTERM to its workers. On any of these, PreemptionCheckpointer lets the current iteration
finish; then every rank agrees to stop after the same iteration on the same signal (one all-reduce
of the signal number per step over a CPU (gloo) group, so a signal that reached one rank stops all,
without a GPU-to-host sync), the main process writes `model_<iteration>.pth` atomically (acm_d2.checkpoint.checkpointer) and every
rank waits for it, and training ends with Preempted: the process exits with PREEMPTED_EXIT_CODE and the
next `--resume` (automatic after a SLURM requeue or a torchelastic restart) continues exactly.

Requeueing: a handler that was installed for the signal before this hook (submitit's, in a submitit job)
runs after the checkpoint is written, so submitit requeues the job as it does for any checkpointable
job. Without one, SIGUSR1 in a SLURM job makes the main process run `scontrol requeue $SLURM_JOB_ID`;
SIGTERM does not (it is also what `scancel` sends, and SLURM requeues preempted jobs itself).

Further signals while stopping are logged and otherwise ignored: a second SIGTERM during the save does
not cut it short.
"""

import logging
import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

__all__ = ["PREEMPTED_EXIT_CODE", "Preempted", "PreemptionCheckpointer", "preemption_signals"]

# EX_TEMPFAIL (sysexits.h): "a temporary failure; the user is invited to retry later".
PREEMPTED_EXIT_CODE = 75

logger = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Training stopped on a preemption signal after writing a checkpoint. A SystemExit with code
    PREEMPTED_EXIT_CODE, so that a process that does not catch it exits with that status (and
    Detectron2's training loop does not log it as a crash)."""

    def __init__(self, signum: int, checkpoint: str):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.signum = signum
        self.checkpoint = checkpoint


def preemption_signals():
    """SIGUSR1, SIGTERM, and in a submitit job submitit's preemption signal."""
    signums = [signal.SIGUSR1, signal.SIGTERM]
    if "SUBMITIT_EXECUTOR" in os.environ:
        import submitit

        submitit_signal = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        if submitit_signal not in signums:
            signums.append(submitit_signal)
    return signums


class PreemptionCheckpointer(HookBase):
    """See the module doc. Put it last among the hooks, so that the checkpoint holds what every other
    hook did in the iteration (LR step, metrics written). `checkpointer`: the trainer's own (its
    `checkpointer` attribute, as DefaultTrainer's) unless given."""

    def __init__(self, checkpointer=None):
        self._checkpointer = checkpointer
        self._previous = {}  # signal -> the handler this hook replaced
        self._received = None  # the first signal received
        self._stopping = False
        self._group = None  # the process group of the per-step agreement (None: the default group)

    # ---- signals -----------------------------------------------------------------------------------
    def _handle(self, signum, frame):
        # Runs between two Python bytecodes of the main thread: only note it, act at the step boundary.
        if self._received is None:
            self._received = signum
        else:
            logger.warning(
                f"{signal.Signals(signum).name} received while "
                f"{'writing the preemption checkpoint' if self._stopping else 'stopping'}: ignored"
            )

    def before_train(self):
        # Every rank runs this, in the same order, as new_group needs. Over NCCL the agreement would be a
        # GPU-to-host sync each step (the host waiting for the optimizer step before it can queue the
        # next iteration); a gloo group keeps it on the CPU, as Detectron2 keeps its metric gathers.
        if comm.get_world_size() > 1 and dist.get_backend() != "gloo":
            self._group = dist.new_group(backend="gloo")
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Training runs outside the main thread: preemption signals not handled")
            return
        for signum in preemption_signals():
            self._previous[signum] = signal.signal(signum, self._handle)
        names = ", ".join(signal.Signals(s).name for s in self._previous)
        logger.info(
            f"On {names}: checkpoint at the next iteration boundary, then stop to be requeued"
        )

    def after_train(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    # ---- stopping ----------------------------------------------------------------------------------
    def _agreed_signal(self):
        """The signal to stop on, the same on every rank: the one received (the highest number where
        ranks received different ones), or None."""
        received = self._received or 0
        if comm.get_world_size() > 1:
            flag = torch.tensor([received])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            received = int(flag.item())
        return signal.Signals(received) if received else None

    def after_step(self):
        signum = self._agreed_signal()  # on every rank, every step: it is a collective
        trainer = self.trainer
        if signum is None or trainer.iter + 1 >= trainer.max_iter:
            return  # no signal, or the last iteration: training ends now, writing model_final
        self._stopping = True
        name = f"model_{trainer.iter:07d}"
        logger.warning(
            f"{signum.name}: stopping after iteration {trainer.iter}, writing {name}.pth"
        )
        (self._checkpointer or trainer.checkpointer).save(name, iteration=trainer.iter)
        comm.synchronize()  # no rank exits (which would make torchrun stop the rest) before it is saved
        previous = self._previous.get(signum)
        self.after_train()  # the handlers from before training are back: submitit's runs next
        if callable(previous):
            previous(signum, None)
        elif signum == signal.SIGUSR1 and comm.is_main_process():
            _requeue_slurm_job()
        raise Preempted(signum, name)


def _requeue_slurm_job() -> None:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=60, capture_output=True)
        logger.warning(f"Requeued SLURM job {job} (scontrol requeue {job})")
    except (OSError, subprocess.SubprocessError) as error:
        stderr = getattr(error, "stderr", b"") or b""
        logger.error(
            f"Could not requeue SLURM job {job} with `scontrol requeue {job}` ({error} "
            f"{stderr.decode(errors='replace').strip()}): the checkpoint is written; requeue or "
            "resubmit the job with --resume (a job must be requeueable: sbatch --requeue)"
        )
