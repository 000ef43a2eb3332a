"""Sustained load: the cache-backed training loader with 4 workers reads 20,000 samples without
leaking memory or file handles.

The dataset is :func:`ssl_ptx.engine.data.build_cached_dataset` over a 5,000-row manifest
(every row its own image id, the pixels of 16 small PNGs) cached at 32², read through
:func:`ssl_ptx.engine.loaders.build_train_loader` with the light training augmentation, 4
workers and batches of 50, for 4 epochs (workers are started anew every epoch, as the Trainer
uses them). Measured:

* RSS of the main process after the first epoch (warmed up) and after the last: bounded growth;
* RSS of every worker near the start and at the end of each epoch (1,250 samples per worker
  in between): bounded growth per worker, and no growth from the first epoch's workers to the
  last's;
* open file descriptors of the main process before the first epoch and after the last (the
  last batch released): the same ones; every worker holds exactly one descriptor of the cache
  file (one h5py handle per process, not one per sample), and no worker outlives its epoch.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from ssl_ptx.config import DataConfig
from ssl_ptx.data.manifest import empty_manifest
from ssl_ptx.data.transforms import build_transforms
from ssl_ptx.engine.data import build_cached_dataset, manifest_cache_path
from ssl_ptx.engine.loaders import build_train_loader, set_loader_epoch

ROWS, EPOCHS, BATCH, WORKERS, SIZE = 5_000, 4, 50, 4, 32
MIB = 2**20
#: bounds on growth (MiB): far below what keeping the samples would cost (20,000 samples of
#: 2 × 32² float32 = 156 MiB), above allocator noise
MAIN_GROWTH_MIB = 24.0
WORKER_GROWTH_MIB = 16.0


def _rss(pid: int | str = "self") -> float:
    """Resident set size of process ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError(f"no VmRSS for process {pid}")


def _children() -> list[int]:
    """Process ids whose parent is this process (the DataLoader workers)."""
    me, pids = os.getpid(), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            pids.append(int(stat.parent.name))
    return sorted(pids)


def _descriptors(pid: int | str = "self") -> list[str]:
    """What the open file descriptors of process ``pid`` point to."""
    targets = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            targets.append(os.readlink(fd))
        except OSError:  # closed meanwhile (e.g. the one iterdir used)
            continue
    return targets


def _manifest(folder: Path) -> pd.DataFrame:
    """``ROWS`` rows over 16 random 48×48 PNGs, alternating labels, empty masks."""
    rng = np.random.default_rng(0)
    paths = []
    for n in range(16):
        path = folder / f"image{n:02d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (48, 48), dtype=np.uint8))
        paths.append(str(path))
    manifest = empty_manifest().reindex(range(ROWS))
    manifest["image_id"] = [f"row{n:05d}" for n in range(ROWS)]
    manifest["path"] = [paths[n % len(paths)] for n in range(ROWS)]
    manifest["source"] = "load"
    manifest["label"] = 0.0
    manifest["rle"] = "-1"
    manifest[["fold", "height", "width", "mask_area"]] = [-1, 48, 48, 0]
    manifest[["view", "patient_id"]] = ""
    return manifest


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
def test_cached_loader_reads_20000_samples_without_leaks(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    dataset = build_cached_dataset(
        manifest,
        build_transforms("light", SIZE, train=True),
        size=SIZE,
        cache_dir=tmp_path / "cache",
        name="load",
        progress=False,
    )
    assert len(dataset) == ROWS
    cache_path = os.path.realpath(manifest_cache_path(manifest, tmp_path / "cache", SIZE, "load"))
    config = DataConfig(size=SIZE, batch_size=BATCH, num_workers=WORKERS)
    loader = build_train_loader(dataset, config, epochs=EPOCHS, seed=0)

    fds_before = _descriptors()
    other_children = set(_children())  # e.g. a multiprocessing resource tracker of the suite
    samples, main_rss, worker_growth, worker_end = 0, [], [], []
    for epoch in range(EPOCHS):
        set_loader_epoch(loader, epoch)
        start: dict[int, float] = {}
        for batch_index, batch in enumerate(loader):
            samples += len(batch["image"])
            if batch_index == 2 * WORKERS:  # every worker has delivered a batch
                workers = [pid for pid in _children() if pid not in other_children]
                assert len(workers) == WORKERS
                start = {pid: _rss(pid) for pid in workers}
            if batch_index == len(loader) - 1:  # the workers are still alive
                end = {pid: _rss(pid) for pid in start}
                worker_growth += [end[pid] - start[pid] for pid in start]
                worker_end.append(max(end.values()))
                for pid in start:
                    handles = [t for t in _descriptors(pid) if t == cache_path]
                    assert len(handles) == 1, f"worker {pid} holds {len(handles)} cache handles"
        assert set(_children()) <= other_children, f"epoch {epoch + 1}: workers outlive it"
        main_rss.append(_rss())
    # the last batch's tensors came through shared memory: each holds a /dev/shm descriptor
    # until it is freed, which is the consumer's reference, not a leak
    del batch
    gc.collect()
    fds_after = _descriptors()

    assert samples == EPOCHS * ROWS == 20_000
    report = (
        f"main RSS per epoch {[round(r, 1) for r in main_rss]} MiB; worker RSS growth within an "
        f"epoch max {max(worker_growth):.1f} MiB; largest worker at each epoch end "
        f"{[round(r, 1) for r in worker_end]} MiB; open fds {len(fds_before)} -> {len(fds_after)}"
    )
    print(report)
    assert main_rss[-1] - main_rss[0] < MAIN_GROWTH_MIB, report
    assert max(worker_growth) < WORKER_GROWTH_MIB, report
    assert worker_end[-1] - worker_end[0] < WORKER_GROWTH_MIB, report
    assert sorted(fds_after) == sorted(fds_before), report
