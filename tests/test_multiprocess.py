"""Multi-process: a 2-process CPU (gloo) ``torchrun`` of the supervised and Mean-Teacher recipes
against a 1-process run of the same global batch.

What is compared, and why these settings:

* **The computation is made the same.** 2 processes × 1 image per process and step against
  1 process × 1 image × ``trainer.accumulate=2``: both take 2 images per optimiser step, the
  same 2 (the samplers shard one shared order by rank: rank r takes positions r, r + 2, …, the
  1-process run takes them in turn), and both average the two images' gradients (DDP's
  all-reduce vs accumulation). BatchNorm normalises with the statistics of the batch it
  sees, which is per process without SyncBN (and ``nn.SyncBatchNorm`` runs on CUDA only): with
  one image per process and per micro-batch, BatchNorm sees the same single image in both runs.
  Per-process randomness is switched off: ``data.augment=none`` (augmentations are drawn from
  each rank's own stream), and for Mean Teacher ``mean_teacher.student_brightness=0`` (a
  random factor per image), ``mean_teacher.rampup_epochs=0`` (the ramp is read per
  micro-batch, so it would differ between the two micro-batches of a step) and
  ``mean_teacher.teacher_bn=train`` (teacher targets with the batch's statistics, not with
  running statistics refreshed on one rank's labelled images).
* **The arithmetic is made the same.** Both runs are fresh interpreters with one thread
  (``OMP_NUM_THREADS=1``, ``MKL_NUM_THREADS=1``; torchrun's children would get one OpenMP
  thread anyway). The kernels' results depend on the thread count: a 1-process run with
  the default 2 threads differs from one with 1 thread by 6.7e-8 in the gradients of step 1,
  and 16 SGD steps on single 64² images grow that about tenfold per step, to 1.2e-3 in the
  parameters — the whole difference this test used to see when the reference ran inside
  the pytest process with its default threads.
* **Parameters** (student, and the teacher's) must then be **equal, bit for bit**: each image
  goes through the same kernels in both runs, and the gradient average is exact both ways —
  DDP sums ``g0/2 + g1/2`` (halving is exact in binary floating point, and a sum of two terms
  does not depend on their order), accumulation back-propagates ``loss/2`` (every
  intermediate of the backward pass scaled by exactly 1/2) twice into the same sum. Measured:
  0.0 difference in gradients, learning rates and parameters at every step of both
  recipes. No tolerance in between would mean anything here: a difference of one rounding
  step at step 1 reaches ~1e-3 by step 16 (see above), so the runs are either equal or
  visibly apart; a run that skipped the gradient average or fed both ranks the same images
  differs by whole steps (about lr × gradient ≈ 1e-3) from the first step on. The optimiser
  is SGD (momentum 0.9, lr 0.01) and the loss BCE.
* **BatchNorm running statistics are not compared**: the 1-process run updates them once per
  micro-batch (2 per step), DDP once per step on rank 0's image (then broadcast), so they
  differ by design, and so do validation scores that use them.
* **Gathered validation**: the 2-process run's ``val_dice`` (and its split) must equal what
  one process computes with the same weights on the whole validation set, ``val_images``
  must be the whole set — not rank 0's half.
* **Epochs that do not divide evenly** (not reached by the recipe runs: the positive-rate
  sampler at 0.5 always draws an even epoch): :func:`build_train_loader` drops the epoch's
  last ``n mod world_size`` images instead of padding with repeated ones, so 2 processes take
  the steps, and the images per step, of one process with the global batch
  (``test_shards_take_the_steps_of_one_process_with_the_global_batch``, no torchrun).
* **Only rank 0 writes**: the output folder holds exactly the files of the 1-process run (no
  second ``metrics.csv``, no temporary files), and ``metrics.csv`` has one row per epoch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _subprocess import ROOT, child_env, recipe_command, run_until, tiny_run_args

from ssl_ptx.config import (
    MEAN_TEACHER_PRESETS,
    PRESETS,
    DataConfig,
    config_from_dict,
    config_to_dict,
)
from ssl_ptx.engine import Trainer
from ssl_ptx.engine.checkpoint import load_checkpoint, load_weights
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.loaders import build_train_loader, build_val_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.losses import build_loss
from ssl_ptx.models import create_model

EPOCHS = 2
COMMON = [
    "data.size=64",
    "data.num_workers=0",
    "data.augment=none",
    "model.encoder_name=tu-mobilenetv3_small_050",
    "model.decoder_channels=[32,16,16,16,8]",
    "trainer.top_k=1",
    "trainer.tensorboard=false",
    "trainer.optimizer=sgd",
    "trainer.lr=0.01",
    "loss.name=bce",
]
#: per recipe: (sets of both runs, of the 2-process run, of the 1-process run)
SETTINGS = {
    "train_supervised": ([], ["data.batch_size=2"], ["data.batch_size=1", "trainer.accumulate=2"]),
    "mean_teacher_nih": (
        [
            "mean_teacher.student_brightness=0",
            "mean_teacher.rampup_epochs=0",
            "mean_teacher.teacher_bn=train",
            "unlabelled.nih_max_images=16",
        ],
        ["data.batch_size=2", "unlabelled.batch_size=2"],
        ["data.batch_size=1", "unlabelled.batch_size=1", "trainer.accumulate=2"],
    ),
}
#: both runs' threads: the kernels' rounding depends on the thread count (module docstring)
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _args(name: str, demo_root: Path, cache_dir: Path, out_dir: Path, processes: int) -> list[str]:
    shared, two, one = SETTINGS[name]
    settings = [*COMMON, *shared, *(two if processes == 2 else one), f"data.cache_dir={cache_dir}"]
    args = tiny_run_args(demo_root, out_dir, EPOCHS, settings)
    if name == "mean_teacher_nih":
        args += ["--nih-dir", str(demo_root / "nih"), "--labelled-fraction", "0.5"]
    return args


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _evaluate_alone(run_dir: Path, name: str) -> dict[str, float]:
    """Validation metrics of ``run_dir/last.pt``'s weights, computed by one process on the
    whole validation set."""
    state = load_checkpoint(run_dir / "last.pt", required=("model", "config"))
    presets = MEAN_TEACHER_PRESETS if name == "mean_teacher_nih" else PRESETS
    config = config_from_dict(state["config"], presets["demo"](), source=str(run_dir))
    _, val_set, _ = build_siim_datasets(
        config.data, in_channels=config.model.in_channels, progress=False
    )
    model = create_model(config_to_dict(config.model))
    load_weights(model, run_dir / "last.pt")
    trainer = Trainer(
        model,
        build_loss(config.loss.build_argument()),
        config.trainer,
        out_dir=run_dir / "unused",
        default_callbacks=False,
    )
    return trainer.evaluate(build_val_loader(val_set, config.data))


def _parameters(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """The parameters in a state dict (floating tensors other than BatchNorm's running
    statistics), ``prefix`` stripped from their names."""
    return {
        key.removeprefix(prefix): value
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and not key.endswith(("running_mean", "running_var"))
    }


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("multiprocess_cache")


@pytest.fixture(scope="module", params=["train_supervised", "mean_teacher_nih"])
def runs(
    request: pytest.FixtureRequest,
    demo_root: Path,
    cache_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[str, Path, Path]:
    """``(recipe, 1-process run folder, 2-process torchrun folder)`` of the same settings,
    each run in a fresh interpreter with one thread."""
    name = request.param
    base = tmp_path_factory.mktemp(f"multiprocess_{name}")
    single_dir, ddp_dir = base / "single", base / "ddp"
    single_args = _args(name, demo_root, cache_dir, single_dir, 1)
    single_run = run_until(  # first: builds the caches
        recipe_command(f"{name}.py", single_args), env=child_env(**ONE_THREAD), timeout=600
    )
    assert single_run.returncode == 0, single_run.tail()
    assert "1 process(es)" in single_run.output
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "recipes" / f"{name}.py"),
        *_args(name, demo_root, cache_dir, ddp_dir, 2),
    ]
    ddp_run = run_until(command, env=child_env(**ONE_THREAD), timeout=600)
    assert ddp_run.returncode == 0, ddp_run.tail()
    assert "2 process(es)" in ddp_run.output
    return name, single_dir, ddp_dir


@pytest.mark.slow
def test_two_process_run_gathers_validation_and_writes_once(runs: tuple[str, Path, Path]) -> None:
    name, single_dir, ddp_dir = runs
    single, ddp = load_checkpoint(single_dir / "last.pt"), load_checkpoint(ddp_dir / "last.pt")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    assert ddp["global_step"] == single["global_step"] > 0

    # validation gathered over both ranks: the whole set, the one-process value
    alone = _evaluate_alone(ddp_dir, name)
    assert ddp["metrics"]["val_images"] == alone["val_images"] > 0
    for key in ("val_dice", "val_dice_pos", "val_fp_rate", "val_all_empty_dice"):
        assert ddp["metrics"][key] == pytest.approx(alone[key], abs=1e-12), key
    assert ddp["metrics"]["val_loss"] == pytest.approx(alone["val_loss"], rel=1e-5)

    # rank 0 alone wrote: the 1-process run's files, one metrics row per epoch
    assert _files(ddp_dir) == _files(single_dir)
    assert not [f for f in _files(ddp_dir) if Path(f).name.startswith(".")]
    assert [row["epoch"] for row in read_metrics_csv(ddp_dir / "metrics.csv")] == [0, 1]


@pytest.mark.slow
def test_two_process_parameters_equal_one_process(runs: tuple[str, Path, Path]) -> None:
    name, single_dir, ddp_dir = runs
    single, ddp = load_checkpoint(single_dir / "last.pt"), load_checkpoint(ddp_dir / "last.pt")
    # parameters (student and teacher) equal bit for bit; BatchNorm buffers differ by design
    models = [("student", _parameters(single["model"]), _parameters(ddp["model"]))]
    if name == "mean_teacher_nih":
        teachers = [_parameters(run["mean_teacher"]["teacher"], "module.") for run in (single, ddp)]
        models.append(("teacher", *teachers))
    for which, want, got in models:
        assert got.keys() == want.keys() and len(want) > 50
        differ = [k for k in want if not torch.equal(got[k], want[k])]
        worst = max((float((got[k] - want[k]).abs().max()) for k in differ), default=0.0)
        assert not differ, f"{which}: {len(differ)} tensors differ, by up to {worst:.3g}"


class _Indices(torch.utils.data.Dataset):
    """``n`` samples that are their own index; the first ``positives`` are labelled 1."""

    def __init__(self, n: int, positives: int) -> None:
        self.labels = np.array([1] * positives + [0] * (n - positives))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> int:
        return index


def _steps(config: DataConfig, dataset: _Indices, world_size: int, epoch: int) -> list[list[int]]:
    """The sorted indices each optimiser step of ``epoch`` trains on, over all processes."""
    shards = []
    for rank in range(world_size):
        loader = build_train_loader(
            dataset, config, epochs=2, seed=3, world_size=world_size, rank=rank
        )
        loader.sampler.set_epoch(epoch)
        shards.append([batch.tolist() for batch in loader])
    return [sorted(sum(step, [])) for step in zip(*shards, strict=True)]


@pytest.mark.parametrize("positive_rate", [None, 0.4])
@pytest.mark.parametrize(("n", "global_batch"), [(7, 2), (7, 4), (23, 6), (24, 4)])
def test_shards_take_the_steps_of_one_process_with_the_global_batch(
    n: int, global_batch: int, positive_rate: float | None
) -> None:
    dataset = _Indices(n, positives=n // 3)
    config = DataConfig(batch_size=global_batch, num_workers=0, positive_rate=positive_rate)
    for epoch in range(2):
        one = _steps(config, dataset, world_size=1, epoch=epoch)
        two = _steps(config, dataset, world_size=2, epoch=epoch)
        assert two == one and len(one) > 0
        assert all(len(step) == global_batch for step in two)
