"""Distributed data parallel under ``torchrun``: process context, rank-0 helpers, gathers.

``torchrun --nproc_per_node=N script.py`` starts N processes and sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them, picks
the device (``cuda:LOCAL_RANK`` when CUDA is used) and initialises the process group (NCCL on
CUDA, gloo on CPU). Without those variables everything runs as one process, world size 1, and
the helpers here are no-ops.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistributedContext",
    "all_gather_arrays",
    "all_gather_objects",
    "all_ranks_true",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "destroy_distributed",
    "init_distributed",
    "is_distributed",
    "resolve_device",
    "unwrap_model",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank, 0 … world_size − 1.
        local_rank: rank on this machine (the CUDA device index).
        world_size: number of processes.
        device: this process's device.
    """

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def loader_options(self) -> dict[str, Any]:
        """``world_size``, ``rank`` and ``pin_memory`` (True on CUDA): the keyword arguments
        that shard this process's loaders (``ssl_ptx.engine.loaders``)."""
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "pin_memory": self.device.type == "cuda",
        }


def is_distributed() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(device: str | torch.device, local_rank: int = 0) -> torch.device:
    """The torch device named by ``device``.

    Args:
        device: "auto" (``cuda:<local_rank>`` when CUDA is available, else CPU), "cpu",
            "cuda" (``cuda:<local_rank>``), "cuda:N", or a ``torch.device``.
        local_rank: this process's rank on the machine.

    Raises:
        RuntimeError: CUDA was asked for but is not available.
    """
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(name)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but CUDA is not available here")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
    return resolved


def init_distributed(device: str | torch.device = "auto") -> DistributedContext:
    """Read ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` and initialise the process group.

    Safe to call more than once (an existing process group is reused). With ``WORLD_SIZE``
    unset or 1 no process group is created.

    Args:
        device: see :func:`resolve_device`.

    Returns:
        This process's :class:`DistributedContext`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need WORLD_SIZE >= 1 and 0 <= RANK < WORLD_SIZE, got {world_size}, {rank}"
        )
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        logger.info("rank %d/%d: process group (%s) on %s", rank, world_size, backend, resolved)
    return DistributedContext(rank, local_rank, world_size, resolved)


def destroy_distributed() -> None:
    """Tear the process group down (no-op when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    """The device tensors must live on for collectives of the current backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of ``values`` over all processes (a copy; the input is unchanged)."""
    if not is_distributed():
        return values.clone()
    buffer = values.detach().to(_collective_device(), copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return buffer.to(values.device)


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers of ``model`` (BatchNorm statistics), in place.

    DDP sends rank 0's buffers to the others at the start of each training forward, but each
    process then updates its own copy: after the last step they differ, and a validation
    sharded over processes would score each shard with other statistics than the ones rank 0
    saves. A no-op in a single process."""
    if not is_distributed():
        return
    device = _collective_device()
    for buffer in model.buffers():
        shared = buffer.detach().to(device, copy=True)
        dist.broadcast(shared, src=0)
        buffer.copy_(shared.to(buffer.device))


def all_ranks_true(flag: bool) -> bool:
    """True only if ``flag`` is True on every process (one small all-reduce)."""
    if not is_distributed():
        return bool(flag)
    buffer = torch.tensor([int(bool(flag))], device=_collective_device())
    dist.all_reduce(buffer, op=dist.ReduceOp.MIN)
    return bool(buffer.item())


def all_gather_arrays(array: np.ndarray) -> np.ndarray:
    """Concatenate a 1-D array from every process along axis 0, in rank order.

    Processes may hold different lengths (e.g. the last validation shard is shorter): the
    arrays are padded to the longest for the gather and the padding is removed, so every
    element appears exactly once.

    Args:
        array: [n_rank] numeric array (bool, int or float) of this process.

    Returns:
        [sum of n_rank] array of the same dtype, identical on every process.
    """
    array = np.asarray(array)
    if array.ndim != 1:
        raise ValueError(f"expected a 1-D array, got shape {array.shape}")
    if not is_distributed():
        return array.copy()
    device = _collective_device()
    world = dist.get_world_size()
    length = torch.tensor([array.size], device=device, dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    longest = max(sizes)
    values = torch.zeros(longest, dtype=torch.float64, device=device)
    values[: array.size] = torch.from_numpy(array.astype(np.float64))
    gathered = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(gathered, values)
    parts = [g[:n].cpu().numpy() for g, n in zip(gathered, sizes, strict=True)]
    return np.concatenate(parts).astype(array.dtype)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel / DataParallel / ``torch.compile``."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
