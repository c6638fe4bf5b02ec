"""The sub-commands: each module's ``add_*_parser(subparsers)`` registers one (see ``tbac_core.cli``)."""
from ...training.cli import add_parser as add_train_parser
from .batch import add_batch_parser
from .generate import add_edit_parser, add_generate_parser
from .quantize import add_quantize_parser
from .understand import add_understand_parser

COMMANDS = (add_generate_parser, add_edit_parser, add_understand_parser, add_batch_parser, add_quantize_parser,
            add_train_parser)

__all__ = ["COMMANDS"]
