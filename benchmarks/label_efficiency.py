"""Label-efficiency study: how much each method gains as SIIM labels get scarce, on the demo root.

For every labelled fraction (default 10 / 25 / 50 / 100 % of the SIIM training masks of fold 0's
training folds) and seed, the repository's recipes are run as subprocesses (``--jobs`` at a
time, ``--threads`` OpenMP threads each) with the Mean Teacher demo preset's model, data and
schedule settings (96², 8 labelled images per step, symmetric Lovasz, cosine Adam 1e-3):

  supervised           recipes/train_supervised.py --ema 0.95: the "supervised" arm, and
                       its EMA validated beside it, the "EMA" arm (one run, two arms);
  mean_teacher         recipes/mean_teacher_nih.py: unlabelled NIH images plus the SIIM
                       training images whose masks were held back (student and teacher arms);
  pseudo               recipes/pseudo_chexpert.py --teacher <supervised run>/last.pt
                       --ratio 0.5: CheXpert pseudo labels kept where the teacher and the
                       dataset's label agree, then a student on SIIM + pseudo;
  pseudo_mean_teacher  recipes/mean_teacher_nih.py --pseudo <pseudo run>/pseudo --ratio 0.5:
                       the same pseudo labels in the Mean Teacher's labelled stream;
  mean_teacher_crop    recipes/mean_teacher_nih.py --lung-crop: Mean Teacher (the best method
                       at 25 % in benchmarks/evidence_mean_teacher.py) on lung crops of a lung
                       model trained first (recipes/train_lung_segmenter.py, demo preset).

**The same compute per fraction.** A fraction's epochs are chosen so that its supervised run
takes about ``--steps`` optimiser steps (175 = the 35 epochs of the 25 % setting); every
method of that fraction trains for those epochs, and the Mean Teacher's consistency ramp-up
is scaled with them (20 of 35 epochs), and runs of more than 35 epochs validate every
``ceil(epochs / 35)`` epochs and after the last (validation costs as much as training at 10 %
of the labels otherwise). With the demo preset's 50 % positive sampling an epoch
is twice the kept positives, so 10 % of the labels gets many short epochs and 100 % few long
ones.

Reported: competition Dice, positive-image Dice and the false-positive rate on negative images
of the validation fold (0) at the LAST epoch (no checkpoint selection on the reported fold),
mean ± sample standard deviation over the seeds, per arm and fraction; a plot of Dice against
the labelled fraction per arm; each run's wall time.

Finished runs are kept: a run is reused when its record (``records/<run>.json``) holds the same
arguments, an interrupted one resumes from its ``last.pt``, and ``--adopt DIR`` takes finished
runs of the earlier evidence scripts whose resolved config is this study's (apart from output
and cache folders; a pseudo run also needs the study's teacher, ratio and filter settings, as
its summary.json records them) instead of training them again.

Writes ``<out>/label_efficiency.json``, ``<out>/label_efficiency.md``, the plot
``<out>/label_efficiency.png`` and, unless ``--quick`` or ``--docs none``, the block between
``<!-- label_efficiency:begin -->`` and ``<!-- label_efficiency:end -->`` of docs/results.md
(with the plot copied to docs/img/).

    python benchmarks/label_efficiency.py --jobs 2 --adopt outputs/evidence_mean_teacher \\
        outputs/evidence_pseudo                                  # the full study
    python benchmarks/label_efficiency.py --quick                # a spot check, < 15 min
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import ModuleType
from typing import Any

from ssl_ptx.config import ConfigError, config_to_dict, load_config
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.loaders import build_train_loader
from ssl_ptx.engine.logging import read_metrics_csv
from ssl_ptx.fileio import atomic_path, atomic_write_bytes
from ssl_ptx.pseudo import published_rules

ROOT = Path(__file__).resolve().parents[1]
BEGIN_MARKER = "<!-- label_efficiency:begin -->"
END_MARKER = "<!-- label_efficiency:end -->"
#: run kind → (recipe, kinds it needs first)
RUN_KINDS = {
    "lung": ("train_lung_segmenter", ()),
    "supervised": ("train_supervised", ()),
    "mean_teacher": ("mean_teacher_nih", ()),
    "pseudo": ("pseudo_chexpert", ("supervised",)),
    "pseudo_mean_teacher": ("mean_teacher_nih", ("pseudo",)),
    "mean_teacher_crop": ("mean_teacher_nih", ("lung",)),
}
#: reported arm → (run kind, metric prefix)
ARMS = {
    "supervised": ("supervised", ""),
    "EMA": ("supervised", "ema_"),
    "Mean Teacher (student)": ("mean_teacher", ""),
    "Mean Teacher (teacher)": ("mean_teacher", "teacher_"),
    "pseudo labels": ("pseudo", ""),
    "pseudo + Mean Teacher": ("pseudo_mean_teacher", ""),
    "Mean Teacher + lung crop": ("mean_teacher_crop", ""),
}
METRICS = {"Dice": "val_dice", "positive-image Dice": "val_dice_pos", "FP rate": "val_fp_rate"}
#: config keys that say where a run writes, not what it learns (ignored when adopting)
WHERE_KEYS = (
    ("out_dir",),
    ("data", "cache_dir"),
    ("data", "demo_dir"),
    ("trainer", "top_k"),
    ("trainer", "tensorboard"),
    ("trainer", "progress"),
)
#: the 25 % setting's epochs and Mean Teacher ramp-up, which the ramp-up is scaled from
REFERENCE_EPOCHS, REFERENCE_RAMPUP = 35, 20


@dataclasses.dataclass(frozen=True)
class Run:
    """One recipe run of the study: a kind at a labelled fraction and seed (the lung model has
    neither)."""

    kind: str
    fraction: float | None = None
    seed: int | None = None

    @property
    def name(self) -> str:
        if self.fraction is None:
            return self.kind
        return f"f{self.fraction:g}-{self.kind}-seed{self.seed}"

    @property
    def recipe(self) -> str:
        return RUN_KINDS[self.kind][0]

    def needs(self) -> list[Run]:
        """The runs whose outputs this one reads."""
        return [
            Run(kind) if kind == "lung" else Run(kind, self.fraction, self.seed)
            for kind in RUN_KINDS[self.kind][1]
        ]


def load_recipe(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Study:
    """The runs of one study folder: their arguments, records and metrics."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out: Path = args.out.resolve()
        self.cache_dir = (args.cache_dir or self.out / "cache").resolve()
        self._epochs: dict[tuple[float, int], int] = {}

    def run_dir(self, run: Run) -> Path:
        return self.out / "runs" / run.name

    def record_path(self, run: Run) -> Path:
        return self.out / "records" / f"{run.name}.json"

    def epochs(self, fraction: float, seed: int) -> int:
        """Epochs of ``fraction`` whose supervised run takes about ``--steps`` optimiser steps."""
        key = (fraction, seed)
        if key not in self._epochs:
            recipe = load_recipe("train_supervised")
            argv = self._common(fraction, seed, epochs=1, out=self.out / "probe")
            config, _ = recipe.build_config(recipe.parse_args(argv))
            train, _, _ = build_siim_datasets(config.data, progress=False)
            steps = len(build_train_loader(train, config.data, epochs=1, seed=seed))
            self._epochs[key] = max(1, round(self.args.steps / steps))
        return self._epochs[key]

    def _common(self, fraction: float, seed: int, *, epochs: int, out: Path) -> list[str]:
        settings = [
            f"data.size={self.args.size}",
            f"data.batch_size={self.args.batch_size}",
            f"data.labelled_fraction={fraction:g}",
            f"data.labelled_seed={seed}",
            f"data.cache_dir={self.cache_dir}",
            "data.num_workers=0",
            f"trainer.seed={seed}",
            "trainer.top_k=0",
            "trainer.tensorboard=false",
        ]
        if epochs > REFERENCE_EPOCHS:  # at most about as many validations as at 25 %
            settings.append(f"trainer.val_every={math.ceil(epochs / REFERENCE_EPOCHS)}")
        flags = ["--demo-dir", str(self.args.demo_dir.resolve()), "--epochs", str(epochs)]
        flags += ["--out", str(out), "--no-progress"]
        return flags + [option for value in settings for option in ("--set", value)]

    def argv(self, run: Run) -> list[str]:
        """The recipe's command-line arguments for ``run``."""
        out = self.run_dir(run)
        if run.kind == "lung":
            argv = ["--demo-dir", str(self.args.demo_dir.resolve()), "--out", str(out)]
            argv += ["--no-progress", "--set", f"data.cache_dir={self.cache_dir}"]
            return argv + (
                ["--epochs", str(self.args.lung_epochs)] if self.args.lung_epochs else []
            )
        epochs = self.epochs(run.fraction, run.seed)
        argv = self._common(run.fraction, run.seed, epochs=epochs, out=out)
        if run.kind == "supervised":
            return argv + ["--ema", "0.95", "--set", "ema.warmup=mean_teacher"]
        if run.kind == "pseudo":
            teacher = self.run_dir(Run("supervised", run.fraction, run.seed)) / "last.pt"
            return argv + ["--teacher", str(teacher), "--ratio", str(self.args.ratio)]
        rampup = max(1, round(REFERENCE_RAMPUP * epochs / REFERENCE_EPOCHS))
        argv += ["--set", f"mean_teacher.rampup_epochs={rampup}"]
        if run.kind == "pseudo_mean_teacher":
            pseudo = self.run_dir(Run("pseudo", run.fraction, run.seed)) / "pseudo"
            argv += ["--pseudo", str(pseudo), "--ratio", str(self.args.ratio)]
        if run.kind == "mean_teacher_crop":
            lung = self.run_dir(Run("lung")) / "lung_segmenter.pt"
            argv += ["--lung-crop", str(lung), "--set", f"data.cache_size={self.args.crop_cache}"]
        return argv

    def finished(self, run: Run) -> bool:
        record = self.record_path(run)
        return record.exists() and json.loads(record.read_text())["argv"] == self.argv(run)

    def metrics(self, run: Run) -> dict[str, float]:
        """The last epoch's row of the run's ``metrics.csv``."""
        return read_metrics_csv(self.run_dir(run) / "metrics.csv")[-1]


