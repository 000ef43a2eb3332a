"""Run a recipe or a Python snippet in a child process and SIGKILL it when a condition appears.

Two ways to kill a child at a chosen moment:

* from outside, :func:`run_until` polls a condition (on the child's output so far, or on files
  it writes) and sends ``SIGKILL`` as soon as it holds — a pre-empted job;
* from inside, :func:`kill_in_atomic_write` is a snippet that makes the child kill itself with
  ``SIGKILL`` inside :func:`ssl_ptx.fileio.atomic_path`, after the temporary file of the
  ``nth`` write to a matching file name is complete and before it is renamed onto the target
  — the narrowest window of an atomic write, hit deterministically. The library is not
  changed: the snippet replaces ``ssl_ptx.fileio.atomic_path`` in the child before anything
  else imports it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KILL_MARK",
    "ROOT",
    "ChildRun",
    "child_env",
    "kill_in_atomic_write",
    "python_command",
    "recipe_command",
    "run_until",
    "sets",
    "tiny_run_args",
]

ROOT = Path(__file__).resolve().parents[1]


def sets(values: Sequence[str]) -> list[str]:
    """``--set VALUE`` for each of ``values``."""
    return [option for value in values for option in ("--set", value)]


def tiny_run_args(
    demo_root: Path, out_dir: Path, epochs: int, settings: Sequence[str]
) -> list[str]:
    """Arguments of a CPU run of a training recipe on ``demo_root``'s SIIM images into
    ``out_dir``, without progress bars, with ``settings`` as ``--set`` options."""
    return [
        *("--siim-dir", str(demo_root / "siim"), "--out", str(out_dir), "--device", "cpu"),
        *("--epochs", str(epochs), "--no-progress"),
        *sets(settings),
    ]


#: the line a child killed by :func:`kill_in_atomic_write` prints just before it dies
KILL_MARK = "KILLED-IN-ATOMIC-WRITE"
_DISTRIBUTED_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass
class ChildRun:
    """What :func:`run_until` saw.

    Attributes:
        returncode: the child's exit status (``-9`` when killed by SIGKILL).
        output: its stdout and stderr, interleaved.
        killed_by_parent: True when the condition held and the parent killed it.
    """

    returncode: int
    output: str
    killed_by_parent: bool

    @property
    def killed(self) -> bool:
        """True when the child died of SIGKILL (by the parent or by itself)."""
        return self.returncode == -signal.SIGKILL

    def tail(self, chars: int = 4000) -> str:
        return self.output[-chars:]


def child_env(**extra: str) -> dict[str, str]:
    """This environment without torchrun's variables, with the repository on ``PYTHONPATH``
    and unbuffered output (so that conditions on the output see lines as they are written)."""
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_until(
    command: Sequence[str],
    until: Callable[[str], bool] | None = None,
    *,
    timeout: float = 300.0,
    poll: float = 0.02,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run ``command``; SIGKILL it as soon as ``until(output_so_far)`` is true.

    Args:
        command: the child's argument vector.
        until: called every ``poll`` seconds with the output so far (it may also look at
            files); None runs the child to its end.
        timeout: seconds before the child is killed and an ``AssertionError`` raised.
        poll: seconds between two checks of ``until``.
        env: the child's environment (default :func:`child_env`).

    Returns:
        A :class:`ChildRun`. A child that ends before ``until`` holds is returned as it is
        (``killed_by_parent`` False); the caller asserts what it needs.
    """
    process = subprocess.Popen(
        list(command),
        cwd=ROOT,
        env=env if env is not None else child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a kill reaches any helpers it starts
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(process.stdout.readline, "")))
    reader.start()
    deadline = time.monotonic() + timeout
    killed_by_parent = False
    try:
        while process.poll() is None:
            if until is not None and until("".join(chunks)):
                os.killpg(process.pid, signal.SIGKILL)
                killed_by_parent = True
                break
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                reader.join()
                raise AssertionError(
                    f"{command[:4]}… still running after {timeout:.0f} s; output:\n"
                    + "".join(chunks)[-4000:]
                )
            time.sleep(poll)
    finally:
        process.wait()
        reader.join()
        process.stdout.close()
    return ChildRun(process.returncode, "".join(chunks), killed_by_parent)


def kill_in_atomic_write(pattern: str, nth: int) -> str:
    """Python source that, run first in a child, makes it SIGKILL itself during the ``nth``
    atomic write (1-based) to a file whose name matches ``pattern`` (``fnmatch``): after the
    temporary file is written and closed, before it is renamed onto the target. It prints
    ``KILLED-IN-ATOMIC-WRITE <target> <temporary>`` first."""
    return f"""
import contextlib, fnmatch, os, signal, sys
from pathlib import Path
import ssl_ptx.fileio as _fileio
_original, _writes = _fileio.atomic_path, [0]

@contextlib.contextmanager
def _dying_atomic_path(path):
    with _original(path) as tmp:
        yield tmp
        if fnmatch.fnmatch(Path(path).name, {pattern!r}):
            _writes[0] += 1
            if _writes[0] == {nth}:
                print({KILL_MARK!r}, path, tmp, flush=True)
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)

_fileio.atomic_path = _dying_atomic_path
"""


def python_command(source: str) -> list[str]:
    """``python -c source`` with this interpreter."""
    return [sys.executable, "-c", source]


def recipe_command(recipe: str, args: Sequence[str], *, prelude: str = "") -> list[str]:
    """Run ``recipes/<recipe>`` with ``args``: plainly, or after ``prelude`` (e.g.
    :func:`kill_in_atomic_write`) in the same interpreter."""
    path = ROOT / "recipes" / recipe
    if not prelude:
        return [sys.executable, str(path), *args]
    launch = (
        f"import runpy, sys\nsys.argv = {[str(path), *args]!r}\n"
        f"sys.path.insert(0, {str(path.parent)!r})\n"
        f"runpy.run_path({str(path)!r}, run_name='__main__')\n"
    )
    return python_command(prelude + launch)
