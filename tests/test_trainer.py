"""Trainer: learning on demo data, exact resume, accumulation, AMP, non-finite losses,
validation metrics, callbacks, top-k checkpoints and schedules.

Models here are tiny convolution nets without BatchNorm (tests/test_ddp.py reuses them), data
are 32²–64² images, and loading is in the main process (``num_workers=0``) unless a test says
otherwise.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_ptx.config import DataConfig, TrainerConfig, load_config
from ssl_ptx.engine import Callback, CheckpointError, NonFiniteLossError, TopKCheckpoint, Trainer
from ssl_ptx.engine.checkpoint import load_checkpoint, save_checkpoint
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.loaders import build_train_loader, build_val_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.engine.trainer import build_scheduler
from ssl_ptx.metrics import dice_breakdown


class TinyNet(nn.Module):
    """Two 3×3 convolutions, no normalisation layer: [B, 1, H, W] → logits [B, 1, H, W]."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 1, 3, padding=1)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)


class ToySegmentation(Dataset):
    """In-memory samples shaped like SegmentationDataset's: the mask is ``image > 0.7`` on the
    first half of the images and empty on the second half."""

    def __init__(self, n: int = 32, size: int = 32, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, size, size, generator=generator)
        self.masks = (self.images > 0.7).float()
        self.masks[n // 2 :] = 0
        self.labels = (self.masks.flatten(1).amax(1) > 0).double().numpy()
        self.transform = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {
            "image": self.images[index],
            "mask": self.masks[index],
            "label": torch.tensor(float(self.labels[index])),
            "has_mask": torch.tensor(True),
            "image_id": f"toy{index}",
            "index": index,
        }


def bce(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(outputs, targets)


def trainer_config(**changes: Any) -> TrainerConfig:
    """CPU, no progress bars, no TensorBoard; Adam 1e-2."""
    values = {
        "epochs": 2,
        "device": "cpu",
        "lr": 1e-2,
        "progress": False,
        "tensorboard": False,
        "top_k": 0,
    }
    values.update(changes)
    return TrainerConfig(**values)


def toy_loaders(
    dataset: Dataset, batch_size: int = 8, epochs: int = 2, **data: Any
) -> tuple[Any, Any]:
    config = DataConfig(batch_size=batch_size, num_workers=0, **data)
    return (
        build_train_loader(dataset, config, epochs=epochs, seed=0),
        build_val_loader(dataset, config),
    )


@pytest.fixture(scope="module")
def demo_datasets(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Fold 0 of the session demo root at 64², cached, with the "light" augmentation."""
    config = DataConfig(
        siim_dir=str(demo_root / "siim"),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        size=64,
        augment="light",
    )
    train, val, _ = build_siim_datasets(config, in_channels=1, progress=False)
    return train, val


def demo_loaders(datasets: tuple, *, batch_size: int = 4, num_workers: int = 0, epochs: int = 2):
    config = DataConfig(batch_size=batch_size, num_workers=num_workers, positive_rate=0.5)
    train, val = datasets
    return (
        build_train_loader(train, config, epochs=epochs, seed=0),
        build_val_loader(val, config),
    )


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if trainer.epoch == self.epoch:
            trainer.should_stop = True


class CrashAtStep(Callback):
    """Raises after optimiser step ``step`` to simulate a killed run; records on_exception."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.seen: list[BaseException] = []

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        if outputs["optimizer_stepped"] and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self.seen.append(exception)


class BatchCounter(Callback):
    """A stateful callback: counts micro-batches across resumes."""

    def __init__(self) -> None:
        self.count = 0

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = state["count"]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_few_epochs_reduce_loss_on_demo_data(demo_datasets: tuple, tmp_path: Path) -> None:
    seed_everything(0)
    train_loader, val_loader = demo_loaders(demo_datasets, epochs=3)
    trainer = Trainer(TinyNet(), bce, trainer_config(epochs=3), out_dir=tmp_path)
    before = trainer.evaluate(val_loader)["val_loss"]
    result = trainer.fit(train_loader, val_loader)
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    assert result.metrics["val_loss"] < 0.5 * before
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert result.metrics["val_images"] == len(demo_datasets[1])
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def _demo_run(
    datasets: tuple,
    out: Path,
    *,
    callbacks: Sequence[Callback] = (),
    resume: Path | None = None,
    num_workers: int = 0,
    batch_size: int = 4,
    **config: Any,
) -> Trainer:
    seed_everything(0)
    train_loader, val_loader = demo_loaders(
        datasets, batch_size=batch_size, num_workers=num_workers
    )
    trainer = Trainer(
        TinyNet(),
        bce,
        trainer_config(scheduler="cosine", warmup_epochs=0.5, clip_grad_norm=1.0, **config),
        out_dir=out,
        callbacks=[BatchCounter(), *callbacks],
    )
    trainer.fit(train_loader, val_loader, resume=resume)
    return trainer


def test_resume_at_epoch_end_reaches_same_weights(demo_datasets: tuple, tmp_path: Path) -> None:
    straight = _demo_run(demo_datasets, tmp_path / "straight")
    _demo_run(demo_datasets, tmp_path / "split", callbacks=[StopAfterEpoch(0)])
    assert load_checkpoint(tmp_path / "split" / "last.pt")["epoch"] == 1
    resumed = _demo_run(demo_datasets, tmp_path / "split", resume=tmp_path / "split" / "last.pt")

    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert (
        resumed.optimizer.state_dict()["state"].keys()
        == straight.optimizer.state_dict()["state"].keys()
    )
    for key, state in straight.optimizer.state_dict()["state"].items():
        assert_same_state(state, resumed.optimizer.state_dict()["state"][key])
    assert resumed.lr == straight.lr and resumed.global_step == straight.global_step
    assert resumed.callbacks[-1].count == straight.callbacks[-1].count  # callback state restored
    rows = read_metrics_csv(tmp_path / "split" / "metrics.csv")
    straight_rows = read_metrics_csv(tmp_path / "straight" / "metrics.csv")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert [r["val_dice"] for r in rows] == [r["val_dice"] for r in straight_rows]


def test_resume_mid_epoch_with_accumulation_and_workers(
    demo_datasets: tuple, tmp_path: Path
) -> None:
    # 16 images per epoch in batches of 2: 8 batches, 4 optimiser steps per epoch
    settings = {"accumulate": 2, "save_every_n_steps": 1, "num_workers": 1, "batch_size": 2}
    straight = _demo_run(demo_datasets, tmp_path / "straight", **settings)
    assert straight.global_step == 8
    crash = CrashAtStep(7)  # last.pt holds step 6: epoch 1, batch 4
    with pytest.raises(RuntimeError, match="simulated crash"):
        _demo_run(demo_datasets, tmp_path / "split", callbacks=[crash], **settings)
    assert [str(e) for e in crash.seen] == ["simulated crash"]
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["epoch"], saved["batches_done"], saved["global_step"]) == (1, 4, 6)

    resumed = _demo_run(
        demo_datasets, tmp_path / "split", resume=tmp_path / "split" / "last.pt", **settings
    )
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert resumed.global_step == straight.global_step
    last_rows = [
        read_metrics_csv(p / "metrics.csv")[-1] for p in (tmp_path / "straight", tmp_path / "split")
    ]
    assert last_rows[0]["train_loss"] == pytest.approx(last_rows[1]["train_loss"], rel=1e-12)


def test_corrupt_or_weights_only_checkpoint_is_refused(
    demo_datasets: tuple, tmp_path: Path
) -> None:
    trainer = _demo_run(demo_datasets, tmp_path, epochs=1, top_k=1)
    last = trainer.last_path
    data = last.read_bytes()
    last.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{last}: cannot read this checkpoint"):
        _demo_run(demo_datasets, tmp_path, resume=last)
    best = trainer.top_k.best_path
    with pytest.raises(CheckpointError, match="holds model weights only"):
        _demo_run(demo_datasets, tmp_path, resume=best)


def test_accumulation_matches_the_larger_batch(tmp_path: Path) -> None:
    weights = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        seed_everything(0)
        train_loader, _ = toy_loaders(ToySegmentation(), batch_size=batch_size)
        config = trainer_config(optimizer="sgd", lr=0.5, momentum=0.0, accumulate=accumulate)
        trainer = Trainer(TinyNet(), bce, config, out_dir=tmp_path / str(batch_size))
        result = trainer.fit(train_loader)
        assert result.global_step == 8  # 32 images / 8 per step × 2 epochs
        weights.append(trainer.model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6)


def test_incomplete_accumulation_window_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset = ToySegmentation(n=10)
    settings = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "scheduler": "cosine"}
    config = trainer_config(epochs=1, accumulate=2, **settings)
    runs = {}
    for images in (10, 8):  # 5 and 4 micro-batches of 2, in order
        seed_everything(0)
        loader = DataLoader(Subset(dataset, range(images)), batch_size=2)
        counter = BatchCounter()
        run_config = trainer_config(epochs=1, accumulate=2, progress=images == 10, **settings)
        trainer = Trainer(
            TinyNet(), bce, run_config, out_dir=tmp_path / str(images), callbacks=[counter]
        )
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ssl_ptx.engine.trainer"):
            result = trainer.fit(loader)
        runs[images] = trainer, result, counter.count, caplog.text
    five, four = runs[10], runs[8]
    assert five[1].global_step == four[1].global_step == 2
    assert five[2] == four[2] == 4  # the 5th micro-batch is neither computed nor stepped
    assert_same_state(five[0].model.state_dict(), four[0].model.state_dict())
    assert five[1].metrics["train_loss"] == four[1].metrics["train_loss"]  # over 8 images
    assert five[0].scheduler.last_epoch == 2 and five[0].lr == 0.0  # cosine ends at min_lr
    assert five[3].count("left out") == 1 and "1 of 5 in epoch 1" in five[3]
    assert "left out" not in four[3]
    bar = capsys.readouterr().err  # the progress bar counts the micro-batches computed
    assert "0/4" in bar and "/5" not in bar

    seed_everything(0)
    one_batch = DataLoader(Subset(dataset, range(2)), batch_size=2)
    trainer = Trainer(TinyNet(), bce, config, out_dir=tmp_path / "short")
    with pytest.raises(ValueError, match="1 micro-batch.*fewer than trainer.accumulate=2"):
        trainer.fit(one_batch)


def _odd_window_run(out: Path, callbacks: Sequence[Callback] = (), **fit: Any) -> Trainer:
    """2 epochs of 5 shuffled micro-batches of 2, accumulate 2, cosine, last.pt every step."""
    seed_everything(0)
    train_loader, _ = toy_loaders(ToySegmentation(n=10), batch_size=2)
    config = trainer_config(accumulate=2, scheduler="cosine", save_every_n_steps=1)
    trainer = Trainer(TinyNet(), bce, config, out_dir=out, callbacks=[BatchCounter(), *callbacks])
    trainer.fit(train_loader, **fit)
    return trainer


def test_resume_mid_epoch_with_an_incomplete_window(tmp_path: Path) -> None:
    straight = _odd_window_run(tmp_path / "straight")
    assert straight.global_step == 4 and straight.callbacks[-1].count == 8
    with pytest.raises(RuntimeError, match="simulated crash"):
        _odd_window_run(tmp_path / "split", [CrashAtStep(4)])
    saved = load_checkpoint(tmp_path / "split" / "last.pt")
    assert (saved["epoch"], saved["batches_done"], saved["global_step"]) == (1, 2, 3)
    resumed = _odd_window_run(tmp_path / "split", resume=tmp_path / "split" / "last.pt")
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    assert resumed.global_step == resumed.scheduler.last_epoch == 4
    assert resumed.callbacks[-1].count == 8 and resumed.lr == straight.lr == 0.0


class NaNLoss:
    """BCE, except NaN on the calls listed (0-based), or on every call."""

    def __init__(self, calls: set[int] | None = None) -> None:
        self.calls, self.count = calls, 0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = bce(outputs, targets)
        if self.calls is None or self.count in self.calls:
            loss = loss * math.nan
        self.count += 1
        return loss


def test_nonfinite_loss_skips_its_step(tmp_path: Path) -> None:
    seed_everything(0)
    train_loader, _ = toy_loaders(ToySegmentation())
    trainer = Trainer(TinyNet(), NaNLoss({2}), trainer_config(epochs=1), out_dir=tmp_path)
    result = trainer.fit(train_loader)
    assert result.global_step == 3  # 4 batches, one step skipped
    assert result.metrics["train_nonfinite"] == 1
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_repeated_nonfinite_losses_stop_resumably(tmp_path: Path) -> None:
    seed_everything(0)
    train_loader, _ = toy_loaders(ToySegmentation())
    initial = {k: v.clone() for k, v in TinyNet().state_dict().items()}
    seed_everything(0)
    trainer = Trainer(TinyNet(), NaNLoss(), trainer_config(max_nonfinite=3), out_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="3 non-finite losses in a row") as caught:
        trainer.fit(train_loader)
    assert str(trainer.last_path) in str(caught.value)
    assert_same_state(trainer.model.state_dict(), initial)  # no step was taken

    seed_everything(0)
    train_loader, _ = toy_loaders(ToySegmentation())
    resumed = Trainer(TinyNet(), bce, trainer_config(), out_dir=tmp_path)
    result = resumed.fit(train_loader, resume=trainer.last_path)
    assert result.global_step == 5  # the 1 batch left of epoch 1, then 4
    assert result.metrics["epoch"] == 1


class ThresholdNet(nn.Module):
    """Logits 20·(image − 0.7): predicts exactly the pixels above 0.7."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 20.0 * (images - 0.7) + 0.0 * self.unused


def test_validation_metrics_equal_the_competition_breakdown(tmp_path: Path) -> None:
    dataset = ToySegmentation(n=30)
    dataset.images[22:] *= 0.5  # 8 negatives with nothing above 0.7: no false positive
    _, val_loader = toy_loaders(dataset, batch_size=7)  # last batch shorter
    trainer = Trainer(ThresholdNet(), bce, trainer_config(threshold=0.5), out_dir=tmp_path)
    metrics = trainer.evaluate(val_loader)

    expected = dice_breakdown(dataset.images > 0.7, dataset.masks)
    assert metrics["val_dice"] == pytest.approx(expected["dice"])
    assert metrics["val_dice_pos"] == pytest.approx(expected["dice_positive"]) == 1.0
    assert metrics["val_fp_rate"] == pytest.approx(expected["false_positive_rate"]) == 7 / 15
    assert metrics["val_all_empty_dice"] == pytest.approx(15 / 30)
    assert metrics["val_images"] == 30
    assert metrics["val_dice"] == pytest.approx((15 + 8) / 30)


class EventRecorder(Callback):
    EVENTS = (
        "on_fit_start",
        "on_train_epoch_start",
        "on_before_optimizer_step",
        "on_train_epoch_end",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_save_checkpoint",
        "on_fit_end",
    )

    def __init__(self) -> None:
        self.events: list[str] = []
        for name in self.EVENTS:
            setattr(self, name, self._recorder(name))

    def _recorder(self, name: str):
        def record(trainer: Trainer, *args: Any) -> None:
            self.events.append(name)
            if name == "on_save_checkpoint":
                args[0]["note"] = "added by a callback"

        return record

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        self.events.append(f"batch_end {batch_idx} stepped={outputs['optimizer_stepped']}")


def test_callback_events_in_order(tmp_path: Path) -> None:
    train_loader, val_loader = toy_loaders(ToySegmentation(n=16), batch_size=8)
    recorder = EventRecorder()
    config = trainer_config(epochs=1, accumulate=2)
    trainer = Trainer(TinyNet(), bce, config, out_dir=tmp_path, callbacks=[recorder])
    trainer.fit(train_loader, val_loader)
    assert recorder.events == [
        "on_fit_start",
        "on_train_epoch_start",
        "batch_end 0 stepped=False",
        "on_before_optimizer_step",
        "batch_end 1 stepped=True",
        "on_validation_epoch_start",
        "on_validation_epoch_end",
        "on_train_epoch_end",
        "on_save_checkpoint",
        "on_fit_end",
    ]
    assert load_checkpoint(trainer.last_path)["note"] == "added by a callback"


class ScriptedScore(Callback):
    def __init__(self, scores: Sequence[float]) -> None:
        self.scores = scores

    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        trainer.callback_metrics["score"] = self.scores[trainer.epoch]


def test_top_k_keeps_the_best_files(tmp_path: Path) -> None:
    train_loader, val_loader = toy_loaders(ToySegmentation(n=8), batch_size=8, epochs=4)
    top = TopKCheckpoint(tmp_path / "ckpt", k=2, monitor="score")
    callbacks = [ScriptedScore([0.3, 0.5, 0.4, 0.5]), top]
    trainer = Trainer(
        TinyNet(), bce, trainer_config(epochs=4), out_dir=tmp_path, callbacks=callbacks
    )
    trainer.fit(train_loader, val_loader)
    # file names count epochs as the log does (1-based); the stored epoch is 0-based
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "best-epoch002.pt",
        "best-epoch004.pt",
    ]
    assert top.best_path == tmp_path / "ckpt" / "best-epoch002.pt"  # a tie keeps the earlier
    assert [entry["epoch"] for entry in top.best] == [1, 3]
    stored = load_checkpoint(top.best_path)
    assert stored["kind"] == "weights" and stored["epoch"] == 1
    assert stored["metrics"]["score"] == 0.5


def test_mixed_precision_on_cpu(tmp_path: Path) -> None:
    seen: list[torch.dtype] = []
    net = TinyNet()
    net.body[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    train_loader, _ = toy_loaders(ToySegmentation(n=16))
    trainer = Trainer(net, bce, trainer_config(epochs=1, amp="bf16"), out_dir=tmp_path / "bf16")
    result = trainer.fit(train_loader)
    assert trainer.scaler is None and torch.bfloat16 in seen
    assert math.isfinite(result.metrics["train_loss"])

    fp16 = trainer_config(epochs=1, amp="fp16")
    trainer = Trainer(TinyNet(), bce, fp16, out_dir=tmp_path / "fp16")
    trainer.fit(train_loader)
    saved = load_checkpoint(trainer.last_path)
    assert saved["scaler"]["scale"] == trainer.scaler.get_scale() > 1.0
    saved["scaler"]["scale"] = 123.0
    save_checkpoint(saved, trainer.last_path)
    again = Trainer(TinyNet(), bce, fp16, out_dir=tmp_path / "fp16")
    again.fit(train_loader, resume=trainer.last_path)  # nothing left to train: state only
    assert again.scaler.get_scale() == 123.0


def _lrs(config: TrainerConfig, steps_per_epoch: Sequence[int]) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch)
    lrs = []
    for _ in range(sum(steps_per_epoch)):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedules() -> None:
    cosine = _lrs(
        TrainerConfig(lr=1.0, scheduler="cosine", warmup_epochs=1, min_lr=0.1, epochs=4),
        [4, 4, 4, 4],
    )
    assert cosine[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert cosine[4] == pytest.approx(1.0)
    assert np.all(np.diff(cosine[4:]) < 0)
    assert cosine[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))

    constant = _lrs(TrainerConfig(lr=0.5, warmup_epochs=0.5, epochs=2), [4, 4])
    assert constant == pytest.approx([0.25, 0.5] + [0.5] * 6)

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    config = TrainerConfig(lr=1.0, scheduler="plateau", plateau_patience=1, plateau_factor=0.5)
    plateau = build_scheduler(optimizer, config, [1])
    for score in (0.5, 0.6, 0.6, 0.6):
        plateau.step(score)
    assert optimizer.param_groups[0]["lr"] == 0.5


def _recipe() -> Any:
    path = Path(__file__).parents[1] / "recipes" / "train_supervised.py"
    spec = importlib.util.spec_from_file_location("train_supervised", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_trains_and_resumes(
    demo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe()
    common = [
        "--siim-dir",
        str(demo_root / "siim"),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
        "--no-progress",
    ]
    small = ["data.size=64", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0"]
    sets = [option for value in small for option in ("--set", value)]
    first = recipe.main([*common, *sets, "--epochs", "1"])
    assert first.epochs == 1 and first.best_checkpoint is not None
    printed = capsys.readouterr().out
    assert "last epoch (1): Dice" in printed and "positive images" in printed
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.data.size, saved.trainer.epochs, saved.model.encoder_name) == (64, 1, "resnet18")

    # --resume alone continues OUT/last.pt with the stored config; --epochs extends the run
    second = recipe.main([*common, "--resume", "--epochs", "2"])
    assert second.epochs == 2 and second.global_step == 2 * first.global_step
    rows = read_metrics_csv(tmp_path / "run" / "metrics.csv")
    assert [row["epoch"] for row in rows] == [0, 1]

    with pytest.raises(SystemExit, match="unknown key 'trainer.lrr'"):
        recipe.main([*common, "--set", "trainer.lrr=1"])
