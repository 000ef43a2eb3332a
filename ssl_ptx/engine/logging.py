"""Training records: a metrics CSV, optional TensorBoard events, a training-curve PNG.

All three are :class:`~ssl_ptx.engine.callbacks.Callback` objects that write on rank 0 only.
The CSV has one row per epoch (the keys of ``trainer.callback_metrics``: ``epoch``, ``step``,
``lr``, ``train_loss``, ``val_dice`` …); it is rewritten atomically after every epoch and, on
resume, cut back to the epochs before the resumed one, so it never holds a repeated epoch.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ssl_ptx.engine.callbacks import Callback
from ssl_ptx.fileio import atomic_path

if TYPE_CHECKING:
    from ssl_ptx.engine.trainer import Trainer

__all__ = [
    "CSVLogger",
    "TensorBoardLogger",
    "TrainingCurves",
    "plot_training_curves",
    "read_metrics_csv",
    "tensorboard_available",
    "validated_prefixes",
]


def tensorboard_available() -> bool:
    """True when the ``tensorboard`` package (needed by ``torch.utils.tensorboard``) imports."""
    return importlib.util.find_spec("tensorboard") is not None


def validated_prefixes(metrics: Mapping[str, Any]) -> list[str]:
    """Prefixes of the validated models, from the metric names: ``""`` for the trained
    model's ``val_dice``, ``"ema_"`` for ``ema_val_dice``, ``"teacher_"`` …; the trained
    model first, the others sorted."""
    prefixes = [key[: -len("val_dice")] for key in metrics if key.endswith("val_dice")]
    return sorted(prefixes, key=lambda prefix: (prefix != "", prefix))


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_metrics_csv(path: str | os.PathLike) -> list[dict[str, float | str]]:
    """Rows of a metrics CSV, numbers as floats (empty cells as NaN)."""
    with open(path, newline="") as handle:
        return [
            {key: math.nan if value == "" else _number(value) for key, value in row.items()}
            for row in csv.DictReader(handle)
        ]


class CSVLogger(Callback):
    """One CSV row per epoch with every value of ``trainer.callback_metrics``.

    Args:
        path: the CSV file (default name ``metrics.csv`` in the run folder).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.rows = []
        if trainer.epoch > 0 and self.path.is_file():
            self.rows = [r for r in read_metrics_csv(self.path) if r["epoch"] < trainer.epoch]

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        self.rows.append(dict(trainer.callback_metrics))
        if trainer.is_main:
            self._write()

    def _write(self) -> None:
        columns: dict[str, None] = {}
        for row in self.rows:
            columns.update(dict.fromkeys(row))
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(self.rows)


class TensorBoardLogger(Callback):
    """Scalars for TensorBoard: every epoch metric (x = epoch), and the training loss and
    learning rate every ``every_n_steps`` optimiser steps (x = step).

    Raises:
        ModuleNotFoundError: the ``tensorboard`` package is not installed.
    """

    def __init__(self, log_dir: str | os.PathLike, *, every_n_steps: int = 10) -> None:
        if not tensorboard_available():
            raise ModuleNotFoundError(
                "TensorBoard logging needs the tensorboard package: pip install tensorboard"
            )
        self.log_dir = Path(log_dir)
        self.every_n_steps = every_n_steps
        self._writer = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=trainer.global_step)

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Mapping[str, Any], batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._writer is None or not outputs["optimizer_stepped"] or step % self.every_n_steps:
            return
        self._writer.add_scalar("step/train_loss", float(outputs["loss"]), step)
        self._writer.add_scalar("step/lr", trainer.lr, step)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self._writer is None:
            return
        for key, value in trainer.callback_metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"epoch/{key}", value, trainer.epoch)
        self._writer.flush()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def on_fit_end(self, trainer: Trainer) -> None:
        self._close()

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._close()


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(r["epoch"]) + 1, float(r[key]))
        for r in rows
        if isinstance(r.get(key), (int, float)) and not math.isnan(float(r[key]))
    ]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(
    rows: Sequence[Mapping[str, Any]] | str | os.PathLike, png_path: str | os.PathLike
) -> Path:
    """Draw loss, validation scores and learning rate against the epoch.

    Args:
        rows: metrics rows (as :class:`CSVLogger` keeps them) or the CSV file.
        png_path: output PNG (written atomically).

    Returns:
        ``png_path``. Panels: training and validation loss; validation Dice, positive-image
        Dice, false-positive rate on negatives and the all-empty baseline — one line style
        per validated model (solid: the trained model; dashed, dotted, …: the EMA or teacher
        of ``ema_val_dice``, ``teacher_val_dice`` …); learning rate (log scale). Epochs are
        counted from 1 on the x axis.
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_metrics_csv(rows)
    figure = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, score_axes, lr_axes = figure.subplots(1, 3)
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axes.plot(*_series(rows, key), marker="o", label=label)
    loss_axes.set(title="loss", xlabel="epoch")
    score_lines = (
        ("val_dice", "Dice (competition)", "C0"),
        ("val_dice_pos", "Dice, positive images", "C1"),
        ("val_fp_rate", "false-positive rate, negative images", "C2"),
    )
    keys = {key: None for row in rows for key in row}
    for prefix, style in zip(validated_prefixes(keys), ("-", "--", ":", "-."), strict=False):
        model = f" ({prefix.rstrip('_')})" if prefix else ""
        for key, label, color in score_lines:
            x, y = _series(rows, prefix + key)
            if x:
                marker = "o" if not prefix else None
                score_axes.plot(x, y, style, color=color, marker=marker, label=label + model)
    x, y = _series(rows, "val_all_empty_dice")
    if x:
        score_axes.plot(x, y, "--", color="grey", label="all-empty prediction")
    score_axes.set(title="validation", xlabel="epoch", ylim=(-0.02, 1.02))
    lr_axes.plot(*_series(rows, "lr"), marker="o")
    lr_axes.set(title="learning rate (end of epoch)", xlabel="epoch")
    if any(y > 0 for y in _series(rows, "lr")[1]):
        lr_axes.set_yscale("log")
    for axes in (loss_axes, score_axes):
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    for axes in (loss_axes, score_axes, lr_axes):
        axes.grid(alpha=0.3)
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        figure.savefig(tmp, format="png")
    return png_path


class TrainingCurves(Callback):
    """Write :func:`plot_training_curves` of a :class:`CSVLogger`'s rows at the end of fit."""

    def __init__(self, csv_logger: CSVLogger, png_path: str | os.PathLike) -> None:
        self.csv_logger = csv_logger
        self.png_path = Path(png_path)

    def on_fit_end(self, trainer: Trainer) -> None:
        if trainer.is_main and self.csv_logger.rows:
            plot_training_curves(self.csv_logger.rows, self.png_path)
