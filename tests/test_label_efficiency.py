"""The label-efficiency study's bookkeeping (benchmarks/label_efficiency.py): which runs, in
which order, how many epochs, which earlier runs it may adopt, and its report block. No
training here: the study's runs are the recipes, tested in their own files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ssl_ptx.config import save_config
from ssl_ptx.engine.logging import read_metrics_csv

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study_module():
    path = ROOT / "benchmarks" / "label_efficiency.py"
    spec = importlib.util.spec_from_file_location("label_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _args(module, demo_root: Path, out: Path, *extra: str):
    argv = ["--demo-dir", str(demo_root), "--out", str(out), "--size", "32", "--docs", "none"]
    return module.parse_args([*argv, *extra])


def test_plan_is_seed_by_seed_and_each_run_after_what_it_reads(study_module, tmp_path) -> None:
    args = _args(study_module, tmp_path, tmp_path / "out", "--seeds", "0", "1")
    runs = study_module.plan(args)
    names = [run.name for run in runs]
    assert names[0] == "lung"  # the crop runs need it
    assert len(runs) == 1 + 2 * 4 * 5
    seeds = [run.seed for run in runs[1:]]
    assert seeds == sorted(seeds)  # a stopped study has whole seeds
    for position, run in enumerate(runs):
        for need in run.needs():
            assert need in runs[:position], (run.name, need.name)
    pseudo_mt = study_module.Run("pseudo_mean_teacher", 0.5, 1)
    assert pseudo_mt.needs() == [study_module.Run("pseudo", 0.5, 1)]
    assert study_module.Run("mean_teacher_crop", 0.1, 0).needs() == [study_module.Run("lung")]
    without_crop = _args(study_module, tmp_path, tmp_path / "o", "--runs", "supervised", "pseudo")
    assert [run.kind for run in study_module.plan(without_crop)][:2] == ["supervised", "pseudo"]


def test_epochs_give_each_fraction_the_same_steps(study_module, demo_root, tmp_path) -> None:
    args = _args(study_module, demo_root, tmp_path / "out", "--steps", "12", "--batch-size", "4")
    study = study_module.Study(args)
    small, full = study.epochs(0.25, 0), study.epochs(1.0, 0)
    assert small > full >= 1  # fewer labels: more, shorter epochs
    argv = study.argv(study_module.Run("mean_teacher", 0.25, 0))
    assert argv[argv.index("--epochs") + 1] == str(small)
    rampup = round(20 * small / 35)
    assert f"mean_teacher.rampup_epochs={max(1, rampup)}" in argv
    pseudo = study.argv(study_module.Run("pseudo", 1.0, 0))
    teacher = pseudo[pseudo.index("--teacher") + 1]
    assert teacher == str(study.run_dir(study_module.Run("supervised", 1.0, 0)) / "last.pt")


def _fake_finished_run(folder: Path, config, epochs: int) -> None:
    folder.mkdir(parents=True)
    save_config(config, folder / "config.yaml")
    (folder / "last.pt").write_bytes(b"weights")
    header = "epoch,step,val_dice,val_dice_pos,val_fp_rate\n"
    rows = "".join(f"{e},{e + 1},0.8,0.5,0.1\n" for e in range(epochs))
    (folder / "metrics.csv").write_text(header + rows)


def resolved_config_of(study_module, study, kind: str):
    run = study_module.Run(kind, 0.25, 0)
    return study_module.resolved_config(run, study.argv(run))


def test_adopts_only_a_finished_run_of_the_same_config(study_module, demo_root, tmp_path) -> None:
    args = _args(study_module, demo_root, tmp_path / "out", "--steps", "12", "--batch-size", "4")
    study = study_module.Study(args)
    run = study_module.Run("supervised", 0.25, 0)
    config = study_module.resolved_config(run, study.argv(run))
    epochs = study.epochs(0.25, 0)
    earlier = tmp_path / "earlier"
    # written elsewhere, with other output/cache folders: the same run
    moved = dataclasses.replace(config, out_dir="/elsewhere")
    _fake_finished_run(earlier / "b-same", moved, epochs)
    other = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, lr=9.0))
    _fake_finished_run(earlier / "a-other-lr", other, epochs)
    mean_teacher_config = resolved_config_of(study_module, study, "mean_teacher")
    _fake_finished_run(earlier / "0-mean-teacher", mean_teacher_config, epochs)  # read first
    unfinished = earlier / "c-unfinished"
    _fake_finished_run(unfinished, config, epochs - 1)

    adopted = study_module.adopt(study, run, [earlier])
    assert adopted == earlier / "b-same"
    assert study.run_dir(run).resolve() == (earlier / "b-same").resolve()
    assert len(read_metrics_csv(study.run_dir(run) / "metrics.csv")) == epochs
    mean_teacher = study_module.Run("mean_teacher", 0.25, 0)
    assert study_module.adopt(study, mean_teacher, [earlier]) == earlier / "0-mean-teacher"


def _fake_pseudo_run(folder: Path, config, epochs: int, teacher: Path, **audit) -> None:
    _fake_finished_run(folder, config, epochs)
    summary = {"teacher": str(teacher), "ratio": 0.5, "pseudo": audit}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_adopts_a_pseudo_run_only_with_the_studys_filter(study_module, demo_root, tmp_path) -> None:
    """Same config, ratio and teacher are not enough: the filter's rules, band, soft labels,
    size and sources (the audit in summary.json) must be the study's too."""
    args = _args(study_module, demo_root, tmp_path / "out", "--steps", "12", "--batch-size", "4")
    study = study_module.Study(args)
    run = study_module.Run("pseudo", 0.25, 0)
    config = study_module.resolved_config(run, study.argv(run))
    epochs = study.epochs(0.25, 0)
    teacher = study.run_dir(study_module.Run("supervised", 0.25, 0)) / "last.pt"
    wanted = study_module.study_filter_settings(study)
    assert wanted["size"] == 32 and wanted["soft"] is False
    audit = {"settings": {**wanted, "chunk": 256}, "counts": {"chexpert": {}}}
    earlier = tmp_path / "earlier"
    other_rules = ["PositiveAgreementRule(threshold=0.3, min_area=100.0)", *wanted["rules"][1:]]
    candidates = {
        "a-soft": {**audit, "settings": {**audit["settings"], "soft": True}},
        "b-threshold": {**audit, "settings": {**audit["settings"], "rules": other_rules}},
        "c-with-nih": {**audit, "counts": {"chexpert": {}, "nih": {}}},
        "d-no-audit": {},
        "e-same": audit,
    }
    for name, candidate_audit in candidates.items():
        _fake_pseudo_run(earlier / name, config, epochs, teacher, **candidate_audit)
    assert study_module.adopt(study, run, [earlier]) == earlier / "e-same"


