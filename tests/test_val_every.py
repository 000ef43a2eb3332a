"""``trainer.val_every``: validation (and everything that follows it) every N epochs and after
the last, the training itself unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_trainer import TinyNet, ToySegmentation, bce, toy_loaders, trainer_config

from ssl_ptx.config import ConfigError, TrainerConfig
from ssl_ptx.engine import EMACallback, Trainer
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.engine.rng import seed_everything


def _fit(out: Path, val_every: int, epochs: int = 5) -> Trainer:
    seed_everything(0)
    train, val = toy_loaders(ToySegmentation(16), epochs=epochs)
    config = trainer_config(epochs=epochs, val_every=val_every, top_k=2)
    trainer = Trainer(TinyNet(), bce, config, out_dir=out, callbacks=[EMACallback(0.9)])
    trainer.fit(train, val)
    return trainer


def test_validates_every_n_epochs_and_the_last(tmp_path: Path) -> None:
    every, sparse = _fit(tmp_path / "every", 1), _fit(tmp_path / "sparse", 2)
    rows = read_metrics_csv(tmp_path / "sparse" / "metrics.csv")
    assert len(rows) == 5
    validated = [int(row["epoch"]) for row in rows if not math.isnan(row["val_dice"])]
    assert validated == [1, 3, 4]  # epochs 2 and 4 (1-based), and the last
    assert [int(r["epoch"]) for r in rows if not math.isnan(r["ema_val_dice"])] == validated
    # validation does not change the training: the same weights, the same last-epoch scores
    for name, value in every.model.state_dict().items():
        assert torch.equal(value, sparse.model.state_dict()[name]), name
    dense_last = read_metrics_csv(tmp_path / "every" / "metrics.csv")[-1]
    for key in ("val_dice", "val_loss", "ema_val_dice", "train_loss"):
        assert rows[-1][key] == pytest.approx(dense_last[key]), key
    # top-k ranks the validated epochs only (file names say the 1-based or 0-based epoch:
    # either way they name validated epochs)
    ranked = sorted(p.name for p in (tmp_path / "sparse" / "checkpoints").glob("best-*.pt"))
    assert len(ranked) == 2
    numbers = {int(name.split("epoch")[1].split(".")[0]) for name in ranked}
    assert numbers <= {1, 3, 4} or numbers <= {2, 4, 5}
    assert sparse.validates(4) and not sparse.validates(0) and sparse.validates(1)


def test_val_every_is_checked() -> None:
    with pytest.raises(ConfigError, match="trainer.val_every"):
        TrainerConfig(val_every=0)
    with pytest.raises(ConfigError, match="plateau"):
        TrainerConfig(val_every=2, scheduler="plateau")
