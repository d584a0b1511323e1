from .cluster import ClusterLaunchError  # noqa: F401
from .defaults import (  # noqa: F401
    argument_parser,
    load_weights_for_evaluation,
    register_datasets,
    setup,
    setup_lazy,
)
from .launch import launch, launch_from_args  # noqa: F401
from .output_lock import OutputDirInUseError, OutputDirLockError, lock_output_dir  # noqa: F401
from .preemption import PREEMPTED_EXIT_CODE, Preempted, PreemptionCheckpointer  # noqa: F401
from .resume import ExactResumeHook  # noqa: F401
from .trainer import NonFiniteLossError, Trainer, build_step_trainer, create_ddp_model_any_device  # noqa: F401
