"""The NIH ChestX-ray14 reader: the real label and box files, a tiny root, bad input."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from external_data import nih
from external_data.__main__ import main
from ssl_ptx.data.cache import build_cache
from ssl_ptx.data.images import read_image

HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
HEADER_2020 = HEADER_2017.rstrip(",")
HEADER_QUOTED = HEADER_2020.replace("OriginalImage[Width,Height]", '"OriginalImage[Width,Height]"')

#: (folder, Image Index, Finding Labels, View Position)
IMAGES = [
    ("images_001/images", "00000001_000.png", "Cardiomegaly", "PA"),
    ("images_001/images", "00000001_001.png", "Pneumothorax|Effusion", "AP"),
    ("images_001/images", "00000002_000.png", "No Finding", "PA"),
    ("images_002/images", "00000003_000.png", "Effusion|Pneumothorax", "AP"),
    ("images_002/images", "00000004_000.png", "Pneumonia", "PA"),
    ("images", "00000005_000.png", "No Finding", "AP"),
]


def _entry(image_id: str, findings: str, view: str, age: str = "58", end: str = "") -> str:
    patient = str(int(image_id[:8]))
    return f"{image_id},{findings},0,{patient},{age},M,{view},2682,2749,0.143,0.143{end}"


def _write_entries(path: Path, header: str = HEADER_2020, ages=None, end: str = "") -> Path:
    ages = ages or ["58"] * len(IMAGES)
    rows = [_entry(i, f, v, a, end) for (_, i, f, v), a in zip(IMAGES, ages, strict=True)]
    text = "\n".join([header, *rows]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def _write_root(root: Path) -> Path:
    """Six 8×8 grey PNGs across images_001/images, images_002/images and images/."""
    for k, (folder, image_id, _, _) in enumerate(IMAGES):
        (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 30 * k, np.uint8)).save(root / folder / image_id)
    _write_entries(root / "Data_Entry_2017.csv", HEADER_2017, end=",")
    return root


def test_real_data_entry_v2020(xrv_data_dir):
    labels = nih.read_labels(xrv_data_dir / "Data_Entry_2017_v2020.csv.gz")
    assert len(labels) == 112_120
    assert labels["label"].sum() == 5_302
    assert labels["no_finding"].sum() == 60_361
    assert labels["view"].value_counts().to_dict() == {"PA": 67_310, "AP": 44_810}
    first = labels.iloc[0]
    assert first["image_id"] == "00000001_000.png"
    assert (first["original_width"], first["original_height"]) == (2682, 2749)
    assert first["pixel_spacing_x"] == pytest.approx(0.143)
    assert (first["patient_id"], first["age"], first["sex"]) == ("1", 57.0, "M")
    assert labels["image_id"].is_unique


def test_real_bbox_list(xrv_data_dir):
    boxes = nih.read_bbox(xrv_data_dir / "BBox_List_2017.csv.gz")
    assert len(boxes) == 984
    assert (boxes["finding_label"] == "Pneumothorax").sum() == 98
    assert list(boxes.columns) == ["image_id", "finding_label", "x", "y", "w", "h", "line"]
    first = boxes.iloc[0]
    assert first["image_id"] == "00013118_008.png"
    np.testing.assert_allclose(
        first[["x", "y", "w", "h"]].to_numpy(float),
        [225.0847, 547.0192, 86.7797, 79.1864],
        atol=1e-3,
    )


@pytest.mark.parametrize(
    ("header", "end"), [(HEADER_2017, ","), (HEADER_2020, ""), (HEADER_QUOTED, "")]
)
def test_header_variants_read_alike(tmp_path, header, end):
    labels = nih.read_labels(_write_entries(tmp_path / "entries.csv", header, end=end))
    assert labels["image_id"].tolist() == [image_id for _, image_id, _, _ in IMAGES]
    np.testing.assert_array_equal(labels["label"], [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(labels["no_finding"], [0, 0, 1, 0, 0, 1])
    assert (labels["original_width"] == 2682).all() and (labels["original_height"] == 2749).all()
    assert (labels["pixel_spacing_y"] == 0.143).all()
    assert labels["line"].tolist() == [2, 3, 4, 5, 6, 7]


def test_label_means_the_whole_finding_name(tmp_path):
    """Only the finding "Pneumothorax" counts, not a finding that merely contains the word."""
    path = tmp_path / "entries.csv"
    path.write_text(
        HEADER_2020
        + "\n"
        + _entry("00000001_000.png", "Hydropneumothorax", "PA")
        + "\n"
        + _entry("00000001_001.png", "Atelectasis|Pneumothorax", "PA")
        + "\n"
    )
    np.testing.assert_array_equal(nih.read_labels(path)["label"], [0.0, 1.0])


def test_age_with_year_suffix(tmp_path):
    ages = ["058Y", "7", "", "061y", "40", "90"]
    labels = nih.read_labels(_write_entries(tmp_path / "entries.csv", ages=ages))
    np.testing.assert_array_equal(labels["age"], [58, 7, np.nan, 61, 40, 90])


def test_load_tiny_root(tmp_path):
    root = _write_root(tmp_path / "nih")
    (root / "_truth").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "_truth" / "00000001_000.png")
    manifest = nih.load(root)
    assert manifest["image_id"].tolist() == [image_id for _, image_id, _, _ in IMAGES]
    np.testing.assert_array_equal(manifest["label"], [0, 1, 0, 1, 0, 0])
    assert manifest["view"].tolist() == [view for *_, view in IMAGES]
    assert manifest["patient_id"].tolist() == ["1", "1", "2", "3", "4", "5"]
    assert (manifest["source"] == "nih").all() and (manifest["fold"] == -1).all()
    assert (manifest["height"] == 0).all() and (manifest["width"] == 0).all()
    for row, (folder, image_id, _, _) in zip(manifest.itertuples(), IMAGES, strict=True):
        assert Path(row.path) == (root / folder / image_id).absolute()
    assert manifest.attrs["missing"] == manifest.attrs["unlisted"] == []
    assert manifest.attrs["label_csv"] == str(root / "Data_Entry_2017.csv")


def test_missing_and_unlisted_images_are_reported(tmp_path, caplog):
    root = _write_root(tmp_path)
    (root / "images_002/images/00000004_000.png").unlink()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images_002/images/00000099_000.png")
    with caplog.at_level(logging.WARNING, logger="external_data.nih"):
        manifest = nih.load(root)
    assert manifest.attrs["missing"] == ["00000004_000.png"]
    assert manifest.attrs["unlisted"] == ["00000099_000.png"]
    assert len(manifest) == 5
    assert "1 image(s) of" in caplog.text and "00000004_000.png" in caplog.text
    assert "1 PNG(s) under" in caplog.text and "00000099_000.png" in caplog.text


def test_exclude_ids_from_list_or_file(tmp_path, caplog):
    root = _write_root(tmp_path)
    excluded = ["00000001_001.png", "00000003_000.png"]
    with caplog.at_level(logging.INFO, logger="external_data.nih"):
        from_list = nih.load(root, exclude_ids=[*excluded, "99999999_000.png"])
    assert "excluded 2 of 3 listed id(s)" in caplog.text
    id_file = tmp_path / "siim_valid_ids.txt"
    id_file.write_text("\n".join(["", *excluded, "  "]) + "\n")
    from_file = nih.load(root, exclude_ids=id_file)
    for manifest in (from_list, from_file):
        assert manifest.attrs["excluded"] == excluded
        assert not set(excluded) & set(manifest["image_id"])
        assert len(manifest) == 4 and manifest["label"].sum() == 0


def test_missing_label_column_names_file_and_column(tmp_path):
    path = tmp_path / "Data_Entry_2017.csv"
    _write_entries(path, HEADER_2020.replace("Finding Labels", "Findings"))
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv, line 1: .*\['Finding Labels'\]"):
        nih.read_labels(path)
    box_path = tmp_path / "BBox_List_2017.csv"
    box_path.write_text(
        "Image Index,Finding Label,Box [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,4\n"
    )
    with pytest.raises(ValueError, match=r"BBox_List_2017\.csv, line 1: .*'Bbox\[x\]'"):
        nih.read_bbox(box_path)


def test_bad_values_name_the_line(tmp_path):
    path = _write_entries(tmp_path / "entries.csv")
    lines = path.read_text().splitlines()
    lines[3] = lines[3].replace("2682", "wide")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"line 4: OriginalImage\[Width\] 'wide' is not a finite"):
        nih.read_labels(path)
    lines[3] = _entry("00000002_000.png", "", "PA")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"entries\.csv, line 4: blank Finding Labels"):
        nih.read_labels(path)
    box_path = tmp_path / "boxes.csv"
    box_path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,\n"
    )
    with pytest.raises(ValueError, match=r"boxes\.csv, line 2: blank Bbox\[h\]"):
        nih.read_bbox(box_path)


def test_rgba_and_16_bit_pngs_are_read_as_grey(tmp_path):
    root = _write_root(tmp_path)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 200, 100, 50, 128
    Image.fromarray(rgba, "RGBA").save(root / "images_001/images/00000001_000.png")
    deep = np.tile(np.linspace(1000, 4000, 8, dtype=np.uint16), (8, 1))
    Image.fromarray(deep).save(root / "images_002/images/00000004_000.png")
    rows = nih.load(root).set_index("image_id")
    grey = read_image(rows.at["00000001_000.png", "path"])
    assert grey.dtype == np.uint8 and grey.shape == (8, 8)
    assert (grey == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)).all()  # alpha dropped
    stretched = read_image(rows.at["00000004_000.png", "path"])
    assert stretched.dtype == np.uint8 and stretched.shape == (8, 8)
    assert stretched[0, 0] == 0 and stretched[0, -1] == 255
    assert (np.diff(stretched[0].astype(int)) > 0).all()


def test_unreadable_image_is_skipped_by_the_cache(tmp_path):
    root = _write_root(tmp_path)
    broken = root / "images_002/images/00000003_000.png"
    broken.write_bytes(broken.read_bytes()[:30])
    report = build_cache(nih.load(root), tmp_path / "nih.h5", size=8, progress=False)
    assert report.n_written == 5
    assert [(entry.image_id, entry.path) for entry in report.skipped] == [
        ("00000003_000.png", str(broken.absolute()))
    ]
    assert pd.read_csv(tmp_path / "nih.h5.skipped.csv")["image_id"].tolist() == ["00000003_000.png"]


def test_label_csv_search(tmp_path):
    with pytest.raises(FileNotFoundError, match="no NIH label file"):
        nih.find_label_csv(tmp_path)
    nested = _write_entries(tmp_path / "meta" / "Data_Entry_2017_v2020.csv.gz")
    assert nih.find_label_csv(tmp_path) == nested
    _write_entries(tmp_path / "meta" / "Data_Entry_2017.csv")
    with pytest.raises(ValueError, match="several NIH label files"):
        nih.find_label_csv(tmp_path)
    top = _write_entries(tmp_path / "Data_Entry_2017.csv")
    assert nih.find_label_csv(tmp_path) == top


def test_same_image_name_in_two_folders_is_refused(tmp_path):
    root = _write_root(tmp_path)
    (root / "images_003/images").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images_003/images/00000002_000.png")
    with pytest.raises(ValueError, match="two NIH images named 00000002_000.png"):
        nih.load(root)


def test_command_prints_counts(tmp_path, capsys):
    root = _write_root(tmp_path / "nih")
    (root / "images_001/images/00000001_000.png").unlink()
    exclusion = tmp_path / "exclude.txt"
    exclusion.write_text("00000003_000.png\n")
    argv = ["--nih-dir", str(root), "--nih-exclude", str(exclusion)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "images listed 6 | found 4 | missing 1 | excluded 1 | PNGs not listed 0" in out
    assert "Pneumothorax: positive 1 | negative 3" in out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "Data_Entry_2017.csv").write_text(HEADER_2020 + "\n")
    assert main(["--nih-dir", str(empty)]) == 1
    assert "error: no NIH image was found" in capsys.readouterr().out


@pytest.fixture(scope="module")
def nih_demo(tmp_path_factory):
    """A demo root with a 40-image NIH part (and the one SIIM image the demo requires)."""
    from ssl_ptx.data.demo import write_demo_root

    root = tmp_path_factory.mktemp("demo")
    summary = write_demo_root(
        root, n_siim=1, n_chexpert=0, n_nih=40, n_montgomery=0, size=64, progress=False
    )
    return summary, pd.read_csv(summary.truth_csv, dtype=str, keep_default_na=False)


def test_demo_root_reads_as_written(nih_demo):
    summary, truth = nih_demo
    manifest = nih.load(summary.nih.folder)
    assert len(manifest) == summary.nih.images == 40
    assert manifest.attrs["missing"] == manifest.attrs["unlisted"] == []
    truth = truth[truth["dataset"] == "nih"].set_index("image_id").loc[manifest["image_id"]]
    np.testing.assert_array_equal(manifest["label"], truth["published_label"].astype(float))
    assert manifest["label"].sum() == summary.nih.published_positives
    root = summary.root.resolve()
    for row, relative in zip(manifest.itertuples(), truth["path"], strict=True):
        assert Path(row.path).resolve() == root / relative
        assert (root / "_truth" / "nih" / row.image_id).is_file()
        image = read_image(row.path)  # the demo's RGBA and 16-bit PNGs included
        assert image.dtype == np.uint8 and image.shape == (64, 64)
