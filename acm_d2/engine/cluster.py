"""Training processes that a cluster's launcher started: torchrun (torchelastic) or SLURM's srun.

Detectron2's `launch` spawns one worker per GPU itself and joins them over `--dist-url`. torchrun and
srun start every worker themselves and describe it in environment variables, which `launch` does not
read. A process started that way runs here instead: it joins the others with torch.distributed's env://
rendezvous (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: set by torchrun, or exported from SLURM's
variables by submitit's TorchDistributedEnvironment), creates Detectron2's local process group (which
`launch` creates otherwise, and on which comm.get_local_rank() and friends depend), takes the GPU of its
local rank, and runs the main function in this process.

A process that torchelastic restarted (TORCHELASTIC_RESTART_COUNT > 0) or SLURM requeued
(SLURM_RESTART_COUNT > 0) resumes from the last checkpoint of OUTPUT_DIR even without `--resume`.
"""

import datetime
import logging
import os

import torch
import torch.distributed as dist
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm

__all__ = [
    "ClusterLaunchError",
    "started_by",
    "restart_count",
    "resume_after_restart",
    "run_started_worker",
    "DEFAULT_RENDEZVOUS_TIMEOUT_S",
]

DEFAULT_RENDEZVOUS_TIMEOUT_S = (
    600  # how long a process waits for the others to join before it fails
)

# The variables of torch.distributed's env:// rendezvous; torchrun sets them (and LOCAL_RANK,
# LOCAL_WORLD_SIZE) for every worker.
ENV_RENDEZVOUS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

logger = logging.getLogger(__name__)


class ClusterLaunchError(RuntimeError):
    """The process cannot join its training job; the message says why and what to change."""


def started_by():
    """Who started this process: "torchrun"; "env://" (another launcher that set the env:// variables,
    e.g. a submitit job of tools/submit_slurm.py); "srun" (a SLURM job step of more than one task); or
    None (a plain start: Detectron2's launch does the rest).

    SLURM_STEP_ID tells an srun task from the job's batch script, which has SLURM_NTASKS too but runs
    once, on the first node.
    """
    if all(name in os.environ for name in ENV_RENDEZVOUS):
        return "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "env://"
    if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "srun"
    return None


def restart_count() -> int:
    """How often torchelastic restarted this worker group, or SLURM requeued this job."""
    return max(
        int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
        int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
    )


def resume_after_restart(args) -> None:
    """Training in a restarted or requeued job (restart_count() > 0) resumes from OUTPUT_DIR's last
    checkpoint, as if `--resume` was given (an evaluation keeps the weights it was given)."""
    if restart_count() and not args.resume and not args.eval_only:
        logger.warning(
            f"Restart {restart_count()} of this job (by torchelastic or a SLURM requeue): resuming "
            "from the last checkpoint of OUTPUT_DIR"
        )
        args.resume = True


def _export_slurm_environment() -> None:
    """Set the env:// variables from SLURM's: rank, local rank and world size from SLURM_PROCID,
    SLURM_LOCALID and SLURM_NTASKS, MASTER_ADDR the first node of SLURM_JOB_NODELIST, MASTER_PORT kept
    if set, else one derived from the job id (the same on every node); submitit's helper does it."""
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise ClusterLaunchError(
            "this process is one task of a multi-task SLURM job step (srun), and reading SLURM's "
            "environment needs submitit: pip install 'acm_d2[cluster]' (or start one task per node "
            "with --num-gpus N --num-machines M --machine-rank R --dist-url tcp://HOST:PORT)"
        ) from None
    # submitit picks the JobEnvironment to read by SUBMITIT_EXECUTOR, which only its own jobs set:
    # name SLURM's while the helper reads it, and leave no trace that this is a submitit job.
    previous = os.environ.get("SUBMITIT_EXECUTOR")
    os.environ["SUBMITIT_EXECUTOR"] = "slurm"
    try:
        environment = TorchDistributedEnvironment()
    finally:
        if previous is None:
            del os.environ["SUBMITIT_EXECUTOR"]
        else:
            os.environ["SUBMITIT_EXECUTOR"] = previous
    # Every task keeps all GPUs of its node visible and takes the one of its local rank.
    environment.export(set_cuda_visible_devices=False, overwrite=True)


