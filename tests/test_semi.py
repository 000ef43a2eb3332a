"""Mean Teacher in the Trainer: two-stream batches and their DDP sharding, labelled splits, the
views, the teacher (no gradient, follows the student), exact resume, teacher metrics, export,
a 2-process run equal to a 1-process run, and the recipe (--help and a tiny run).

Toy data and nets come from tests/test_trainer.py and tests/test_ema_callback.py. This file is
also the script torchrun starts for the 2-process run (``python -m torch.distributed.run
--standalone --nproc_per_node=2 tests/test_semi.py OUT``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from test_ema_callback import StepRecorder, TinyBNNet
from test_trainer import (
    CrashAtStep,
    TinyNet,
    ToySegmentation,
    assert_same_state,
    bce,
    toy_loaders,
    trainer_config,
)

from external_data import nih
from ssl_ptx.config import (
    MEAN_TEACHER_PRESETS,
    DataConfig,
    MeanTeacherConfig,
    UnlabelledConfig,
    preset,
)
from ssl_ptx.engine import (
    CheckpointError,
    MeanTeacherTrainer,
    Trainer,
    export_best,
    init_distributed,
)
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.data import build_semi_datasets, select_unlabelled, split_labelled
from ssl_ptx.engine.distributed import all_gather_objects, destroy_distributed
from ssl_ptx.engine.loaders import (
    UnlabelledStreamSampler,
    build_train_loader,
    build_two_stream_loader,
    build_val_loader,
)
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.engine.semi import ConsistencyViews


def test_unlabelled_stream_cycles_through_permutations_in_windows() -> None:
    sampler = UnlabelledStreamSampler(10, batch_size=3, seed=0)
    stream = sampler.stream(0, 40)
    for cycle in range(4):
        assert sorted(stream[10 * cycle : 10 * (cycle + 1)]) == list(range(10))
    assert not np.array_equal(stream[:10], stream[10:20])
    assert np.array_equal(sampler.stream(7, 20), stream[7:27])
    sampler.set_window(0, 2)
    first = list(sampler)
    sampler.set_window(6, 3)
    second = list(sampler)
    assert first + second == stream[:15].tolist() and len(sampler) == 9
    other = UnlabelledStreamSampler(10, batch_size=3, seed=1)
    assert not np.array_equal(other.stream(0, 10), stream[:10])


def test_stream_shards_are_disjoint_and_make_up_the_global_batch() -> None:
    single = UnlabelledStreamSampler(13, batch_size=4, seed=3)
    single.set_window(8, 5)
    steps = np.array(list(single)).reshape(5, 4)
    shards = []
    for rank in (0, 1):
        sampler = UnlabelledStreamSampler(13, batch_size=2, seed=3, num_replicas=2, rank=rank)
        sampler.set_window(8, 5)
        shards.append(np.array(list(sampler)).reshape(5, 2))
    for step in range(5):
        assert sorted([*shards[0][step], *shards[1][step]]) == sorted(steps[step])


def _two_stream(
    world_size: int = 1, rank: int = 0, labelled_batch: int = 8, unlabelled_batch: int = 4
):
    data = DataConfig(batch_size=labelled_batch, num_workers=0)
    layout = {"world_size": world_size, "rank": rank}
    labelled = build_train_loader(ToySegmentation(32), data, epochs=2, seed=0, **layout)
    return build_two_stream_loader(
        labelled, ToySegmentation(20, seed=1), batch_size=unlabelled_batch, seed=0, **layout
    )


def test_two_stream_loader_pairs_batches_and_resumes_its_position() -> None:
    loader = _two_stream(unlabelled_batch=3)
    batches = list(loader)
    assert len(batches) == len(loader) == 4
    assert all(len(b["labelled"]["image"]) == 8 for b in batches)
    assert all(len(b["unlabelled"]["image"]) == 3 for b in batches)
    assert loader.position == 12
    state = loader.state_dict()
    following = [b["unlabelled"]["index"].tolist() for b in loader]

    fresh = _two_stream(unlabelled_batch=3)
    fresh.load_state_dict(state)
    assert [b["unlabelled"]["index"].tolist() for b in fresh] == following
    stream = loader.stream.stream(0, 24).tolist()
    seen = [i for b in batches for i in b["unlabelled"]["index"].tolist()]
    assert seen + [i for batch in following for i in batch] == stream


def test_two_stream_loader_shards_both_streams_over_processes() -> None:
    single = [
        (set(b["labelled"]["index"].tolist()), set(b["unlabelled"]["index"].tolist()))
        for b in _two_stream()
    ]
    ranks = [
        list(_two_stream(world_size=2, rank=r, labelled_batch=8, unlabelled_batch=4))
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (labelled, unlabelled) in enumerate(single):
        parts = [ranks[r][step] for r in (0, 1)]
        assert [len(p["labelled"]["image"]) for p in parts] == [4, 4]
        assert [len(p["unlabelled"]["image"]) for p in parts] == [2, 2]
        for stream, expected in (("labelled", labelled), ("unlabelled", unlabelled)):
            a, b = (set(p[stream]["index"].tolist()) for p in parts)
            assert not a & b and a | b == expected


def test_split_labelled_keeps_a_seeded_share_of_each_label() -> None:
    dataset = ToySegmentation(40)  # 20 positives, 20 negatives
    kept, rest = split_labelled(dataset, 0.25, seed=5)
    assert len(kept) == 10 and (kept.labels == 1).sum() == 5
    assert sorted(kept.indices + rest.indices) == list(range(40))
    again, _ = split_labelled(dataset, 0.25, seed=5)
    other, _ = split_labelled(dataset, 0.25, seed=6)
    assert again.indices == kept.indices != other.indices
    nested, _ = split_labelled(rest, 0.5, seed=0)  # a subset is flattened onto its dataset
    assert nested.dataset is dataset and set(nested.indices) <= set(rest.indices)


def test_select_unlabelled() -> None:
    labels = ToySegmentation(10).labels  # 5 positive, 5 negative
    rows = pd.DataFrame({"image_id": [f"n{i}" for i in range(10)], "label": labels})
    assert len(select_unlabelled(rows, "pneumothorax")) == 5
    drawn = select_unlabelled(rows, max_images=4, seed=1)
    assert len(drawn) == 4 and drawn["image_id"].is_monotonic_increasing
    with pytest.raises(ValueError, match="select must be"):
        select_unlabelled(rows, "some")


def test_views_share_geometry_and_differ_in_intensity() -> None:
    torch.manual_seed(0)
    images = torch.rand(6, 1, 16, 16) + 0.1
    student, teacher = ConsistencyViews(student_brightness=0.1)(images)
    assert torch.equal(teacher, images)
    ratio = (student / teacher).flatten(1)
    torch.testing.assert_close(ratio.amin(1), ratio.amax(1))  # one factor per image
    assert ((ratio[:, 0] >= 0.9) & (ratio[:, 0] <= 1.1)).all() and ratio[:, 0].std() > 0
    noisy_student, noisy_teacher = ConsistencyViews(0.0, noise_std=0.05)(images)
    assert 0.03 < (noisy_student - images).std() < 0.07
    assert not torch.equal(noisy_student, noisy_teacher)


def _mt_fit(
    out: Path,
    mean_teacher: MeanTeacherConfig | None = None,
    callbacks: tuple = (),
    resume: Path | None = None,
    **config: Any,
) -> MeanTeacherTrainer:
    seed_everything(0)
    loader = _two_stream()
    val = build_val_loader(ToySegmentation(16, seed=2), DataConfig(batch_size=8, num_workers=0))
    trainer = MeanTeacherTrainer(
        TinyBNNet(),
        bce,
        trainer_config(**config),
        mean_teacher or MeanTeacherConfig(rampup_epochs=1, view_noise=0.02),
        out_dir=out,
        callbacks=list(callbacks),
    )
    trainer.fit(loader, val, resume=resume)
    return trainer


def test_teacher_gets_no_gradient_and_averages_the_student(tmp_path: Path) -> None:
    recorder = StepRecorder()
    config = MeanTeacherConfig(
        ema_decay=0.9, ema_warmup=None, buffers="average", teacher_bn="eval", rampup_epochs=0
    )
    trainer = _mt_fit(tmp_path, config, callbacks=(recorder,), top_k=0)
    teacher = trainer.mean_teacher.teacher
    assert teacher.num_updates == trainer.global_step == 8
    assert all(not p.requires_grad and p.grad is None for p in teacher.module.parameters())
    assert all(p.grad is None for p in trainer.model.parameters())  # zeroed after each step
    reference = recorder.states[0]
    for state in recorder.states[1:]:
        reference = {
            k: 0.9 * reference[k] + 0.1 * v if v.is_floating_point() else v
            for k, v in state.items()
        }
    for key, value in teacher.module.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert rows[-1]["train_consistency"] > 0 and rows[-1]["train_consistency_weight"] == 1.0
    assert rows[-1]["train_loss"] == pytest.approx(
        rows[-1]["train_supervised"] + rows[-1]["train_consistency"], rel=1e-6
    )


def test_mean_teacher_resume_mid_epoch_is_exact(tmp_path: Path) -> None:
    settings = {"save_every_n_steps": 1, "top_k": 1}
    straight = _mt_fit(tmp_path / "straight", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _mt_fit(tmp_path / "split", callbacks=(CrashAtStep(7),), **settings)
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["epoch"], saved["batches_done"], saved["global_step"]) == (1, 2, 6)
    assert saved["sampler"]["unlabelled_position"] == 16  # one epoch of 4 steps × 4 images
    resumed = _mt_fit(tmp_path / "split", resume=tmp_path / "split" / "last.pt", **settings)

    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    a, b = straight.mean_teacher.teacher, resumed.mean_teacher.teacher
    assert a.num_updates == b.num_updates == 8
    assert_same_state(a.module.state_dict(), b.module.state_dict())
    assert straight._train_loader.position == resumed._train_loader.position == 32
    rows = [
        read_metrics_csv(p / "metrics.csv")[-1] for p in (tmp_path / "straight", tmp_path / "split")
    ]
    assert rows[0]["teacher_val_dice"] == rows[1]["teacher_val_dice"]
    assert rows[0]["train_consistency"] == pytest.approx(rows[1]["train_consistency"], rel=1e-9)


def test_teacher_metrics_checkpoints_and_export(tmp_path: Path) -> None:
    trainer = _mt_fit(tmp_path, top_k=2)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    for key in ("teacher_val_dice", "teacher_val_dice_pos", "teacher_val_fp_rate"):
        assert key in rows[-1]
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "teacher_best-epoch001.pt" in files and "best-epoch001.pt" in files

    exported = export_best(trainer, tmp_path / "model.pt")
    best = {
        "model": max(r["val_dice"] for r in rows),
        "teacher": max(r["teacher_val_dice"] for r in rows),
    }
    assert exported.scores == pytest.approx(best)
    assert exported.score == max(best.values())
    saved = load_checkpoint(tmp_path / "model.pt")
    prefix = "" if exported.source == "model" else "teacher_"
    assert f"{prefix}best-epoch{exported.epoch + 1:03d}.pt" in files  # file names 1-based
    assert saved["source"] == exported.source
    assert saved["metrics"][prefix + "val_dice"] == exported.score


def test_incomplete_window_left_out_and_export_without_top_k(tmp_path: Path) -> None:
    # 4 labelled batches per epoch, 3 per step: one step per epoch, the 4th batch left out
    recorder = StepRecorder()
    trainer = _mt_fit(tmp_path, callbacks=(recorder,), top_k=0, accumulate=3)
    assert trainer.global_step == trainer.mean_teacher.teacher.num_updates == 2
    assert recorder.batches == 6
    assert trainer._train_loader.position == 32  # the left-out batch is drawn: whole epochs
    assert trainer.mean_teacher.epoch == pytest.approx(1 + 2 / 3)  # of the 3 batches trained
    # without top-k files the models as they are after the 2 epochs compete: epoch 1 (0-based)
    assert export_best(trainer, tmp_path / "model.pt").epoch == 1


def test_a_supervised_last_pt_is_refused(tmp_path: Path) -> None:
    seed_everything(0)
    train_loader, _ = toy_loaders(ToySegmentation())
    Trainer(TinyBNNet(), bce, trainer_config(epochs=1), out_dir=tmp_path).fit(train_loader)
    with pytest.raises(CheckpointError, match="no Mean Teacher state"):
        _mt_fit(tmp_path / "mt", resume=tmp_path / "last.pt")


def test_semi_datasets_on_the_demo_root(demo_root: Path, tmp_path: Path) -> None:
    config = preset("demo", MEAN_TEACHER_PRESETS)
    config.data = DataConfig(
        siim_dir=str(demo_root / "siim"),
        cache_dir=str(tmp_path),
        size=32,
        labelled_fraction=0.25,
        labelled_seed=3,
    )
    config.unlabelled = UnlabelledConfig()
    external = select_unlabelled(nih.load(demo_root / "nih"), "pneumothorax")
    labelled, unlabelled, val = build_semi_datasets(config, external, progress=False)
    siim_rest, nih_images = unlabelled.datasets
    labels = np.concatenate([labelled.labels, siim_rest.labels])
    assert len(labels) + len(val) == 48 and not set(labelled.indices) & set(siim_rest.indices)
    for value in (0.0, 1.0):  # a quarter of each label keeps its masks
        assert (labelled.labels == value).sum() == max(1, round(0.25 * (labels == value).sum()))
    assert len(nih_images) == len(external) and all(external["label"] == 1.0)
    assert 0 < len(external) < 40
    sample = unlabelled[len(unlabelled) - 1]  # an NIH image, from its own cache
    assert sample["image"].shape == (1, 32, 32) and not sample["has_mask"]
    assert len(list(tmp_path.glob("nih-*-32.h5"))) == 1


def _recipe() -> Any:
    path = Path(__file__).parents[1] / "recipes" / "mean_teacher_nih.py"
    spec = importlib.util.spec_from_file_location("mean_teacher_nih", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_help_and_a_tiny_run(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe()
    with pytest.raises(SystemExit) as done:
        recipe.main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in ("--nih-select", "--nih-exclude", "--labelled-fraction", "--loss", "--resume"):
        assert option in text
    assert "5th place" in text and "model.pt" in text

    settings = [
        "data.size=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.batch_size=4",
        "unlabelled.batch_size=2",
        "trainer.tensorboard=false",
    ]
    argv = ["--siim-dir", str(demo_root / "siim"), "--nih-dir", str(demo_root / "nih")]
    argv += ["--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress", "--epochs", "1"]
    argv += ["--loss", "bce_cls", "--nih-select", "pneumothorax"]
    exported = recipe.main(argv + [o for s in settings for o in ("--set", s)])
    printed = capsys.readouterr().out
    assert "last epoch, student: Dice" in printed and "last epoch, teacher: Dice" in printed
    assert f"to {tmp_path / 'run' / 'model.pt'}" in printed
    run = tmp_path / "run"
    for name in ("config.yaml", "last.pt", "metrics.csv", "curves.png", "model.pt"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "teacher_best-epoch001.pt").is_file()
    assert exported.source in ("model", "teacher")
    last = load_checkpoint(run / "last.pt")
    assert last["config"]["model"]["presence_head"] is True
    assert last["config"]["loss"]["terms"] == {"bce": 1024, "presence_bce": 1}
    assert last["mean_teacher"]["teacher"]["_extra_state"]["num_updates"] == last["global_step"]

    with pytest.raises(SystemExit, match="unknown key 'mean_teacher.weight'"):
        recipe.main([*argv, "--set", "mean_teacher.weight=1"])


def train_mean_teacher_toy(out_dir: Path) -> MeanTeacherTrainer:
    """2 epochs of Mean Teacher on toy data under the current process layout: global batch 8
    labelled + 4 unlabelled, a net without BatchNorm, deterministic views (no brightness or
    noise draw, which would differ per process)."""
    context = init_distributed("cpu")
    seed_everything(0)
    layout = {"world_size": context.world_size, "rank": context.rank}
    data = DataConfig(batch_size=8, val_batch_size=4, num_workers=0)
    labelled = build_train_loader(ToySegmentation(32), data, epochs=2, seed=0, **layout)
    loader = build_two_stream_loader(
        labelled, ToySegmentation(20, seed=1), batch_size=4, seed=0, **layout
    )
    val = build_val_loader(ToySegmentation(16, seed=2), data, **layout)
    config = MeanTeacherConfig(student_brightness=0.0, rampup_epochs=0, consistency_weight=5.0)
    trainer = MeanTeacherTrainer(
        TinyNet(), bce, trainer_config(top_k=1, lr=5e-2), config, out_dir=out_dir
    )
    trainer.fit(loader, val)
    return trainer


_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_two_process_mean_teacher_matches_one_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", __file__, str(tmp_path / "ddp")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["batches"] == [[4, 2], [4, 2]]  # labelled + unlabelled images per process

    single = train_mean_teacher_toy(tmp_path / "single")
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["global_step"] == single.global_step == 8
    assert ddp["sampler"]["unlabelled_position"] == single._train_loader.position == 32
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-4, atol=1e-5)
    teacher = single.mean_teacher.teacher.state_dict()
    for key, value in teacher.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(
                ddp["mean_teacher"]["teacher"][key], value, rtol=1e-4, atol=1e-5
            )
    for key in ("val_dice", "teacher_val_dice", "teacher_val_loss", "train_consistency"):
        assert ddp["metrics"][key] == pytest.approx(single.callback_metrics[key], abs=1e-4), key


def _ddp_main(out_dir: Path) -> None:
    trainer = train_mean_teacher_toy(out_dir)
    batch = next(iter(trainer._train_loader))
    sizes = all_gather_objects([len(batch["labelled"]["image"]), len(batch["unlabelled"]["image"])])
    if trainer.is_main:
        (out_dir / "report.json").write_text(json.dumps({"batches": sizes}))
    destroy_distributed()


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
