"""Seeding and the capture / restore of every global random number generator.

A run is reproducible when the initial weights, the data order, the augmentation and every
random op of the model follow from one seed. :func:`seed_everything` seeds Python's ``random``,
NumPy's legacy global generator and torch (CPU and every CUDA device);
:func:`capture_rng_state` / :func:`restore_rng_state` save and restore exactly those states, in
a form that ``torch.load(..., weights_only=True)`` accepts (tensors, ints, floats, tuples).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "derive_seed", "restore_rng_state", "seed_everything"]


def derive_seed(*keys: int) -> int:
    """A well-mixed 31-bit seed from integer keys (e.g. ``(seed, epoch, rank)``).

    Neighbouring keys give unrelated seeds (``numpy.random.SeedSequence`` hashing), so the
    streams of epoch 3 and epoch 4, or of rank 0 and rank 1, do not overlap.
    """
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, NumPy's global generator and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    """The states of Python ``random``, NumPy's global generator, torch CPU and CUDA.

    Returns:
        dict with ``python`` (tuple), ``numpy`` (dict of a [624] int64 tensor and scalars),
        ``torch`` (uint8 tensor) and ``cuda`` (list of uint8 tensors, one per device; empty
        when CUDA is not initialised).
    """
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else []
    )
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state`.

    CUDA states are restored only when CUDA is available and the device count matches.
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["key"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
