"""The SIIM reader: label files as published, folds, and a DICOM root into a manifest."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ssl_ptx.data import rle
from ssl_ptx.data.manifest import MANIFEST_COLUMNS
from ssl_ptx.data.siim import (
    find_dicoms,
    find_label_csv,
    load_siim,
    main,
    make_folds,
    read_rle_csv,
)

SHAPE = (64, 64)


def _box(top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[top : top + height, left : left + width] = 1
    return mask


@pytest.fixture
def instances() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two overlapping instances of one image and a single instance of another."""
    return _box(10, 10, 20, 8), _box(25, 12, 15, 10), _box(40, 40, 5, 5)


def _write(path: Path, header: str, rows: list[tuple[str, str]], sep: str) -> Path:
    path.write_text("\n".join([header] + [f"{image}{sep}{code}" for image, code in rows]) + "\n")
    return path


def _rows(instances) -> list[tuple[str, str]]:
    a, b, c = instances
    return [
        ("img.neg", "-1"),
        ("img.multi", rle.encode(a)),
        ("img.one", rle.encode(c)),
        ("img.multi", rle.encode(b)),
    ]


@pytest.mark.parametrize(
    ("header", "sep"), [("ImageId, EncodedPixels", ", "), ("ImageId,EncodedPixels", ",")]
)
def test_read_rle_csv_both_headers(tmp_path, instances, header, sep):
    table = read_rle_csv(_write(tmp_path / "labels.csv", header, _rows(instances), sep), SHAPE)
    assert table["image_id"].tolist() == ["img.neg", "img.multi", "img.one"]
    assert table["rle"].iat[0] == "-1"
    assert table["n_instances"].tolist() == [0, 2, 1]
    assert table["label"].tolist() == [0, 1, 1]
    assert table["rle"].iat[2] == rle.encode(instances[2])  # a single row passes through


def test_union_of_overlapping_instances_is_their_or(tmp_path, instances):
    a, b, _ = instances
    assert (a & b).any()
    path = _write(tmp_path / "labels.csv", "ImageId,EncodedPixels", _rows(instances), ",")
    row = read_rle_csv(path, SHAPE).set_index("image_id").loc["img.multi"]
    np.testing.assert_array_equal(rle.decode(row["rle"], SHAPE), a | b)
    assert row["mask_area"] == (a | b).sum() < a.sum() + b.sum()


def test_union_does_not_depend_on_the_merge_shape(tmp_path, instances):
    path = _write(tmp_path / "labels.csv", "ImageId,EncodedPixels", _rows(instances), ",")
    pd.testing.assert_frame_equal(read_rle_csv(path, SHAPE), read_rle_csv(path, (1024, 1024)))


def test_real_siim_label_file(siim_rle_csv):
    table = read_rle_csv(siim_rle_csv)
    assert len(table) == 12_047
    assert table["image_id"].is_unique
    assert table["label"].sum() == 2_669
    assert (table["n_instances"] > 1).sum() == 624
    counts = table.loc[table["label"] == 1, "n_instances"].value_counts().to_dict()
    assert counts == {1: 2045, 2: 447, 3: 112, 4: 40, 5: 18, 6: 3, 7: 1, 8: 2, 10: 1}
    # instances overlap in 183 of the 624 multi-row images: there the union is smaller
    rows = pd.read_csv(siim_rle_csv)
    rows.columns = ["image_id", "code"]
    rows = rows[rows["code"].str.strip() != "-1"]
    summed = rows["code"].map(rle.area).groupby(rows["image_id"]).sum()
    multi = table[table["n_instances"] > 1].set_index("image_id")["mask_area"]
    assert (multi < summed[multi.index]).sum() == 183


def test_malformed_rle_names_the_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageId, EncodedPixels\na, -1\n\nb, 10 5 7\nc, -1\n")
    with pytest.raises(ValueError, match=r"labels\.csv, line 4: malformed") as info:
        read_rle_csv(path)
    assert "b" in str(info.value)


