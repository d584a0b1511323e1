from .defaults import argument_parser, check_context_keys, register_datasets, setup  # noqa: F401
from .resume import ExactResumeHook, ResumableTrainStream, build_resumable_train_loader  # noqa: F401
from .trainer import NonFiniteLossError, Trainer  # noqa: F401