def resolved_config(run: Run, argv: Sequence[str]) -> Any:
    """The config object ``argv`` gives the run's recipe."""
    recipe = load_recipe(run.recipe)
    config = recipe.build_config(recipe.parse_args(list(argv)))
    return config[0] if isinstance(config, tuple) else config


def comparable(config: Any) -> dict[str, Any]:
    """``config`` as a dict without the WHERE_KEYS."""
    values = json.loads(json.dumps(config_to_dict(config)))
    for path in WHERE_KEYS:
        section = values
        for key in path[:-1]:
            section = section.get(key, {})
        section.pop(path[-1], None)
    return values


def study_filter_settings(study: Study) -> dict[str, Any]:
    """What a pseudo run's filter audit (``summary.json`` → ``pseudo.settings``) records when
    ``pseudo_chexpert.py`` runs with the study's arguments: the published rules at their
    defaults, no confidence band, hard labels, at the study's size."""
    rules = [repr(rule) for rule in published_rules()]
    return {"rules": rules, "size": study.args.size, "band": repr(None), "soft": False}


def _pseudo_matches(study: Study, run: Run, candidate: Path) -> bool:
    """A candidate pseudo run used this study's ratio, (adopted) teacher and filter: the same
    rules, band, soft/hard labels and size, over CheXpert alone."""
    summary_path = candidate / "summary.json"
    if not summary_path.exists():
        return False
    summary = json.loads(summary_path.read_text())
    teacher = study.run_dir(Run("supervised", run.fraction, run.seed)) / "last.pt"
    same_teacher = Path(summary["teacher"]).resolve() == teacher.resolve()
    audit = summary.get("pseudo", {})
    wanted = study_filter_settings(study)
    recorded = {"soft": False, **audit.get("settings", {})}  # older filters: hard labels only
    settings = {key: recorded.get(key) for key in wanted}
    same_filter = settings == wanted and set(audit.get("counts", {})) == {"chexpert"}
    return summary.get("ratio") == study.args.ratio and same_teacher and same_filter


