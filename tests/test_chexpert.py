"""The CheXpert reader: the real label file, a tiny root in the published layout, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from external_data import chexpert
from external_data.__main__ import main
from ssl_ptx.data.cache import build_cache
from ssl_ptx.data.images import read_image
from ssl_ptx.data.manifest import MANIFEST_COLUMNS

HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
N_OBSERVATIONS = 14
PNEUMOTHORAX = HEADER.split(",").index("Pneumothorax") - 5  # among the observations


def _row(path: str, pneumothorax: str, view: str = "AP", sex: str = "Female", age: str = "60"):
    """One CSV line; ``view`` "lateral" makes a lateral row (blank AP/PA)."""
    observations = [""] * N_OBSERVATIONS
    observations[PNEUMOTHORAX] = pneumothorax
    frontal = "Lateral" if view == "lateral" else "Frontal"
    ap_pa = "" if view == "lateral" else view
    return ",".join([path, sex, age, frontal, ap_pa, *observations])


#: (split, patient, study, view file, pneumothorax value, view)
IMAGES = [
    ("train", "patient00001", "study1", "view1_frontal", "1.0", "AP"),
    ("train", "patient00001", "study1", "view2_lateral", "1.0", "lateral"),
    ("train", "patient00002", "study1", "view1_frontal", "0.0", "PA"),
    ("train", "patient00002", "study2", "view1_frontal", "-1.0", "AP"),
    ("train", "patient00003", "study1", "view1_frontal", "", "AP"),
    ("valid", "patient64541", "study1", "view1_frontal", "0.0", "PA"),
]


def _write_root(base: Path, folder: str = "CheXpert-v1.0-small") -> Path:
    """A tiny CheXpert download under ``base``: 8×8 JPEGs and both label files."""
    dataset = base / folder
    lines: dict[str, list[str]] = {"train": [HEADER], "valid": [HEADER]}
    for k, (split, patient, study, view_file, value, view) in enumerate(IMAGES):
        relative = f"{split}/{patient}/{study}/{view_file}.jpg"
        (dataset / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 20 * k, np.uint8)).save(dataset / relative)
        lines[split].append(_row(f"CheXpert-v1.0-small/{relative}", value, view))
    for split, text in lines.items():
        (dataset / f"{split}.csv").write_text("\n".join(text) + "\n")
    return base


def _write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_real_train_csv_frontal_counts(xrv_data_dir):
    labels = chexpert.read_labels(xrv_data_dir / "chexpert_train.csv.gz")
    assert len(labels) == 191_027
    counts = labels["label"].value_counts(dropna=False)
    assert counts[1.0] == 17_693
    assert counts[0.0] == 47_823
    assert counts[-1.0] == 2_708
    assert labels["label"].isna().sum() == 122_803
    assert labels["image_id"].is_unique
    first = labels.iloc[0]
    assert first["image_id"] == "patient00001_study1_view1_frontal"
    assert (first["study_id"], first["patient_id"], first["split"]) == (
        "patient00001_study1",
        "patient00001",
        "train",
    )
    assert (first["sex"], first["age"], first["view"]) == ("F", 68.0, "AP")
    assert set(labels["view"]) <= {"AP", "PA", "LL", "RL", ""}


def test_read_labels_all_views(tmp_path):
    csv_path = _write_root(tmp_path) / "CheXpert-v1.0-small" / "train.csv"
    labels = chexpert.read_labels(csv_path, frontal_only=False)
    assert len(labels) == 5
    lateral = labels.set_index("image_id").loc["patient00001_study1_view2_lateral"]
    assert (lateral["view"], lateral["frontal_lateral"], lateral["ap_pa"]) == ("LL", "Lateral", "")
    assert labels["line"].tolist() == [2, 3, 4, 5, 6]
    frontal = chexpert.read_labels(csv_path)
    assert "patient00001_study1_view2_lateral" not in set(frontal["image_id"])
    np.testing.assert_array_equal(frontal["label"], [1.0, 0.0, -1.0, np.nan])


@pytest.mark.parametrize("inner", [False, True], ids=["parent", "dataset-folder"])
def test_load_tiny_root(tmp_path, inner):
    base = _write_root(tmp_path)
    manifest = chexpert.load(base / "CheXpert-v1.0-small" if inner else base, progress=False)
    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert manifest["image_id"].tolist() == [
        "patient00001_study1_view1_frontal",
        "patient00002_study1_view1_frontal",
        "patient00002_study2_view1_frontal",
        "patient00003_study1_view1_frontal",
        "patient64541_study1_view1_frontal",
    ]
    np.testing.assert_array_equal(manifest["label"], [1.0, 0.0, -1.0, np.nan, 0.0])
    assert manifest["split"].tolist() == ["train"] * 4 + ["valid"]
    assert manifest["view"].tolist() == ["AP", "PA", "AP", "AP", "PA"]
    assert (manifest["source"] == "chexpert").all()
    assert (manifest["fold"] == -1).all() and (manifest["mask_area"] == -1).all()
    assert (manifest["height"] == 0).all() and manifest["rle"].isna().all()
    assert manifest.attrs["missing"] == []
    for row in manifest.itertuples():
        assert Path(row.path).is_absolute()
        assert read_image(row.path).shape == (8, 8)


def test_load_full_size_and_renamed_folder(tmp_path):
    """Paths resolve inside the folder the CSV is in, whatever that folder is called."""
    full = chexpert.load(_write_root(tmp_path / "a", "CheXpert-v1.0"), progress=False)
    renamed = chexpert.load(_write_root(tmp_path / "b", "my_chexpert") / "my_chexpert")
    assert len(full) == len(renamed) == 5
    assert all(Path(p).is_file() for p in [*full["path"], *renamed["path"]])


def test_load_splits_and_views(tmp_path):
    base = _write_root(tmp_path)
    assert len(chexpert.load(base, splits=("valid",), progress=False)) == 1
    every_view = chexpert.load(base, frontal_only=False, progress=False)
    assert len(every_view) == 6
    with pytest.raises(ValueError, match="unknown CheXpert split"):
        chexpert.load(base, splits=("test",))


def test_missing_image_is_reported_and_dropped(tmp_path, caplog):
    base = _write_root(tmp_path)
    (base / "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="external_data.chexpert"):
        manifest = chexpert.load(base, progress=False)
    assert manifest.attrs["missing"] == ["patient00002_study1_view1_frontal"]
    assert "patient00002_study1_view1_frontal" not in set(manifest["image_id"])
    assert len(manifest) == 4
    assert "1 image(s) listed in" in caplog.text
    assert "patient00002/study1/view1_frontal.jpg" in caplog.text
    unchecked = chexpert.load(base, check_files=False)
    assert len(unchecked) == 5 and unchecked.attrs["missing"] == []


def test_missing_label_column_names_file_and_column(tmp_path):
    header = HEADER.replace(",Pneumothorax,", ",Pneumo,")
    csv_path = _write_csv(tmp_path / "train.csv", [], header)
    with pytest.raises(
        ValueError, match=r"train\.csv, line 1: missing column\(s\) \['Pneumothorax'\]"
    ):
        chexpert.read_labels(csv_path)


@pytest.mark.parametrize(
    "path",
    [
        "CheXpert-v1.0-small/train/../../../secret/x/view1_frontal.jpg",
        "../CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg",
        "/etc/CheXpert-v1.0-small/patient1/study1/view1_frontal.jpg",
        "C:/CheXpert-v1.0-small/patient1/study1/view1_frontal.jpg",
        "CheXpert-v1.0-small\\train\\..\\..\\x\\view1_frontal.jpg",
    ],
)
def test_path_escaping_the_root_is_refused(tmp_path, path):
    good = _row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "1.0")
    csv_path = _write_csv(tmp_path / "train.csv", [good, _row(path, "0.0")])
    with pytest.raises(ValueError, match=r"train\.csv, line 3: Path .* leaves the dataset folder"):
        chexpert.read_labels(csv_path)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("CheXpert-v1.0-small/train/patient1/view1_frontal.jpg", "1.0", "is not <dataset folder>"),
        ("CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg", "2.0", "is not 1.0, 0.0"),
        ("CheXpert-v1.0-small/train/patient1/study1/view1_frontal.jpg", "yes", "not a finite"),
    ],
)
def test_malformed_rows_name_the_line(tmp_path, path, value, message):
    csv_path = _write_csv(tmp_path / "valid.csv", ["", _row(path, value)])
    with pytest.raises(ValueError, match=rf"valid\.csv, line 3: .*{message}"):
        chexpert.read_labels(csv_path)


def test_duplicate_image_is_refused(tmp_path):
    base = _write_root(tmp_path)
    train = base / "CheXpert-v1.0-small" / "train.csv"
    train.write_text(train.read_text() + train.read_text().splitlines()[1] + "\n")
    with pytest.raises(ValueError, match="duplicated image_id 'patient00001_study1_view1_frontal'"):
        chexpert.load(base, progress=False)


def test_root_without_dataset_or_with_both(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CheXpert dataset found"):
        chexpert.load(tmp_path)
    _write_root(tmp_path, "CheXpert-v1.0-small")
    _write_root(tmp_path, "CheXpert-v1.0")
    with pytest.raises(ValueError, match="holds both"):
        chexpert.load(tmp_path)


def test_unreadable_image_is_skipped_by_the_cache(tmp_path):
    base = _write_root(tmp_path)
    broken = base / "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg"
    broken.write_bytes(broken.read_bytes()[:40])
    manifest = chexpert.load(base, progress=False)
    assert len(manifest) == 5  # the file exists; whether it decodes is the cache's business
    report = build_cache(manifest, tmp_path / "cache.h5", size=16, progress=False)
    assert report.n_written == 4
    assert [entry.image_id for entry in report.skipped] == ["patient00003_study1_view1_frontal"]
    skipped = pd.read_csv(tmp_path / "cache.h5.skipped.csv")
    assert skipped["image_id"].tolist() == ["patient00003_study1_view1_frontal"]


def test_header_only_label_file_gives_no_rows(tmp_path):
    base = _write_root(tmp_path)
    (base / "CheXpert-v1.0-small" / "valid.csv").write_text(HEADER + "\n")
    manifest = chexpert.load(base, progress=False)
    assert manifest["split"].tolist() == ["train"] * 4
    assert chexpert.load(base, splits=("valid",), progress=False).empty


def test_command_prints_counts(tmp_path, capsys):
    base = _write_root(tmp_path)
    (base / "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg").unlink()
    assert main(["--chexpert-dir", str(base), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images listed 5 | found 4 | missing 1" in out
    assert "Pneumothorax: positive 1 | negative 2 | uncertain 1 | blank 0" in out
    assert main(["--chexpert-dir", str(base), "--chexpert-all-views", "--no-progress"]) == 0
    assert "images listed 6 | found 5 | missing 1" in capsys.readouterr().out
    assert main(["--chexpert-dir", str(tmp_path / "elsewhere")]) == 1
    assert "CheXpert: error:" in capsys.readouterr().out


@pytest.fixture(scope="module")
def chexpert_demo(tmp_path_factory):
    """A demo root with a 40-image CheXpert part (and the one SIIM image the demo requires)."""
    from ssl_ptx.data.demo import write_demo_root

    root = tmp_path_factory.mktemp("demo")
    summary = write_demo_root(
        root, n_siim=1, n_chexpert=40, n_nih=0, n_montgomery=0, size=64, progress=False
    )
    return summary, pd.read_csv(summary.truth_csv, dtype=str, keep_default_na=False)


def test_demo_root_reads_as_written(chexpert_demo):
    summary, truth = chexpert_demo
    manifest = chexpert.load(summary.chexpert.folder, frontal_only=False, progress=False)
    assert len(manifest) == summary.chexpert.images == 40
    truth = truth[truth["dataset"] == "chexpert"].set_index("image_id").loc[manifest["image_id"]]
    published = truth["published_label"].replace("", np.nan).astype(float).to_numpy()
    np.testing.assert_array_equal(manifest["label"].to_numpy(), published)
    assert (manifest["label"] == 1).sum() == summary.chexpert.published_positives
    root = summary.root.resolve()
    for row, relative in zip(manifest.itertuples(), truth["path"], strict=True):
        assert Path(row.path).resolve() == root / relative
        assert (root / "_truth" / "chexpert" / f"{row.image_id}.png").is_file()
        assert "_truth" not in Path(row.path).parts
    frontal = chexpert.load(summary.chexpert.folder, progress=False)
    assert set(frontal["image_id"]) == {i for i in manifest["image_id"] if "frontal" in i}
