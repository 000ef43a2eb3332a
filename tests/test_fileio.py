"""Atomic writes (:mod:`ssl_ptx.fileio`): the target is replaced whole or not at all, and the
temporary files that killed writes leave behind are removed by the next write of the same
target — and nothing else is."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ssl_ptx.fileio import atomic_path, atomic_write_bytes, remove_stale_temporaries


def _stale(folder: Path, name: str, age_s: float = 60.0) -> Path:
    """A file named like a temporary of an atomic write, last modified ``age_s`` ago."""
    path = folder / name
    path.write_bytes(b"half a checkpoint")
    past = time.time() - age_s
    os.utime(path, (past, past))
    return path


def test_atomic_write_replaces_the_target_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "last.pt"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]


def test_a_failed_write_keeps_the_old_target_and_removes_its_temporary(tmp_path: Path) -> None:
    target = atomic_write_bytes(tmp_path / "last.pt", b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_the_next_write_removes_stale_temporaries_of_its_target_only(tmp_path: Path) -> None:
    stale = [_stale(tmp_path, ".last.pt.k3j_x9aa.tmp"), _stale(tmp_path, ".last.pt.0q1w2e3r.tmp")]
    kept = [
        _stale(tmp_path, ".metrics.csv.k3j_x9aa.tmp"),  # another target's temporary
        _stale(tmp_path, ".last.pt.x.k3j_x9aa.tmp"),  # a temporary of the target "last.pt.x"
        _stale(tmp_path, "last.pt.k3j_x9aa.tmp"),  # not hidden: not an atomic_path name
        _stale(tmp_path, ".last.pt.tmp"),  # no random part
        _stale(tmp_path, ".last.pt.k3j_x9aa.tmp.bak"),
        _stale(tmp_path, "notes.txt"),
    ]
    (tmp_path / "sub").mkdir()
    kept.append(_stale(tmp_path / "sub", ".last.pt.k3j_x9aa.tmp"))  # another folder

    atomic_write_bytes(tmp_path / "last.pt", b"new")

    assert (tmp_path / "last.pt").read_bytes() == b"new"
    assert not any(p.exists() for p in stale)
    assert all(p.read_bytes() == b"half a checkpoint" for p in kept)


def test_temporaries_younger_than_the_current_write_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "last.pt"
    with atomic_path(target) as tmp:
        # another write of the target, started after this one (not known to be abandoned)
        younger = _stale(tmp_path, ".last.pt.younger1.tmp", age_s=-60.0)
        older = _stale(tmp_path, ".last.pt.older123.tmp")
        tmp.write_bytes(b"new")
        assert remove_stale_temporaries(target, tmp) == [older]
        assert tmp.exists() and younger.exists()
    assert target.read_bytes() == b"new" and younger.exists()
