"""Atomic file writes: a reader sees the old file or the complete new one, never half of one."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "remove_stale_temporaries"]

logger = logging.getLogger(__name__)

#: the random part ``tempfile.mkstemp`` puts between prefix and suffix (no dots in it)
_RANDOM_PART = "[a-z0-9_]+"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file is a hidden ``.<name>.XXXXXXXX.tmp`` in the same folder. If the block
    raises, ``path`` is left untouched and the temporary file is removed. If the process dies
    (SIGKILL, power loss), the temporary file stays behind; the next atomic write of the same
    ``path`` removes it: see :func:`remove_stale_temporaries`, called as soon as this write's
    own temporary file exists (before the new content takes disk space). Only one process
    should write a given ``path`` at a time (under DDP: rank 0).

    Example:
        >>> with atomic_path("manifest.csv") as tmp:
        ...     df.to_csv(tmp, index=False)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions open() would
    remove_stale_temporaries(path, Path(tmp))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_stale_temporaries(path: str | Path, current: str | Path) -> list[Path]:
    """Delete the temporary files that killed atomic writes of ``path`` left behind.

    A file is removed when it is a sibling of ``path`` named exactly as
    :func:`atomic_path` names the temporaries of ``path`` (``.<name>.<random>.tmp``, where
    ``<random>`` has no dot: temporaries of ``name.x`` or of other targets never match) and
    it was last modified before ``current`` (this write's own temporary file, kept) was
    created. Files that vanish meanwhile or cannot be removed are left alone.

    Args:
        path: the target file.
        current: the temporary file of the write in progress; its modification time is the
            cut-off (nanoseconds).

    Returns:
        The files removed (each also logged at INFO level).
    """
    path, current = Path(path), Path(current)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_RANDOM_PART}\.tmp")
    cutoff = current.stat().st_mtime_ns
    removed = []
    with os.scandir(path.parent) as entries:
        candidates = [
            Path(entry.path)
            for entry in entries
            if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)
        ]
    for candidate in candidates:
        if candidate.name == current.name:
            continue
        try:
            if candidate.stat().st_mtime_ns >= cutoff:
                continue  # written while this write began: not known to be abandoned
            candidate.unlink()
        except OSError:
            continue
        logger.info("removed %s, left by an interrupted write of %s", candidate, path)
        removed.append(candidate)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)
