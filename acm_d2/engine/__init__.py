from .defaults import argument_parser, register_datasets, setup, setup_lazy  # noqa: F401
from .trainer import Trainer, create_ddp_model_any_device  # noqa: F401
