"""Checkpoints: everything needed to evaluate or continue a run, written atomically.

A checkpoint holds the resolved config, the meta-parameters, the model buffers (BatchNorm running
statistics), the outer optimizer and scheduler state, the step count and the RNG state. It is written
to a temporary file in the same directory and renamed, so a crash never leaves a half-written file.
Loading uses `weights_only=True`: a checkpoint is read as tensors and plain containers, never as code.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from metadist import __version__
from metadist.errors import UserError

FORMAT = 1


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, unreadable or not a metadist checkpoint."""


def write_text_atomically(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` in one rename, so a reader sees the old file or the new one, never half
    of one: the small run-folder files another process reads while this one may die (a collective
    group's progress and error, a sweep trial's final report). No fsync: the progress file is replaced
    every step, and these files only need to be whole, not to outlive a machine crash."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(path: str | Path, state: dict) -> Path:
    """Write `state` (plus format and version tags) atomically to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "metadist_version": __version__, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint written by `save_checkpoint`, or raise CheckpointError saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable metadist checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a metadist checkpoint (format {FORMAT} expected)")
    return state
