from .defaults import argument_parser, check_context_keys, register_datasets, setup, setup_lazy  # noqa: F401
from .resume import ExactResumeHook, ResumableTrainStream, build_resumable_train_loader  # noqa: F401
from .trainer import NonFiniteLossError, Trainer, create_ddp_model_any_device  # noqa: F401
