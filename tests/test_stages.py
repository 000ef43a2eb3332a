"""Staged training: stage configs, the size and loss change at a boundary, stage k starting
from stage k − 1's best weights, resume across the boundary, and the recipe's staged runs.

The library tests use a two-convolution net on in-memory 32²/64² images; the recipe test runs
the demo root at 32² → 64².
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from test_trainer import ToySegmentation
from torch import nn

from ssl_ptx.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    TrainerConfig,
    load_config,
    preset,
)
from ssl_ptx.engine import Callback, Trainer, load_weights
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.loaders import build_train_loader, build_val_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.engine.stages import STAGES_KIND, run_stages, stage_configs
from ssl_ptx.inference import load_model
from ssl_ptx.losses import build_loss

CONFIGS = Path(__file__).parents[1] / "recipes" / "configs"


class Squares(ToySegmentation):  # its __len__ / __getitem__
    """16 images at ``size``²: a bright square with its mask on half of them, empty the rest."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(size)
        self.images = torch.rand(16, 1, size, size, generator=generator) * 0.5
        self.masks = torch.zeros(16, 1, size, size)
        for i in range(8):
            top, left = 2 + i, size // 2 - i
            self.masks[i, 0, top : top + size // 4, left : left + size // 4] = 1
        self.images += 0.5 * self.masks
        self.labels = (self.masks.flatten(1).amax(1) > 0).double().numpy()
        self.transform = None


class CrashAtStep(Callback):
    """Raises after optimiser step ``step`` (a killed run); ``last.pt`` holds step − 1 …"""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        if outputs["optimizer_stepped"] and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class Stages:
    """A ``build_and_fit`` for :func:`run_stages` with a tiny net; records every call and the
    weights each stage started from."""

    def __init__(self, crash: tuple[int, int] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.crash = crash  # (stage size, optimiser step)

    def __call__(self, config: TrainConfig, init: Path | None, resume: Path | None):
        seed_everything(config.trainer.seed)
        model = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1)
        )
        if init is not None:
            load_weights(model, init)
        self.calls.append(
            {
                "size": config.data.size,
                "init": init,
                "resume": resume,
                "start": {k: v.clone() for k, v in model.state_dict().items()},
            }
        )
        callbacks = []
        if self.crash is not None and self.crash[0] == config.data.size:
            callbacks.append(CrashAtStep(self.crash[1]))
        dataset = Squares(config.data.size)
        trainer = Trainer(
            model,
            build_loss(config.loss.build_argument()),
            config.trainer,
            out_dir=config.out_dir,
            run_config=config,
            callbacks=callbacks,
        )
        self.trainer = trainer
        return trainer.fit(
            build_train_loader(dataset, config.data, epochs=config.trainer.epochs, seed=0),
            build_val_loader(dataset, config.data),
            resume=resume,
        )


def _config(out: Path) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(size=32, batch_size=4, num_workers=0, positive_rate=0.5),
        trainer=TrainerConfig(
            epochs=2,
            device="cpu",
            lr=1e-2,
            progress=False,
            tensorboard=False,
            top_k=1,
            save_every_n_steps=1,
        ),
        out_dir=str(out),
        stages=[
            {"loss.name": "bce_dice", "data.positive_rate": 0.75},
            {"data.size": 64, "loss.name": "symmetric_lovasz", "trainer.lr": 1e-3},
        ],
    )


