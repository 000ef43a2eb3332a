"""Kill and resume: SIGKILLed runs continue to exactly what an uninterrupted run produces.

Faults injected (each a real ``SIGKILL`` of a child process, see ``tests/_subprocess.py``):

* the supervised and the Mean-Teacher recipe, killed by the parent in the middle of epoch 1
  (as soon as a mid-epoch ``last.pt`` of that epoch appears), then resumed with ``--resume``
  and killed again by themselves inside their 2nd write of ``last.pt`` (temporary file
  complete, not yet renamed), then resumed to the end: the final student, EMA / teacher and
  optimiser tensors equal an uninterrupted run's exactly (``torch.equal``, CPU, same seed),
  and so do the metrics rows (one per epoch, none repeated); the killed write's temporary
  file is gone (the next write of ``last.pt`` removes it) and no ``.tmp`` file is left;
* the HDF5 cache build killed inside the write of its 3rd part file, then rerun: the cache
  equals an uninterrupted build's (ids, pixels, masks, labels, metadata);
* the pseudo-label filter killed inside the write of its 2nd part file, then rerun: the
  pseudo manifest, decisions and masks equal an uninterrupted run's, no row lost or repeated.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from _subprocess import (
    KILL_MARK,
    ROOT,
    kill_in_atomic_write,
    python_command,
    recipe_command,
    run_until,
    sets,
    tiny_run_args,
)

from ssl_ptx.data.cache import main as cache_main
from ssl_ptx.data.siim import load_siim
from ssl_ptx.engine.checkpoint import CheckpointError, load_checkpoint
from ssl_ptx.engine.logging import read_metrics_csv

#: metrics that measure time, not training: they differ between any two runs
TIMING_KEYS = {"epoch_time_s", "train_images_per_s"}
EPOCHS = 2
#: a small, fast model and run: 64², ~0.4 M parameters, a last.pt after every step
SMALL_RUN = [
    "data.size=64",
    "data.num_workers=0",
    "data.batch_size=4",
    "model.encoder_name=tu-mobilenetv3_small_050",
    "model.decoder_channels=[32,16,16,16,8]",
    "trainer.save_every_n_steps=1",
    "trainer.top_k=1",
    "trainer.tensorboard=false",
]


def _load_recipe(name: str) -> Any:
    path = ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"kill_resume_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe_args(name: str, demo_root: Path, cache_dir: Path, out_dir: Path) -> list[str]:
    """Command-line arguments of a tiny run of recipe ``name`` into ``out_dir``."""
    args = tiny_run_args(demo_root, out_dir, EPOCHS, [*SMALL_RUN, f"data.cache_dir={cache_dir}"])
    if name == "train_supervised":
        return [*args, "--ema", "0.9"]
    return [
        *args,
        "--nih-dir",
        str(demo_root / "nih"),
        "--labelled-fraction",
        "0.5",
        # 2 labelled images per step: enough steps per epoch to be killed in the middle of one
        *sets(["data.batch_size=2", "unlabelled.batch_size=2", "unlabelled.nih_max_images=16"]),
    ]


def _tensors(value: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a nested checkpoint value, with its dotted path."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{path}.{index}")


def assert_same_final_state(expected: dict, resumed: dict) -> int:
    """Model, optimiser, EMA / teacher tensors and counters equal; returns tensors compared."""
    assert resumed["global_step"] == expected["global_step"]
    assert (resumed["epoch"], resumed["batches_done"]) == (expected["epoch"], 0)
    compared = 0
    for section in ("model", "optimizer", "callbacks", "mean_teacher"):
        want = dict(_tensors(expected.get(section), section))
        got = dict(_tensors(resumed.get(section), section))
        assert got.keys() == want.keys(), section
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), f"{key} differs after kill and resume"
        compared += len(want)
    return compared


def assert_same_metrics(expected_csv: Path, resumed_csv: Path) -> None:
    """One row per epoch, each equal to the uninterrupted run's (timings aside)."""
    expected, resumed = read_metrics_csv(expected_csv), read_metrics_csv(resumed_csv)
    assert [row["epoch"] for row in resumed] == list(range(EPOCHS))
    for want, got in zip(expected, resumed, strict=True):
        assert got.keys() == want.keys()
        for key in want.keys() - TIMING_KEYS:
            same = want[key] == got[key] or (
                isinstance(want[key], float) and math.isnan(want[key]) and math.isnan(got[key])
            )
            assert same, f"epoch {want['epoch']} {key}: {want[key]} vs {got[key]}"


