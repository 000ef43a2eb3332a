"""Checkpoint files: atomic writes, safe (``weights_only``) reads, clear errors.

Two kinds of file carry ``format`` = :data:`CHECKPOINT_FORMAT`:

``"full"``  (``last.pt``) everything :class:`~ssl_ptx.engine.trainer.Trainer` needs to continue
            a run exactly: model, optimiser, scheduler, scaler, loop counters, sampler, RNG
            states of every process, stateful callbacks, the run's config.
``"weights"`` (top-k ``best-epochNNN.pt``, NNN the 1-based epoch as logged) the model's
            ``state_dict`` with its epoch (0-based), metrics and config; what inference and
            checkpoint ensembles load.

Files are written to a temporary name beside the target and renamed onto it
(:func:`ssl_ptx.fileio.atomic_path`), so a crash mid-write leaves the previous file intact.
Files are read with ``torch.load(weights_only=True)``: no arbitrary code runs, and everything
stored must be tensors, numbers, strings, None, lists, tuples or dicts.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ssl_ptx.engine.distributed import unwrap_model
from ssl_ptx.fileio import atomic_path

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "ssl_ptx.trainer/1"
_READ_ERRORS = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used; the message names the file and why."""


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` (a dict, ``format`` added when missing) to ``path`` atomically.

    Returns:
        ``path``.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    *,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = ("model",),
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the ``.pt`` file.
        map_location: where tensors are loaded (CPU by default; modules and optimisers move
            them when their state is loaded).
        required: keys the caller needs; missing ones are an error.

    Returns:
        The stored dict.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is truncated or corrupt, holds objects that
            ``weights_only`` loading refuses, is not an ``ssl_ptx`` checkpoint, or lacks a
            required key. The message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; its end is the index
        raise _unreadable(path, ValueError("no complete zip archive (torch.save format)"))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise _unreadable(path, error) from error
        raise CheckpointError(
            f"{path}: holds objects that safe loading (torch.load weights_only=True) refuses; "
            "ssl_ptx checkpoints hold only tensors, numbers, strings and containers. "
            f"{_first_line(error)}"
        ) from error
    except _READ_ERRORS as error:
        raise _unreadable(path, error) from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path}: not an ssl_ptx checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})"
        )
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; it has {sorted(state)}")
    return state


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else '(no message)'}"


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(
        f"{path}: cannot read this checkpoint ({path.stat().st_size} bytes; truncated or "
        f"corrupt, e.g. a copy or a write that did not finish): {_first_line(error)}"
    )


def load_weights(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> dict:
    """Load the model weights of any ``ssl_ptx`` checkpoint (full or weights-only) into
    ``model`` (DDP / compiled wrappers are unwrapped).

    Returns:
        The checkpoint dict (epoch, metrics, config, ...).

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the weights do not fit ``model``.
    """
    state = load_checkpoint(path, required=("model",))
    try:
        unwrap_model(model).load_state_dict(state["model"], strict=strict)
    except RuntimeError as error:
        raise CheckpointError(f"{path}: weights do not fit the model: {error}") from error
    return state
