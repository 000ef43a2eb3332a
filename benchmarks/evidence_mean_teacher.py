"""Evidence: supervised vs EMA vs Mean Teacher with few labels, on the demo root.

The setting is the Mean Teacher demo preset (``MEAN_TEACHER_PRESETS["demo"]``: 25 % of the SIIM
training masks kept, 96², 8 labelled + 4 unlabelled images per step, ...); every value can be
changed with the options below. For every seed the kept images are a draw per label seeded by
the seed, the same for every arm, and two runs of the repository's recipes are made with the
same model, data and schedule settings (the preset's, given to the supervised recipe too):

* ``recipes/train_supervised.py --ema``: the student trained on the kept labels alone gives
  the **supervised** arm; the EMA of its weights, validated beside it, the **EMA** arm (the EMA
  only watches the training, so both come from one run);
* ``recipes/mean_teacher_nih.py``: the same student with a consistency loss toward its EMA
  teacher on unlabelled images (the other SIIM training images and the demo NIH images): the
  **Mean Teacher** arm, student and teacher.

Reported: competition Dice and positive-image Dice on the validation fold (``--fold``) at the
LAST epoch (no checkpoint selection on that fold), mean ± sample standard deviation over the
seeds, and the per-seed paired differences to the supervised arm. A second table scores the
same four final models on the SIIM training images whose masks were held back — the images
Mean Teacher saw unlabelled — which tells how good the teacher's targets were there.
Hyper-parameters must be chosen on another fold (``--fold 1``, see docs/mean_teacher.md),
never on the reported one.

Prints a table and writes ``<out>/evidence.json`` and ``<out>/evidence.md``.

    python benchmarks/evidence_mean_teacher.py                     # fold 0, seeds 0 1 2
    python benchmarks/evidence_mean_teacher.py --fold 1 --seeds 0  # a tuning run
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import statistics
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ssl_ptx.config import (
    MEAN_TEACHER_PRESETS,
    MeanTeacherTrainConfig,
    config_from_dict,
    config_to_dict,
    preset,
)
from ssl_ptx.engine import Trainer, load_checkpoint
from ssl_ptx.engine.data import build_siim_datasets, split_labelled
from ssl_ptx.engine.loaders import build_val_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.fileio import atomic_write_bytes
from ssl_ptx.losses import build_loss
from ssl_ptx.models import create_model

ROOT = Path(__file__).resolve().parents[1]
#: arm → (run, metric prefix)
ARMS = {
    "supervised": ("supervised", ""),
    "EMA": ("supervised", "ema_"),
    "Mean Teacher (student)": ("mean_teacher", ""),
    "Mean Teacher (teacher)": ("mean_teacher", "teacher_"),
}
METRICS = {"Dice": "val_dice", "positive-image Dice": "val_dice_pos", "FP rate": "val_fp_rate"}


def load_recipe(name: str) -> ModuleType:
    path = ROOT / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--demo-dir", default="demo_data", help="demo data root (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "outputs" / "evidence_mean_teacher", help="output folder"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds")
    parser.add_argument("--fold", type=int, default=0, help="validation fold (default: 0)")
    parser.add_argument(
        "--labelled-fraction", type=float, help="kept labels (default: the preset's)"
    )
    parser.add_argument("--size", type=int, help="training side in pixels (default: the preset's)")
    parser.add_argument("--epochs", type=int, help="epochs of every run (default: the preset's)")
    parser.add_argument(
        "--batch-size", type=int, help="labelled images per step (default: the preset's)"
    )
    parser.add_argument(
        "--set",
        dest="common",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for both recipes (e.g. trainer.lr=3e-4)",
    )
    parser.add_argument(
        "--mt-set",
        dest="mean_teacher",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for the Mean Teacher recipe only (e.g. mean_teacher.consistency_weight=10)",
    )
    parser.add_argument(
        "--ema", type=float, help="decay of the EMA arm (default: the preset's teacher decay)"
    )
    parser.add_argument("--cache-dir", type=Path, help="HDF5 caches (default: <out>/cache)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (default: torch's); 1 wastes far less CPU on a shared machine",
    )
    return parser.parse_args(argv)


def fill_defaults(args: argparse.Namespace) -> None:
    """Take the values not given on the command line from the Mean Teacher demo preset."""
    demo = preset("demo", MEAN_TEACHER_PRESETS)
    defaults = {
        "labelled_fraction": demo.data.labelled_fraction,
        "size": demo.data.size,
        "epochs": demo.trainer.epochs,
        "batch_size": demo.data.batch_size,
        "ema": demo.mean_teacher.ema_decay,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def common_arguments(args: argparse.Namespace, seed: int, out: Path) -> list[str]:
    """Recipe arguments shared by both runs: the demo preset's data and schedule values
    (explicit, so the supervised recipe gets them too), the seed, the fold."""
    cache = args.cache_dir or args.out / "cache"
    settings = [
        f"data.size={args.size}",
        f"data.batch_size={args.batch_size}",
        f"data.labelled_fraction={args.labelled_fraction}",
        f"data.labelled_seed={seed}",
        f"data.cache_dir={cache}",
        "data.num_workers=0",
        f"trainer.seed={seed}",
        "trainer.top_k=0",
        "trainer.tensorboard=false",
        *args.common,
    ]
    flags = ["--demo-dir", args.demo_dir, "--fold", str(args.fold), "--epochs", str(args.epochs)]
    flags += ["--out", str(out), "--no-progress"]
    return flags + [option for value in settings for option in ("--set", value)]


def run(args: argparse.Namespace, name: str, seed: int) -> dict[str, Any]:
    """One recipe run; returns its last metrics row, wall and CPU time (all threads).

    A finished run (its ``run.json`` written with the same arguments) is reused; an interrupted
    one (``last.pt`` but no ``run.json``) is resumed, which gives the same final weights — its
    times then cover the resumed part only (``"resumed": true``)."""
    out = args.out / f"{name}-seed{seed}"
    argv = common_arguments(args, seed, out)
    if name == "supervised":
        argv += ["--ema", str(args.ema), "--set", "ema.warmup=mean_teacher"]
        recipe = load_recipe("train_supervised")
    else:
        argv += [option for value in args.mean_teacher for option in ("--set", value)]
        recipe = load_recipe("mean_teacher_nih")
    record = out / "run.json"
    if record.exists():
        finished = json.loads(record.read_text())
        if finished["argv"] == argv:
            return finished
    resumed = (out / "last.pt").exists()
    started, cpu = time.perf_counter(), time.process_time()
    recipe.main(argv + (["--resume", "last"] if resumed else []))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    last = read_metrics_csv(out / "metrics.csv")[-1]
    result = {
        "metrics": last,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "argv": argv,
        "resumed": resumed,
    }
    atomic_write_bytes(record, json.dumps(result, indent=2).encode())
    return result


def _averaged(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights inside a ``ModelEMA.state_dict()`` (keys ``module.<name>``)."""
    return {k.removeprefix("module."): v for k, v in state.items() if k.startswith("module.")}