def adopt(study: Study, run: Run, folders: Iterable[Path]) -> Path | None:
    """Link a finished run in ``folders`` (their sub-folders) whose resolved config is
    ``run``'s into the study (its run folder becomes a link to it); returns it, or None."""
    if run.kind not in ("supervised", "mean_teacher", "pseudo"):
        return None
    wanted = resolved_config(run, study.argv(run))
    epochs = study.epochs(run.fraction, run.seed)
    for config_path in sorted(p for folder in folders for p in Path(folder).glob("*/config.yaml")):
        candidate = config_path.parent
        if not (candidate / "last.pt").exists() or not (candidate / "metrics.csv").exists():
            continue
        if len(read_metrics_csv(candidate / "metrics.csv")) != epochs:
            continue  # unfinished
        try:  # keys newer than the candidate take their defaults, as when it was made
            candidate_config = load_config(config_path, type(wanted)())
        except ConfigError:
            continue  # another recipe's config
        if comparable(candidate_config) != comparable(wanted):
            continue
        if run.kind == "pseudo" and not _pseudo_matches(study, run, candidate):
            continue
        target = study.run_dir(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(candidate.resolve(), target_is_directory=True)
        return candidate
    return None


def execute(study: Study, run: Run) -> bool:
    """Run (or resume, or adopt) ``run`` unless it is finished; write its record. Returns
    whether it finished."""
    if study.finished(run):
        return True
    argv = study.argv(run)
    run_dir = study.run_dir(run)
    record: dict[str, Any] = {"argv": argv, "run": run.name}
    started = time.perf_counter()
    adopted = None if run_dir.exists() else adopt(study, run, study.args.adopt)
    if adopted is not None:
        record["adopted_from"] = str(adopted)
        print(f"[{run.name}] adopted {adopted}", flush=True)
    else:
        resume = (run_dir / "last.pt").exists() or (run_dir / "teacher" / "model.pt").exists()
        command = [sys.executable, str(ROOT / "recipes" / f"{run.recipe}.py"), *argv]
        if resume and run.kind != "lung":
            command.append("--resume")
        threads = str(study.args.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{run.name}] {'resuming' if resume else 'starting'}", flush=True)
        with open(run_dir / "study.log", "a") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code != 0:
            print(f"[{run.name}] FAILED (exit {code}): see {run_dir / 'study.log'}", flush=True)
            return False
        record["seconds"] = time.perf_counter() - started
        record["threads"] = study.args.threads
        print(f"[{run.name}] finished in {record['seconds']:.0f} s", flush=True)
    study.record_path(run).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(study.record_path(run), json.dumps(record, indent=2).encode())
    return True


def run_all(study: Study, runs: Sequence[Run], jobs: int) -> list[Run]:
    """Execute ``runs`` in order, ``jobs`` at a time, each after the runs it needs; returns
    the runs that failed or could not start because a run they need failed."""
    pending, failed, done = list(runs), [], set()
    running: dict[Future, Run] = {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for run in list(pending):
                if len(running) >= jobs:
                    break
                needs = run.needs()
                if any(need in failed for need in needs):
                    pending.remove(run)
                    failed.append(run)
                elif all(need in done for need in needs):
                    pending.remove(run)
                    running[pool.submit(execute, study, run)] = run
            if not running:
                missing = {need.name for run in pending for need in run.needs()} - {
                    run.name for run in done
                }
                raise RuntimeError(f"runs needed but not planned: {sorted(missing)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run = running.pop(future)
                if future.exception() is not None:  # the study's own error: report, go on
                    print(f"[{run.name}] FAILED: {future.exception()!r}", flush=True)
                    failed.append(run)
                elif future.result():
                    done.add(run)
                else:
                    failed.append(run)
    return failed


def plan(args: argparse.Namespace) -> list[Run]:
    """The study's runs, seed by seed (a stopped study has whole seeds), each fraction's runs
    after the ones they read."""
    kinds = [kind for kind in RUN_KINDS if kind != "lung" and kind in args.runs]
    runs = [Run("lung")] if "mean_teacher_crop" in kinds else []
    for seed in args.seeds:
        for fraction in args.fractions:
            runs += [Run(kind, fraction, seed) for kind in kinds]
    return runs


def _mean_std(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else math.nan,
        "n": len(values),
        "values": values,
    }


def summarise(study: Study, runs: Sequence[Run]) -> dict[str, Any]:
    """arm → fraction → metric → mean/std/n/values over the seeds whose run finished."""
    table: dict[str, Any] = {}
    finished = [run for run in runs if run.fraction is not None and study.finished(run)]
    for arm, (kind, prefix) in ARMS.items():
        for fraction in study.args.fractions:
            cell = [r for r in finished if r.kind == kind and r.fraction == fraction]
            if not cell:
                continue
            rows = [study.metrics(run) for run in cell]
            table.setdefault(arm, {})[f"{fraction:g}"] = {
                metric: _mean_std([row[prefix + column] for row in rows])
                for metric, column in METRICS.items()
            }
    return table


def all_empty_dice(study: Study, runs: Sequence[Run]) -> float | None:
    """The validation fold's Dice when every image is predicted empty (None before any run)."""
    for run in runs:
        if run.fraction is not None and study.finished(run):
            return study.metrics(run).get("val_all_empty_dice")
    return None


def _cell_text(value: dict[str, float] | None, percent: bool, seeds: int) -> str:
    """``mean ± std`` (in % for rates), with the number of seeds when some are missing."""
    if value is None:
        return "—"
    scale, digits, unit = (100, 1, " %") if percent else (1, 3, "")
    text = f"{scale * value['mean']:.{digits}f}"
    if value["n"] > 1:
        text += f" ± {scale * value['std']:.{digits}f}"
    return text + unit + ("" if value["n"] == seeds else f" (n={value['n']})")


def markdown(table: dict[str, Any], study: Study, seconds: dict[str, float]) -> str:
    fractions = [f"{fraction:g}" for fraction in study.args.fractions]
    header = "| arm | " + " | ".join(f"{float(f):.0%} labels" for f in fractions) + " |"
    lines: list[str] = []
    for metric in METRICS:
        lines += [f"**{metric}** (mean ± std over seeds {study.args.seeds}, last epoch)", ""]
        lines += [header, "| --- |" + " ---: |" * len(fractions)]
        for arm, cells in table.items():
            values = [
                _cell_text(cells.get(f, {}).get(metric), metric == "FP rate", len(study.args.seeds))
                for f in fractions
            ]
            lines.append(f"| {arm} | " + " | ".join(values) + " |")
        lines.append("")
    epochs = ", ".join(
        f"{float(f):.0%}: {study.epochs(float(f), study.args.seeds[0])}" for f in fractions
    )
    lines += [f"Epochs per fraction (seed {study.args.seeds[0]}): {epochs}.", ""]
    trained = seconds["trained"]
    lines.append(
        f"Run time: {trained / 3600:.1f} h of training runs ({seconds['runs']} runs trained here, "
        f"{seconds['adopted']} adopted from earlier evidence runs), {study.args.jobs} at a time "
        f"with {study.args.threads} thread(s) each on this machine's CPU."
    )
    return "\n".join(lines) + "\n"


def plot(
    table: dict[str, Any], fractions: Sequence[float], path: Path, all_empty: float | None
) -> None:
    """Dice against the labelled fraction per arm (mean, with ± std bars) and the Dice of
    predicting every image empty (``all_empty``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for arm, cells in table.items():
        points = [(f, cells[f"{f:g}"]["Dice"]) for f in fractions if f"{f:g}" in cells]
        axis.errorbar(
            [100 * f for f, _ in points],
            [value["mean"] for _, value in points],
            yerr=[0 if math.isnan(value["std"]) else value["std"] for _, value in points],
            marker="o",
            capsize=3,
            label=arm,
        )
    if all_empty is not None:
        axis.axhline(all_empty, color="grey", linestyle="--", linewidth=1, label="all-empty")
    axis.set_xscale("log")
    axis.minorticks_off()
    axis.set_xticks([100 * f for f in fractions], [f"{f:.0%}" for f in fractions])
    axis.set_xlabel("SIIM training masks used")
    axis.set_ylabel("competition Dice, validation fold (last epoch)")
    axis.set_title("Label efficiency on the demo root")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_docs(page: Path, text: str, picture: Path) -> None:
    """Replace the study's block of ``page`` with ``text`` and the picture (copied to
    docs/img/)."""
    image = page.parent / "img" / picture.name
    shutil.copyfile(picture, image)
    block = f"{BEGIN_MARKER}\n![label efficiency](img/{picture.name})\n\n{text}{END_MARKER}"
    content = page.read_text()
    if BEGIN_MARKER in content and END_MARKER in content:
        before, rest = content.split(BEGIN_MARKER, 1)
        content = before + block + rest.split(END_MARKER, 1)[1]
    else:
        content = content.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_bytes(page, content.encode())


QUICK = {"seeds": [0], "fractions": [0.25, 1.0], "size": 64, "steps": 30, "lung_epochs": 4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--demo-dir", type=Path, default=ROOT / "demo_data", help="demo root")
    parser.add_argument("--out", type=Path, help="study folder (default: outputs/label_efficiency)")
    parser.add_argument("--cache-dir", type=Path, help="HDF5 caches (default: OUT/cache)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=[kind for kind in RUN_KINDS if kind != "lung"],
        default=[kind for kind in RUN_KINDS if kind != "lung"],
        help="run kinds (default: all)",
    )
    parser.add_argument("--size", type=int, default=96, help="training side (default: 96)")
    parser.add_argument("--batch-size", type=int, default=8, help="labelled images per step")
    parser.add_argument(
        "--steps", type=int, default=175, help="supervised optimiser steps per run (default: 175)"
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="pseudo ratio (default: 0.5)")
    parser.add_argument(
        "--crop-cache", type=int, default=256, help="cache side of the lung-crop runs (256)"
    )
    parser.add_argument("--lung-epochs", type=int, help="lung model epochs (its preset's)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (default: 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per run (default: 1)")
    parser.add_argument(
        "--adopt", type=Path, nargs="*", default=[], help="folders of earlier runs to adopt"
    )
    parser.add_argument(
        "--docs",
        default=str(ROOT / "docs" / "results.md"),
        help="page whose study block is replaced ('none': no page; never with --quick)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the report of the finished runs only"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a spot check in minutes: {', '.join(f'{k}={v}' for k, v in QUICK.items())}",
    )
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.docs = "none"
    args.out = args.out or ROOT / "outputs" / (
        "label_efficiency" + ("_quick" if args.quick else "")
    )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    study = Study(args)
    runs = plan(args)
    started = time.perf_counter()
    failed = [] if args.report_only else run_all(study, runs, args.jobs)
    records = [
        json.loads(study.record_path(run).read_text()) for run in runs if study.finished(run)
    ]
    seconds = {
        "trained": sum(record.get("seconds", 0.0) for record in records),
        "runs": sum("seconds" in record for record in records),
        "adopted": sum("adopted_from" in record for record in records),
        "wall_this_call": time.perf_counter() - started,
    }
    table = summarise(study, runs)
    text = markdown(table, study, seconds)
    study.out.mkdir(parents=True, exist_ok=True)
    picture = study.out / "label_efficiency.png"
    plot(table, args.fractions, picture, all_empty_dice(study, runs))
    report = {
        "args": {key: str(value) for key, value in vars(args).items()},
        "table": table,
        "seconds": seconds,
        "records": records,
        "failed": [run.name for run in failed],
    }
    atomic_write_bytes(study.out / "label_efficiency.json", json.dumps(report, indent=2).encode())
    atomic_write_bytes(study.out / "label_efficiency.md", text.encode())
    if args.docs != "none":
        write_docs(Path(args.docs), text, picture)
    print(text)
    if failed:
        print("failed or not started: " + ", ".join(run.name for run in failed))
    return report


if __name__ == "__main__":
    main()
