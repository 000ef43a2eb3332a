"""Checkpoint files: atomic, weights_only-safe, and refused with a clear error when damaged."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ssl_ptx.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from ssl_ptx.engine.rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(3)


def test_round_trip_with_rng_state_under_weights_only(tmp_path: Path) -> None:
    seed_everything(123)
    _draws()
    model = nn.Linear(3, 2)
    path = save_checkpoint(
        {"model": model.state_dict(), "rng": capture_rng_state(), "epoch": 4}, tmp_path / "a.pt"
    )
    expected = _draws()
    seed_everything(999)  # move every generator elsewhere
    state = load_checkpoint(path)  # torch.load(weights_only=True) inside
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 4
    restore_rng_state(state["rng"])
    again = _draws()
    assert again[:2] == expected[:2]
    assert torch.equal(again[2], expected[2])
    other = nn.Linear(3, 2)
    load_weights(other, path)
    assert torch.equal(other.weight, model.weight)


def test_truncated_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = save_checkpoint({"model": nn.Linear(8, 8).state_dict()}, tmp_path / "last.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert str(path) in message and "truncated or corrupt" in message

    path.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_foreign_unsafe_or_incomplete_files_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), plain)
    with pytest.raises(CheckpointError, match="not an ssl_ptx checkpoint"):
        load_checkpoint(plain)

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}, "obj": _Unsafe()}, unsafe)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(unsafe)

    partial = save_checkpoint({"epoch": 1}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['model'\]"):
        load_checkpoint(partial)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


class _Unsafe:
    """An arbitrary object: weights_only loading must not unpickle it."""


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    path = save_checkpoint({"model": nn.Linear(3, 2).state_dict()}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="do not fit the model"):
        load_weights(nn.Linear(4, 2), path)


def test_failed_write_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_checkpoint({"model": {}, "epoch": 1}, tmp_path / "last.pt")
    before = path.read_bytes()

    def broken_save(obj: object, target: Path) -> None:
        Path(target).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {}, "epoch": 2}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


def test_derived_seeds_differ_by_every_key() -> None:
    seeds = {derive_seed(0, epoch, rank) for epoch in range(50) for rank in range(4)}
    assert len(seeds) == 200
    assert derive_seed(7, 3, 1) == derive_seed(7, 3, 1)
    assert all(0 <= s < 2**31 for s in seeds)