def test_empty_and_positive_rows_of_one_image_name_both_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageId,EncodedPixels\na,-1\nb,3 4\nb,-1\n")
    with pytest.raises(ValueError, match=r"line 4.*line 3") as info:
        read_rle_csv(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Image,EncodedPixels\na,-1\n", r"line 1: missing column\(s\) \['ImageId'\]"),
        ("ImageId,EncodedPixels\na,-1\nb,\n", "line 3: empty EncodedPixels"),
        ("ImageId,EncodedPixels\n,-1\n", "line 2: empty ImageId"),
        ("ImageId,EncodedPixels\na,0 10\na,4000 200\n", "lines 2, 3: .*do not fit"),
    ],
)
def test_bad_label_files_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        read_rle_csv(path, SHAPE)
    assert str(path) in str(info.value)


def test_duplicate_empty_rows_count_once(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("ImageId,EncodedPixels\na,-1\na, -1\n")
    table = read_rle_csv(path)
    assert table[["image_id", "rle", "n_instances", "label"]].values.tolist() == [["a", "-1", 0, 0]]


def test_make_folds_is_stratified_and_deterministic():
    rng = np.random.default_rng(0)
    areas = np.where(rng.random(1000) < 0.22, rng.lognormal(9, 1, 1000), 0.0)
    folds = make_folds(areas, n_folds=5, seed=3)
    np.testing.assert_array_equal(folds, make_folds(areas, n_folds=5, seed=3))
    assert not np.array_equal(folds, make_folds(areas, n_folds=5, seed=4))
    assert np.ptp(np.bincount(folds, minlength=5)) <= 1
    positive = areas > 0
    assert np.ptp(np.bincount(folds[positive], minlength=5)) <= 1
    edges = np.quantile(areas[positive], [0.25, 0.5, 0.75])
    bins = np.searchsorted(edges, areas[positive], side="right")
    for b in range(4):  # each area quartile is spread evenly too
        assert np.ptp(np.bincount(folds[positive][bins == b], minlength=5)) <= 1


def test_make_folds_labels_nan_and_errors():
    labels = np.array([1, 0, 0, 1, np.nan, 0, 1, 0, 0, 0])
    folds = make_folds(labels, n_folds=3)
    assert folds[4] == -1
    assert sorted(np.bincount(folds[labels == 1], minlength=3)) == [1, 1, 1]
    with pytest.raises(ValueError, match="negative"):
        make_folds([3.0, -1.0])
    with pytest.raises(ValueError, match="n_folds"):
        make_folds([1, 0], n_folds=1)


def _demo_rows(siim: Path) -> pd.DataFrame:
    """The demo's label file read independently: stripped ImageId / code per row."""
    rows = pd.read_csv(siim / "train-rle.csv", dtype=str)
    rows.columns = ["image_id", "code"]
    return rows.apply(lambda column: column.str.strip())


def test_load_siim_on_the_demo_root(demo_root):
    siim = demo_root / "siim"
    manifest = load_siim(siim, progress=False)
    rows = _demo_rows(siim)
    positive_ids = set(rows.loc[rows["code"] != "-1", "image_id"])

    assert list(manifest.columns[: len(MANIFEST_COLUMNS)]) == list(MANIFEST_COLUMNS)
    assert len(manifest) == rows["image_id"].nunique() == 48
    assert set(manifest.loc[manifest["label"] == 1, "image_id"]) == positive_ids
    assert (manifest["source"] == "siim").all()
    assert (manifest[["height", "width"]] == 128).all().all()
    assert set(manifest["view"]) <= {"PA", "AP"} and manifest["patient_id"].str.len().min() > 0
    assert all(
        Path(p).is_file() and Path(p).stem == i for p, i in manifest[["path", "image_id"]].values
    )
    assert manifest.attrs == {"missing_dicom": [], "unlabelled_dicom": []}

    by_id = manifest.set_index("image_id")
    for image_id, codes in rows[rows["code"] != "-1"].groupby("image_id")["code"]:
        union = np.bitwise_or.reduce([rle.decode(code, (128, 128)) for code in codes])
        np.testing.assert_array_equal(rle.decode(by_id.at[image_id, "rle"], (128, 128)), union)
        assert by_id.at[image_id, "mask_area"] == union.sum() > 0
    assert (manifest.loc[manifest["label"] == 0, "mask_area"] == 0).all()
    assert (manifest["n_instances"] > 1).sum() == rows.groupby("image_id").size().gt(1).sum()

    assert sorted(manifest["fold"].unique()) == [0, 1, 2, 3, 4]
    overall = manifest["label"].mean()
    for fold, rate in manifest.groupby("fold")["label"].mean().items():
        assert abs(rate - overall) <= 0.10, (fold, rate, overall)


@pytest.fixture
def demo_copy(demo_root, tmp_path) -> Path:
    return Path(shutil.copytree(demo_root / "siim", tmp_path / "siim"))


def test_missing_and_extra_dicoms_are_reported_not_fatal(demo_copy, caplog):
    complete = load_siim(demo_copy, progress=False)
    dicoms = sorted(demo_copy.rglob("*.dcm"))
    removed = dicoms[3]
    removed.unlink()
    extra = demo_copy / "dicom-images-test" / "1.2.3.extra.dcm"
    extra.parent.mkdir()
    shutil.copy(dicoms[5], extra)

    with caplog.at_level(logging.WARNING, logger="ssl_ptx.data.siim"):
        manifest = load_siim(demo_copy, progress=False)
    assert manifest.attrs["missing_dicom"] == [removed.stem]
    assert manifest.attrs["unlabelled_dicom"] == ["1.2.3.extra"]
    assert set(manifest["image_id"]) == set(complete["image_id"]) - {removed.stem}
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert f"1 image(s) of {demo_copy / 'train-rle.csv'} have no DICOM" in messages
    assert removed.stem in messages and "1.2.3.extra" in messages
    # folds come from the label file, so the other images keep theirs
    kept = complete.set_index("image_id")["fold"].drop(removed.stem)
    pd.testing.assert_series_equal(manifest.set_index("image_id")["fold"], kept)

    with_unlabelled = load_siim(demo_copy, keep_unlabelled=True, progress=False)
    row = with_unlabelled.set_index("image_id").loc["1.2.3.extra"]
    assert np.isnan(row["label"]) and pd.isna(row["rle"])
    assert (row["fold"], row["mask_area"], row["height"]) == (-1, -1, 128)


def test_rle_past_the_dicom_is_an_error(demo_copy):
    csv_path = demo_copy / "train-rle.csv"
    lines = csv_path.read_text().splitlines()
    image_id = lines[1].split(",")[0]
    lines[1] = f"{image_id}, {128 * 128 - 10} 20"
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"{image_id} ends at pixel {128 * 128 + 10}"):
        load_siim(demo_copy, progress=False)


