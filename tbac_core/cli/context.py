"""What a command handler gets: the parsed arguments, the checkpoint's config facts, and the model,
loaded once and only when the command really needs it."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .checkpoint_info import CheckpointInfo
from .options import model_load_kwargs, resolve_model_dir


def log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)  # does not tear an active progress bar


def load_pipeline(args: argparse.Namespace, folder: Path):
    from ..pipeline import TBACPipeline

    log(f"Loading {folder} (dtype {args.dtype}, device {args.device}, memory {args.memory}) ...")
    started = time.perf_counter()
    pipe = TBACPipeline.from_pretrained(folder, memory=args.memory, compile_dit=getattr(args, "compile", False),
                                        **model_load_kwargs(args))
    log(f"Loaded {pipe.model.identity.name!r} in {time.perf_counter() - started:.1f}s.")
    return pipe


class CommandContext:
    """``args``, the model folder's :class:`CheckpointInfo` and a lazily loaded ``TBACPipeline``.

    ``pipeline`` given: use that already loaded pipeline instead of the model options (for
    embedding the CLI in another program, and for tests).
    """

    log = staticmethod(log)

    def __init__(self, args: argparse.Namespace, pipeline=None):
        self.args = args
        self._pipeline = pipeline
        self._info: CheckpointInfo | None = None

    @property
    def model_dir(self) -> Path:
        if self._pipeline is not None:
            return Path(self._pipeline.model.checkpoint_dir)
        return resolve_model_dir(self.args.model)

    def info(self) -> CheckpointInfo:
        """The model's config.json facts: read in milliseconds, before (and without) loading the model."""
        if self._info is None:
            self._info = CheckpointInfo.read(self.model_dir)
        return self._info

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.args, self.model_dir)
        return self._pipeline
