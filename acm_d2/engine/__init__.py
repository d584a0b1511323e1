from .defaults import argument_parser, register_datasets, setup  # noqa: F401
from .trainer import Trainer  # noqa: F401