def test_label_csv_is_found_in_subfolders_and_ambiguity_is_an_error(tmp_path):
    (tmp_path / "labels").mkdir()
    stage2 = tmp_path / "labels" / "stage_2_train.csv"
    stage2.write_text("ImageId,EncodedPixels\n")
    assert find_label_csv(tmp_path) == stage2
    (tmp_path / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    assert find_label_csv(tmp_path) == tmp_path / "train-rle.csv"  # the root comes first
    (tmp_path / "stage_2_train.csv").write_text("ImageId,EncodedPixels\n")
    with pytest.raises(ValueError, match="several SIIM label files"):
        find_label_csv(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no SIIM label file"):
        find_label_csv(tmp_path / "empty")


def test_find_dicoms_recursive_and_duplicate_stems(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "b" / "1.2.dcm").write_bytes(b"x")
    (tmp_path / "c" / "3.4.DCM").write_bytes(b"x")
    (tmp_path / "c" / "._3.4.dcm").write_bytes(b"x")  # macOS resource fork: skipped
    (tmp_path / "c" / "notes.txt").write_bytes(b"x")
    assert find_dicoms(tmp_path) == {
        "1.2": tmp_path / "a" / "b" / "1.2.dcm",
        "3.4": tmp_path / "c" / "3.4.DCM",
    }
    (tmp_path / "c" / "1.2.dcm").write_bytes(b"x")
    with pytest.raises(ValueError, match="1.2") as info:
        find_dicoms(tmp_path)
    assert "a/b/1.2.dcm" in str(info.value) and "c/1.2.dcm" in str(info.value)


def test_command_line_writes_the_manifest(demo_root, tmp_path, capsys):
    out = tmp_path / "out" / "manifest.csv"
    assert main([str(demo_root / "siim"), "--out", str(out), "--folds", "4", "--no-progress"]) == 0
    written = pd.read_csv(out, dtype={"rle": str})
    assert len(written) == 48 and sorted(written["fold"].unique()) == [0, 1, 2, 3]
    assert [p.name for p in out.parent.iterdir()] == ["manifest.csv"]  # no temporary left
    printed = capsys.readouterr().out
    assert "wrote 48 images" in printed and "fold 3" in printed
