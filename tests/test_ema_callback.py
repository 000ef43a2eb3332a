"""EMACallback in the Trainer: updates per optimiser step, per-epoch schedules, EMA metrics and
checkpoints, exact resume; the supervised recipe's --ema.

Toy data and nets come from tests/test_trainer.py; :class:`TinyBNNet` adds a BatchNorm so that
averaged running statistics are covered too.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import (
    CrashAtStep,
    StopAfterEpoch,
    ToySegmentation,
    assert_same_state,
    bce,
    toy_loaders,
    trainer_config,
)
from torch import nn

from ssl_ptx.config import EMAConfig, preset
from ssl_ptx.engine import Callback, EMACallback, Trainer, build_ema_callback, export_best
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.ema_callback import ema_decay_schedule
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything


class TinyBNNet(nn.Module):
    """conv → BatchNorm → ReLU → conv: [B, 1, H, W] → logits [B, 1, H, W]."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class StepRecorder(Callback):
    """Copies of the model's state at fit start and after every optimiser step, and the
    number of micro-batches."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.batches = 0

    def on_fit_start(self, trainer: Trainer) -> None:
        self.states.append(_copy(trainer.model))

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if outputs["optimizer_stepped"]:
            self.states.append(_copy(trainer.model))


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fit(out: Path, callbacks: list[Callback], resume: Path | None = None, **config: Any):
    seed_everything(0)
    train_loader, val_loader = toy_loaders(ToySegmentation())
    trainer = Trainer(TinyBNNet(), bce, trainer_config(**config), out_dir=out, callbacks=callbacks)
    result = trainer.fit(train_loader, val_loader, resume=resume)
    return trainer, result, val_loader


def test_ema_updates_once_per_optimizer_step(tmp_path: Path) -> None:
    recorder, ema = StepRecorder(), EMACallback(0.9)
    trainer, _, _ = _fit(tmp_path, [recorder, ema], accumulate=2)
    # 32 images in batches of 8 = 4 micro-batches per epoch, 2 per step, 2 epochs
    assert recorder.batches == 8 and trainer.global_step == 4
    assert ema.ema.num_updates == 4
    reference = recorder.states[0]
    for state in recorder.states[1:]:
        reference = {
            k: 0.9 * reference[k] + 0.1 * v if v.is_floating_point() else v
            for k, v in state.items()
        }
    for key, value in ema.ema.module.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_named_schedules() -> None:
    assert ema_decay_schedule("constant", 0.99) is None
    third = ema_decay_schedule("third_place", 0.99, copy_epochs=6)
    assert [third(e) for e in (0, 5, 6, 19)] == [0.0, 0.0, 0.99, 0.99]
    fifth = ema_decay_schedule("fifth_place", 0.3)
    assert [fifth(e) for e in (0, 4, 5, 9, 10, 19, 20)] == [0.5, 0.5, 0.9, 0.9, 0.99, 0.99, 0.999]
    with pytest.raises(ValueError, match="unknown EMA schedule"):
        ema_decay_schedule("linear", 0.9)
    with pytest.raises(ValueError, match="'average' or 'copy'"):
        EMACallback(0.9, buffers="own")


class EMAEqualsModelAtEpochEnd(Callback):
    """Records, per epoch, whether the EMA equals the model and the EMA's decay."""

    def __init__(self, ema: EMACallback) -> None:
        self.ema = ema
        self.equal: list[bool] = []
        self.decays: list[float] = []

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        model, averaged = trainer.model.state_dict(), self.ema.ema.module.state_dict()
        self.equal.append(all(torch.equal(model[k], averaged[k]) for k in model))
        self.decays.append(self.ema.ema.decay)


def test_third_place_schedule_copies_then_averages(tmp_path: Path) -> None:
    ema = EMACallback(0.99, schedule="third_place", copy_epochs=1)
    probe = EMAEqualsModelAtEpochEnd(ema)
    _fit(tmp_path, [ema, probe])
    assert probe.equal == [True, False]
    assert probe.decays == [0.0, 0.99]