def mid_epoch_checkpoint(out_dir: Path, epoch: int, last_batch: int) -> Callable[[str], bool]:
    """A condition for :func:`run_until`: ``out_dir/last.pt`` was written inside epoch
    ``epoch`` (0-based) after 1 to ``last_batch`` batches (so the kill lands mid-epoch)."""
    last = out_dir / "last.pt"
    seen: list[tuple[int, int, int] | None] = [None]

    def condition(_output: str) -> bool:
        try:
            stat = last.stat()
        except FileNotFoundError:
            return False
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if key == seen[0]:
            return False
        seen[0] = key
        try:
            state = load_checkpoint(last, required=("epoch", "batches_done"))
        except (CheckpointError, FileNotFoundError):
            return False
        return state["epoch"] == epoch and 1 <= state["batches_done"] <= last_batch

    return condition


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kill_resume_cache")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["train_supervised", "mean_teacher_nih"])
def test_recipe_killed_mid_epoch_and_in_checkpoint_write_resumes_exactly(
    name: str, demo_root: Path, cache_dir: Path, tmp_path: Path
) -> None:
    recipe = _load_recipe(name)
    straight_dir, out_dir = tmp_path / "straight", tmp_path / "killed"
    recipe.main(_recipe_args(name, demo_root, cache_dir, straight_dir))  # also builds the caches
    straight = load_checkpoint(straight_dir / "last.pt")
    steps_per_epoch = straight["global_step"] // EPOCHS
    assert steps_per_epoch >= 4, "too few steps per epoch to kill one in its middle"
    args = _recipe_args(name, demo_root, cache_dir, out_dir)

    # 1. pre-empted from outside in the middle of epoch 1
    first = run_until(
        recipe_command(f"{name}.py", args),
        mid_epoch_checkpoint(out_dir, epoch=0, last_batch=steps_per_epoch - 2),
    )
    assert first.killed_by_parent and first.killed, first.tail()
    killed = load_checkpoint(out_dir / "last.pt")
    assert killed["epoch"] == 0 and 0 < killed["batches_done"] < steps_per_epoch

    # 2. resumed, then killed inside its 2nd write of last.pt (temporary file complete)
    second = run_until(
        recipe_command(
            f"{name}.py", [*args, "--resume"], prelude=kill_in_atomic_write("last.pt", 2)
        )
    )
    assert second.killed and KILL_MARK in second.output, second.tail()
    target, temporary = second.output.split(KILL_MARK)[1].split()[:2]
    assert Path(target) == out_dir / "last.pt" and Path(temporary).stat().st_size > 0
    previous = load_checkpoint(out_dir / "last.pt")  # the write before the killed one
    assert previous["global_step"] == killed["global_step"] + 1

    # 3. resumed to the end; its first write of last.pt removes the killed write's temporary
    recipe.main([*args, "--resume"])
    leftovers = sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*.tmp"))
    assert not Path(temporary).exists() and not leftovers, leftovers
    resumed = load_checkpoint(out_dir / "last.pt")
    compared = assert_same_final_state(straight, resumed)
    assert compared > 100  # model, optimiser moments, EMA / teacher weights
    print(
        f"{name}: killed at epoch 1 batch {killed['batches_done']} of {steps_per_epoch} (step "
        f"{killed['global_step']}) and in the write of step {previous['global_step'] + 1}; "
        f"{compared} tensors equal after {resumed['global_step']} steps"
    )
    teacher = "callbacks" if name == "train_supervised" else "mean_teacher"
    assert any(True for _ in _tensors(resumed[teacher], teacher))  # the EMA / teacher exists
    assert_same_metrics(straight_dir / "metrics.csv", out_dir / "metrics.csv")