def test_report_block_replaces_only_its_own_part(study_module, tmp_path) -> None:
    page = tmp_path / "results.md"
    (tmp_path / "img").mkdir()
    picture = tmp_path / "label_efficiency.png"
    picture.write_bytes(b"png")
    begin, end = study_module.BEGIN_MARKER, study_module.END_MARKER
    page.write_text(f"# Results\n\nbefore\n\n{begin}\nold table\n{end}\n\nafter\n")
    study_module.write_docs(page, "new table\n", picture)
    text = page.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# Results\n\nbefore\n") and text.endswith("\nafter\n")
    assert "![label efficiency](img/label_efficiency.png)" in text
    assert (tmp_path / "img" / "label_efficiency.png").read_bytes() == b"png"


def test_cell_text(study_module) -> None:
    value = {"mean": 0.8766, "std": 0.0123, "n": 3}
    assert study_module._cell_text(value, False, 3) == "0.877 ± 0.012"
    assert study_module._cell_text({**value, "n": 2}, False, 3) == "0.877 ± 0.012 (n=2)"
    rate = {"mean": 0.05, "std": 0.01, "n": 1}
    assert study_module._cell_text(rate, True, 3) == "5.0 % (n=1)"
    assert study_module._cell_text(None, True, 3) == "—"