def test_ema_metrics_and_checkpoints(tmp_path: Path) -> None:
    ema = EMACallback(0.5, top_k=2)
    trainer, result, val_loader = _fit(tmp_path, [ema], top_k=1, monitor="ema_val_dice")
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [row["epoch"] for row in rows] == [0, 1]
    for key in ("ema_val_dice", "ema_val_dice_pos", "ema_val_fp_rate", "ema_val_loss"):
        assert key in rows[-1], key
    assert "ema_val_images" not in rows[-1]  # model-free metrics are not repeated
    final = trainer.evaluate(val_loader, ema.ema.module)
    assert rows[-1]["ema_val_loss"] == pytest.approx(final["val_loss"])
    assert rows[-1]["ema_val_loss"] != pytest.approx(rows[-1]["val_loss"])  # another model

    # the EMA's own best files hold its weights; the trained model's are ranked by the EMA
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("ema_best-*")) == [
        "ema_best-epoch001.pt",
        "ema_best-epoch002.pt",
    ]
    saved = load_checkpoint(checkpoints / "ema_best-epoch002.pt")
    assert saved["source"] == "ema" and saved["epoch"] == 1  # file names 1-based, epoch not
    assert_same_state(saved["model"], ema.ema.module.state_dict())
    best = load_checkpoint(result.best_checkpoint)
    assert best["source"] == "model" and result.best_checkpoint.name.startswith("best-epoch")
    assert result.best_score == max(row["ema_val_dice"] for row in rows)
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_resume_mid_epoch_restores_the_ema_exactly(tmp_path: Path) -> None:
    def callbacks() -> list[Callback]:
        return [EMACallback(0.9, schedule="third_place", copy_epochs=1, warmup="mean_teacher")]

    settings = {"save_every_n_steps": 1, "top_k": 0}
    straight, _, _ = _fit(tmp_path / "straight", callbacks(), **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "split", [*callbacks(), CrashAtStep(7)], **settings)
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["epoch"], saved["batches_done"], saved["global_step"]) == (1, 2, 6)
    resumed, _, _ = _fit(
        tmp_path / "split", callbacks(), resume=tmp_path / "split" / "last.pt", **settings
    )
    a, b = straight.callbacks[-1].ema, resumed.callbacks[-1].ema
    assert (a.num_updates, a.decay) == (b.num_updates, b.decay) == (8, 0.9)
    assert_same_state(a.module.state_dict(), b.module.state_dict())
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())


def test_stop_and_resume_at_epoch_end_keeps_the_ema_top_k(tmp_path: Path) -> None:
    _fit(tmp_path, [EMACallback(0.9, top_k=1), StopAfterEpoch(0)])
    ema = EMACallback(0.9, top_k=1)
    _fit(tmp_path, [ema], resume=tmp_path / "last.pt")
    assert ema.top_k is not None and len(ema.top_k.best) == 1
    assert ema.ema.num_updates == 8


def test_export_without_top_k_files_names_the_last_epoch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # without top-k files the models compete as they are after fit, when trainer.epoch
    # already counts the next epoch: the weights are those of the last one (0-based 1)
    trainer, _, _ = _fit(tmp_path, [EMACallback(0.5)], top_k=0)
    assert (trainer.epoch, trainer.weights_epoch) == (2, 1)
    with caplog.at_level(logging.INFO, logger="ssl_ptx.engine.ema_callback"):
        exported = export_best(trainer, tmp_path / "model.pt")
    assert exported.epoch == load_checkpoint(tmp_path / "model.pt")["epoch"] == 1
    assert f"(epoch 2, val_dice {exported.score:.4f})" in caplog.text
    assert set(exported.scores) == {"model", "ema"}

    # the same from a finished run's last.pt (which stores the next epoch, 2)
    resumed, _, _ = _fit(tmp_path, [EMACallback(0.5)], resume=trainer.last_path, top_k=0)
    assert resumed.weights_epoch == 1
    again = export_best(resumed, tmp_path / "again.pt")
    assert (again.source, again.epoch, again.score) == (
        exported.source,
        exported.epoch,
        exported.score,
    )


def test_build_ema_callback_from_config() -> None:
    assert build_ema_callback(EMAConfig()) is None
    callback = build_ema_callback(EMAConfig(decay=0.99, schedule="third_place"), default_top_k=3)
    assert callback.k == 3 and callback.schedule(5) == 0.0 and callback.schedule(6) == 0.99
    full = preset("full")  # the 3rd place: EMA 0.99 after 6 copied epochs, ranked by the EMA
    assert (full.ema.decay, full.ema.schedule, full.ema.copy_epochs) == (0.99, "third_place", 6)
    assert full.trainer.monitor == "ema_val_dice"
    assert not preset("demo").ema.enabled


def _supervised_recipe() -> Any:
    path = Path(__file__).parents[1] / "recipes" / "train_supervised.py"
    spec = importlib.util.spec_from_file_location("train_supervised", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_supervised_recipe_with_ema(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = [
        "data.size=32",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "trainer.tensorboard=false",
        "ema.schedule=third_place",
    ]
    argv = ["--siim-dir", str(demo_root / "siim"), "--out", str(tmp_path / "run")]
    argv += ["--device", "cpu", "--no-progress", "--epochs", "1", "--ema"]
    _supervised_recipe().main(argv + [o for s in settings for o in ("--set", s)])
    assert "EMA, last epoch: Dice" in capsys.readouterr().out
    row = read_metrics_csv(tmp_path / "run" / "metrics.csv")[-1]
    assert {"ema_val_dice", "ema_val_dice_pos", "ema_val_fp_rate"} <= set(row)
    assert (tmp_path / "run" / "checkpoints" / "ema_best-epoch001.pt").is_file()
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    ema_state = last["callbacks"]["EMACallback[ema_]"]["ema"]
    assert ema_state["_extra_state"]["decay"] == 0.0  # third_place: epoch 1 is a copy
    assert last["config"]["ema"]["decay"] == 0.99