def _cache_arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        arrays = {}
        file.visititems(
            lambda name, item: (
                arrays.__setitem__(name, item[:]) if isinstance(item, h5py.Dataset) else None
            )
        )
        arrays["attrs"] = np.array(sorted((k, str(v)) for k, v in file.attrs.items()))
    return arrays


def test_cache_build_killed_in_a_part_write_resumes_to_the_same_file(
    demo_root: Path, tmp_path: Path
) -> None:
    manifest_csv = tmp_path / "manifest.csv"
    load_siim(demo_root / "siim", progress=False).to_csv(manifest_csv, index=False)
    options = ["--size", "32", "--chunk", "8", "--no-progress"]
    straight, resumed = tmp_path / "straight.h5", tmp_path / "resumed.h5"
    assert cache_main([str(manifest_csv), str(straight), *options]) == 0

    source = kill_in_atomic_write("part-*.h5", 3) + (
        "from ssl_ptx.data.cache import main\n"
        f"main({[str(manifest_csv), str(resumed), *options]!r})\n"
    )
    killed = run_until(python_command(source))
    assert killed.killed and KILL_MARK in killed.output, killed.tail()
    parts = resumed.with_name(resumed.name + ".parts")
    assert sorted(p.name for p in parts.glob("part-*.h5")) == ["part-000000.h5", "part-000001.h5"]
    assert not resumed.exists()

    assert cache_main([str(manifest_csv), str(resumed), *options]) == 0
    assert not parts.exists()
    want, got = _cache_arrays(straight), _cache_arrays(resumed)
    assert got.keys() == want.keys() and len(want["image_ids"]) == 48
    assert len(set(got["image_ids"])) == len(got["image_ids"])  # no row twice
    for key, array in want.items():
        np.testing.assert_array_equal(got[key], array, err_msg=key)


def test_pseudo_filter_killed_in_a_part_write_resumes_without_lost_or_repeated_rows(
    tmp_path: Path,
) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_pseudo import _filter, _write_pool

    from ssl_ptx.pseudo import read_pseudo_masks

    pool = _write_pool(tmp_path / "pool")
    straight = _filter(gallery_size=0).run(pool, tmp_path / "straight")
    out_dir = tmp_path / "killed"
    source = kill_in_atomic_write("part-*.h5", 2) + (
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\nfrom test_pseudo import _filter, _write_pool\n"
        f"_filter(gallery_size=0).run(_write_pool(Path({str(tmp_path / 'pool')!r})), "
        f"{str(out_dir)!r})\n"
    )
    killed = run_until(python_command(source))
    assert killed.killed and KILL_MARK in killed.output, killed.tail()
    assert [p.name for p in (out_dir / "parts").glob("part-*.h5")] == ["part-000000.h5"]
    assert not (out_dir / "decisions.csv").exists()

    resumed = _filter(gallery_size=0).run(pool, out_dir)
    assert resumed.blocks_reused == 1
    decisions = pd.read_csv(out_dir / "decisions.csv")
    assert decisions["image_id"].tolist() == pool["image_id"].tolist()  # none lost or twice
    pd.testing.assert_frame_equal(resumed.decisions, straight.decisions)
    pd.testing.assert_frame_equal(resumed.manifest, straight.manifest)
    for name in ("pseudo_manifest.csv", "decisions.csv", "skipped.csv"):
        pd.testing.assert_frame_equal(
            pd.read_csv(out_dir / name), pd.read_csv(tmp_path / "straight" / name)
        )
    want, got = (
        read_pseudo_masks(tmp_path / "straight" / "masks.h5"),
        read_pseudo_masks(out_dir / "masks.h5"),
    )
    assert got.keys() == want.keys()
    for image_id, mask in want.items():
        np.testing.assert_array_equal(got[image_id], mask, err_msg=image_id)