def scores_on_held_back(args: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """Validation metrics of the four final models of ``seed`` on the SIIM training images
    whose masks were held back (plain resize, no augmentation)."""
    runs = {
        name: args.out / f"{name}-seed{seed}" / "last.pt" for name in ("supervised", "mean_teacher")
    }
    mean_teacher = load_checkpoint(runs["mean_teacher"])
    config = config_from_dict(mean_teacher["config"], MeanTeacherTrainConfig())
    data = dataclasses.replace(config.data, augment="none", labelled_fraction=1.0)
    train, _, _ = build_siim_datasets(data, in_channels=config.model.in_channels, progress=False)
    _, held_back = split_labelled(train, config.data.labelled_fraction, config.data.labelled_seed)
    loader = build_val_loader(held_back, data)
    supervised = load_checkpoint(runs["supervised"])
    weights = {
        "supervised": supervised["model"],
        "EMA": _averaged(supervised["callbacks"]["EMACallback[ema_]"]["ema"]),
        "Mean Teacher (student)": mean_teacher["model"],
        "Mean Teacher (teacher)": _averaged(mean_teacher["mean_teacher"]["teacher"]),
    }
    model = create_model(config_to_dict(config.model))
    trainer_config = dataclasses.replace(config.trainer, device="cpu", progress=False)
    loss = build_loss(config.loss.build_argument())
    trainer = Trainer(model, loss, trainer_config, out_dir=args.out, default_callbacks=False)
    scores = {}
    for arm, state in weights.items():
        model.load_state_dict(state)
        scores[arm] = trainer.evaluate(loader)
    return scores


def summarise(runs: dict[int, dict[str, dict]]) -> dict[str, Any]:
    """Per arm and metric: per-seed values, mean, sample std, paired differences to the
    supervised arm."""
    table: dict[str, Any] = {}
    for arm, (run_name, prefix) in ARMS.items():
        entry: dict[str, Any] = {}
        for label, key in METRICS.items():
            values = [runs[s][run_name]["metrics"][prefix + key] for s in runs]
            baseline = [runs[s]["supervised"]["metrics"][key] for s in runs]
            entry[label] = {
                "per_seed": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "paired_difference_to_supervised": [
                    v - b for v, b in zip(values, baseline, strict=True)
                ],
            }
        table[arm] = entry
    return table


def markdown(table: dict[str, Any], args: argparse.Namespace, runs: dict) -> str:
    empty = runs[args.seeds[0]]["supervised"]["metrics"]["val_all_empty_dice"]
    lines = [
        f"Demo root, fold {args.fold} validation, {args.labelled_fraction:.0%} of the SIIM "
        f"training masks kept, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
        f"{args.size}², {args.epochs} epochs, last epoch (no selection on the validation fold). "
        f"All-empty prediction: Dice {empty:.4f}. Mean ± sample standard deviation over seeds.",
        "",
        "| arm | Dice | positive-image Dice | FP rate (negatives) | Δ Dice vs supervised, "
        "per seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for arm, entry in table.items():
        cells = [f"{entry[m]['mean']:.4f} ± {entry[m]['std']:.4f}" for m in METRICS]
        deltas = ", ".join(f"{d:+.4f}" for d in entry["Dice"]["paired_difference_to_supervised"])
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {deltas} |")
    times = ", ".join(
        f"{name} {statistics.fmean(runs[s][name]['seconds'] for s in runs):.0f} s wall / "
        f"{statistics.fmean(runs[s][name]['cpu_seconds'] for s in runs):.0f} s CPU"
        for name in ("supervised", "mean_teacher")
    )
    total = sum(run["cpu_seconds"] for per_seed in runs.values() for run in per_seed.values())
    lines += ["", f"Mean time per run: {times}; all runs: {total / 60:.1f} CPU minutes."]
    return "\n".join(lines) + "\n"


def held_back_markdown(held_back: dict[int, dict[str, dict[str, float]]]) -> str:
    seeds = list(held_back)
    n = held_back[seeds[0]]["supervised"]["val_images"]
    lines = [
        "",
        f"The same final models on the {n:.0f} SIIM training images whose masks were held back "
        "(Mean Teacher's unlabelled SIIM images; mean ± std over seeds):",
        "",
        "| model | Dice | positive-image Dice | FP rate (negatives) |",
        "| --- | --- | --- | --- |",
    ]
    for arm in ARMS:
        cells = []
        for key in METRICS.values():
            values = [held_back[s][arm][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {std:.4f}")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    fill_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {
        seed: {name: run(args, name, seed) for name in ("supervised", "mean_teacher")}
        for seed in args.seeds
    }
    table = summarise(runs)
    held_back = {seed: scores_on_held_back(args, seed) for seed in args.seeds}
    text = markdown(table, args, runs) + held_back_markdown(held_back)
    print(text)
    report = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "table": table,
        "held_back": held_back,
        "runs": runs,
    }
    atomic_write_bytes(args.out / "evidence.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(args.out / "evidence.md", text.encode())
    return report


if __name__ == "__main__":
    main()