def _layout(use_cuda: bool):
    """(rank, world size, local rank, local world size) from the env:// variables, checked."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    # A launcher that sets only the env:// variables runs one process per node.
    values = {n: os.environ.get(n, d) for n, d in zip(names, (None, None, "0", "1"))}
    try:
        rank, world, local_rank, local_world = (int(values[n]) for n in names)
    except (TypeError, ValueError):
        raise ClusterLaunchError(
            f"the distributed environment variables are incomplete or not integers: {values}; start "
            "the processes with torchrun (which sets them all) or srun"
        ) from None
    if not (0 <= rank < world and 0 <= local_rank < local_world <= world) or world % local_world:
        raise ClusterLaunchError(
            f"the distributed environment does not add up: RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK "
            f"{local_rank}, LOCAL_WORLD_SIZE {local_world}. Every node must run the same number of "
            "processes (WORLD_SIZE = nodes x LOCAL_WORLD_SIZE): check torchrun's --nnodes and "
            "--nproc_per_node, or SLURM's --nodes and --ntasks-per-node"
        )
    if use_cuda:
        gpus = torch.cuda.device_count()
        # All GPUs of the node visible: one per local rank. One visible GPU: the launcher bound one to
        # each process (srun --gpus-per-task 1, CUDA_VISIBLE_DEVICES per task).
        if local_world > gpus and gpus != 1:
            raise ClusterLaunchError(
                f"{local_world} processes run on this node (LOCAL_WORLD_SIZE) but it has {gpus} visible "
                "GPUs: start one process per GPU (torchrun --nproc_per_node, SLURM "
                "--ntasks-per-node / --gpus-per-node), or check CUDA_VISIBLE_DEVICES"
            )
    return rank, world, local_rank, local_world


def _check_no_launch_flags(launcher: str, args) -> None:
    given = [
        flag
        for flag, value, unset in (
            ("--num-gpus", args.num_gpus, None),
            ("--num-machines", args.num_machines, 1),
            ("--machine-rank", args.machine_rank, 0),
        )
        if value != unset
    ]
    if given:
        how = (
            "srun's --ntasks-per-node and --nodes"
            if launcher == "srun"
            else "torchrun's --nproc_per_node and --nnodes"
        )
        raise ClusterLaunchError(
            f"{' and '.join(given)} given, but this process was started by {launcher}, which starts one "
            f"process per GPU itself (WORLD_SIZE {os.environ.get('WORLD_SIZE', os.environ.get('SLURM_NTASKS'))}): "
            f"drop {', '.join(given)} and set the number of processes with {how}"
        )


def run_started_worker(main_func, args, launcher: str, rendezvous_timeout_s: float):
    """Join the job this process belongs to (see the module doc) and run main_func(args) in it.

    `launcher` is started_by()'s answer. With srun, `--num-gpus` (one task per node running Detectron2's
    launch) is the caller's business: this is for one task per GPU.
    """
    _check_no_launch_flags(launcher, args)
    if launcher == "srun":
        _export_slurm_environment()
    use_cuda = torch.cuda.is_available()
    rank, world, local_rank, local_world = _layout(use_cuda)
    resume_after_restart(args)
    if use_cuda:
        torch.cuda.set_device(local_rank if torch.cuda.device_count() > 1 else 0)
    host, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    timeout = datetime.timedelta(seconds=rendezvous_timeout_s)
    try:
        # torch's own env:// rendezvous: under torchrun it joins the agent's store, else rank 0 serves one.
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=timeout))
    except (RuntimeError, TimeoutError) as error:
        role = "serve" if rank == 0 else "reach"
        raise ClusterLaunchError(
            f"rank {rank} of {world} could not {role} the rendezvous at {host}:{port} (MASTER_ADDR:"
            f"MASTER_PORT) within {rendezvous_timeout_s:g} s ({error}). Check that "
            "every node can reach that host and port (firewall, the right network interface), that "
            "all processes were started, and that no other job uses the port; raise "
            "--rendezvous-timeout if nodes start far apart"
        ) from None
    # torchrun keeps one store for all restarts of the worker group (its rendezvous store, shared by
    # default), so an earlier attempt's keys, e.g. the addresses of dead processes, are still there
    # and a new process group could read them before they are rewritten: key by attempt.
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"acm_d2/attempt_{attempt}", store)
    # Collectives time out as under Detectron2's launch; the rendezvous has its own limit above.
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world,
        timeout=DEFAULT_TIMEOUT,
    )
    comm.create_local_process_group(local_world)
    comm.synchronize()
    result = main_func(args)
    dist.destroy_process_group()  # as PyTorch asks of a process that ends normally
    return result