def test_stage_configs_are_cumulative_and_checked(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.stages.append({"trainer": {"epochs": 3}})  # nested mappings work too
    first, second, third = stage_configs(config)
    assert (first.data.size, first.loss.name, first.trainer.lr) == (32, "bce_dice", 1e-2)
    assert (second.data.size, second.loss.name, second.trainer.lr) == (64, "symmetric_lovasz", 1e-3)
    assert second.data.positive_rate == 0.75  # inherited from stage 1
    assert (third.data.size, third.trainer.epochs, third.trainer.lr) == (64, 3, 1e-3)
    assert [c.out_dir for c in (first, second, third)] == [
        str(tmp_path / f"stage-{k}") for k in (1, 2, 3)
    ]
    assert all(c.stages == [] for c in (first, second, third))

    bad = [
        ([{"data.size": 32}, {"data.sise": 64}], r"stages\[2\]: unknown key 'data.sise'"),
        ([{"trainer.lr": "fast"}], r"stages\[1\]: trainer.lr: expected float"),
        ([{"out_dir": "x"}], r"'out_dir' cannot be set per stage"),
        (["data.size=64"], r"stages\[1\]: expected a mapping"),
        ([], "declares no stages"),
    ]
    for stages, message in bad:
        with pytest.raises(ConfigError, match=message):
            stage_configs(TrainConfig(stages=stages))


def test_example_configs_load_over_both_presets() -> None:
    for name in ("demo_stages", "first_place_stages", "tenth_place_stages"):
        for base in ("demo", "full"):
            configs = stage_configs(load_config(CONFIGS / f"{name}.yaml", base=preset(base)))
            assert len(configs) >= 2
    first = stage_configs(load_config(CONFIGS / "first_place_stages.yaml", base=preset("full")))
    assert [(c.data.size, c.trainer.lr, c.data.positive_rate) for c in first] == [
        (512, 1e-4, 0.8),
        (1024, 1e-5, 0.6),
        (1024, 1e-6, 0.4),
    ]
    tenth = stage_configs(load_config(CONFIGS / "tenth_place_stages.yaml", base=preset("full")))
    assert [(c.data.size, c.loss.name, c.pseudo.dir) for c in tenth] == [
        (512, "bce_dice", None),
        (1024, "bce_dice", None),
        (1024, "soft_bce", "runs/tenth_place_soft/pseudo"),  # SIIM + soft pseudo labels
        (1024, "symmetric_lovasz", None),
    ]


def test_two_stages_change_size_and_loss_and_chain_best_weights(tmp_path: Path) -> None:
    stages = Stages()
    results = run_stages(_config(tmp_path), stages)
    assert [call["size"] for call in stages.calls] == [32, 64]

    # the boundary, as the stages' checkpoints and metrics record it
    for k, (size, loss) in enumerate([(32, "bce_dice"), (64, "symmetric_lovasz")], start=1):
        stored = load_checkpoint(tmp_path / f"stage-{k}" / "last.pt")["config"]
        assert (stored["data"]["size"], stored["loss"]["name"]) == (size, loss)
        assert len(read_metrics_csv(tmp_path / f"stage-{k}" / "metrics.csv")) == 2
    assert load_config(tmp_path / "config.yaml").stages == _config(tmp_path).stages

    # stage 2 started from stage 1's best weights (not its last), with a fresh optimiser
    best = results[0].best_checkpoint
    assert stages.calls[1]["init"] == best and stages.calls[0]["init"] is None
    best_weights = load_checkpoint(best)["model"]
    for key, value in stages.calls[1]["start"].items():
        assert torch.equal(value, best_weights[key])
    # the same number of steps per stage, counted afresh, and a fresh Adam state
    assert results[1].global_step == results[0].global_step > 0
    adam = load_checkpoint(tmp_path / "stage-2" / "last.pt")["optimizer"]["state"][0]
    assert int(adam["step"]) == results[1].global_step
    record = load_checkpoint(tmp_path / "last.pt", required=("kind", "done"))
    assert record["kind"] == STAGES_KIND and len(record["done"]) == 2


def test_killed_in_stage_two_resumes_there_to_the_same_weights(tmp_path: Path) -> None:
    straight = Stages()
    run_stages(_config(tmp_path / "straight"), straight)

    killed = Stages(crash=(64, 3))  # stage 2, after its 3rd optimiser step
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stages(_config(tmp_path / "split"), killed)
    record = load_checkpoint(tmp_path / "split" / "last.pt", required=("done",))
    assert len(record["done"]) == 1  # stage 1 finished, stage 2 not
    stage_two_last = tmp_path / "split" / "stage-2" / "last.pt"
    assert load_checkpoint(stage_two_last)["global_step"] == 2
    stage_one_metrics = (tmp_path / "split" / "stage-1" / "metrics.csv").read_bytes()

    resumed = Stages()
    results = run_stages(_config(tmp_path / "split"), resumed, resume=True)
    assert [(c["size"], c["resume"]) for c in resumed.calls] == [(64, stage_two_last)]
    assert (tmp_path / "split" / "stage-1" / "metrics.csv").read_bytes() == stage_one_metrics
    assert results[0].best_checkpoint.is_relative_to(tmp_path / "split" / "stage-1")
    for key, value in straight.trainer.model.state_dict().items():
        assert torch.equal(value, resumed.trainer.model.state_dict()[key]), key

    # everything finished: resuming again trains nothing
    again = Stages()
    assert len(run_stages(_config(tmp_path / "split"), again, resume=True)) == 2
    assert again.calls == []


def _recipe() -> Any:
    path = Path(__file__).parents[1] / "recipes" / "train_supervised.py"
    spec = importlib.util.spec_from_file_location("train_supervised", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_runs_stages_and_resumes_without_redoing_them(
    demo_root: Path, tmp_path: Path
) -> None:
    config_file = tmp_path / "stages.yaml"
    config_file.write_text(
        "stages:\n"
        "  - {data.size: 32, loss.name: bce_dice}\n"
        "  - {data.size: 64, loss.name: symmetric_lovasz, trainer.lr: 1.0e-4}\n"
    )
    out = tmp_path / "run"
    common = ["--siim-dir", str(demo_root / "siim"), "--out", str(out), "--device", "cpu"]
    small = [
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        "data.batch_size=8",
        "model.arch=fpn",
        "model.options={decoder_pyramid_channels: 32, decoder_segmentation_channels: 32}",
    ]
    sets = [option for value in small for option in ("--set", value)]
    recipe = _recipe()
    result = recipe.main(
        [*common, *sets, "--config", str(config_file), "--epochs", "1", "--no-progress"]
    )
    for k, (size, loss) in enumerate([(32, "bce_dice"), (64, "symmetric_lovasz")], start=1):
        saved = load_config(out / f"stage-{k}" / "config.yaml")
        assert (saved.data.size, saved.loss.name, saved.model.arch) == (size, loss, "fpn")
        assert len(read_metrics_csv(out / f"stage-{k}" / "metrics.csv")) == 1
    assert result.best_checkpoint.is_relative_to(out / "stage-2")
    model, info = load_model(result.best_checkpoint)
    assert type(model).__name__ == "FPN" and info["config"]["data"]["size"] == 64

    # --resume alone reads the staged config from OUT/last.pt; finished stages are kept
    metrics = (out / "stage-2" / "metrics.csv").read_bytes()
    again = recipe.main([*common, "--resume", "--no-progress"])
    assert again.best_checkpoint == result.best_checkpoint
    assert (out / "stage-2" / "metrics.csv").read_bytes() == metrics

    config_file.write_text("stages:\n  - {data.size: 32, loss.nam: bce}\n")
    with pytest.raises(SystemExit, match=r"stages\[1\]: unknown key 'loss.nam'"):
        recipe.main([*common, "--config", str(config_file)])
