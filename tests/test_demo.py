"""The synthetic demo data root: SIIM's layout, label counts, determinism and image content."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from ssl_ptx.data import demo, rle
from ssl_ptx.data._phantom import (
    chest_frame,
    lateral_lung_mask,
    lung_masks,
    render_chest_xray,
    render_lateral_xray,
    sample_anatomy,
)

DEMO_SIZE = 128  # conftest's demo_root: 48 images at 128², seed 0
SIIM_ONLY = dict(n_chexpert=0, n_nih=0, n_montgomery=0)


def _dicom_files(root: Path) -> list[Path]:
    return sorted((root / "siim" / "dicom-images-train").rglob("*.dcm"))


def _csv_rows(root: Path) -> list[tuple[str, str]]:
    """(ImageId, raw value) per data row, split on the first comma, spaces kept."""
    lines = (root / "siim" / "train-rle.csv").read_text().splitlines()
    return [tuple(line.split(",", 1)) for line in lines[1:]]


def _instances_by_image(root: Path) -> dict[str, list[str]]:
    table = pd.read_csv(root / "siim" / "train-rle.csv")
    return table.groupby("ImageId", sort=False)[" EncodedPixels"].agg(list).to_dict()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_files_follow_siim_layout(demo_root: Path) -> None:
    files = _dicom_files(demo_root)
    assert len(files) == 48
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        series_dir, study_dir = path.parent, path.parent.parent
        assert path.stem == ds.SOPInstanceUID
        assert series_dir.name == ds.SeriesInstanceUID
        assert study_dir.name == ds.StudyInstanceUID
        assert study_dir.parent == demo_root / "siim" / "dicom-images-train"


def test_csv_has_stage1_header_and_spaced_values(demo_root: Path) -> None:
    header = (demo_root / "siim" / "train-rle.csv").read_text().splitlines()[0]
    assert header == "ImageId, EncodedPixels"
    rows = _csv_rows(demo_root)
    assert {value for _, value in rows if value.strip() == "-1"} == {" -1"}
    assert all(
        value.startswith(" ") and value[1:2].isdigit() for _, value in rows if value != " -1"
    )
    assert {image_id for image_id, _ in rows} == {p.stem for p in _dicom_files(demo_root)}


def test_label_counts_match_the_real_data(demo_root: Path) -> None:
    instances = _instances_by_image(demo_root)
    positive = {k: v for k, v in instances.items() if v[0].strip() != "-1"}
    assert len(instances) == 48
    assert abs(len(positive) / 48 - 0.22) <= 0.03
    assert all(len(v) == 1 for k, v in instances.items() if k not in positive)
    multi = [v for v in positive.values() if len(v) > 1]
    assert multi, "expected at least one image with several instance rows"
    overlapping = [v for v in multi if (sum(rle.decode(c, (DEMO_SIZE,) * 2) for c in v) > 1).any()]
    assert overlapping, "expected at least one image whose instances overlap"


def _brighter_than_outside_air(image: np.ndarray, mask: np.ndarray) -> bool:
    """A pneumothorax is air inside the chest: darker than the lung around it but, seen through
    the chest wall, brighter than the air outside the body (the image's darkest 5 %)."""
    return bool(np.median(image[mask]) > np.percentile(image, 5) + 3)


def test_instance_rows_decode_to_nonempty_masks_inside_the_chest(demo_root: Path) -> None:
    paths = {p.stem: p for p in _dicom_files(demo_root)}
    for image_id, codes in _instances_by_image(demo_root).items():
        if codes[0].strip() == "-1":
            continue
        pixels = pydicom.dcmread(paths[image_id]).pixel_array
        for code in codes:
            mask = rle.decode(code, (DEMO_SIZE, DEMO_SIZE)).astype(bool)
            assert mask.sum() >= 6
            # inside the body (not the black air around it) and away from the image border
            assert _brighter_than_outside_air(pixels, mask)
            ys, xs = np.nonzero(mask)
            assert ys.min() > 0 and xs.min() > 0 and xs.max() < DEMO_SIZE - 1


def test_summary_counts_match_the_files(tmp_path: Path) -> None:
    summary = demo.write_demo_root(
        tmp_path, n_siim=20, size=64, seed=5, progress=False, **SIIM_ONLY
    )
    instances = _instances_by_image(tmp_path)
    assert summary.csv == tmp_path / "siim" / "train-rle.csv"
    assert summary.images == len(_dicom_files(tmp_path)) == 20
    assert summary.rows == sum(len(v) for v in instances.values())
    assert summary.positives == sum(v[0].strip() != "-1" for v in instances.values())
    assert summary.multi_instance_images == sum(len(v) > 1 for v in instances.values())


def test_pixels_and_tags_are_siim_like(demo_root: Path) -> None:
    ds = pydicom.dcmread(_dicom_files(demo_root)[0])
    pixels = ds.pixel_array
    assert pixels.dtype == np.uint8
    assert pixels.shape == (DEMO_SIZE, DEMO_SIZE)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert (ds.Modality, ds.PhotometricInterpretation, ds.BodyPartExamined) == (
        "CR",
        "MONOCHROME2",
        "CHEST",
    )
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (8, 8, 7, 0)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.143 * 1024 / DEMO_SIZE] * 2)
    assert ds.PatientID == ds.PatientName and len(ds.PatientID) == 36
    assert str(ds.PatientAge).isdigit()
    views = {
        pydicom.dcmread(p, stop_before_pixels=True).ViewPosition for p in _dicom_files(demo_root)
    }
    assert views == {"PA", "AP"}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = dict(n_siim=12, size=64, progress=False, **SIIM_ONLY)
    digests = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        demo.write_demo_root(tmp_path / name, seed=seed, **kwargs)
        digests.append(_tree_digest(tmp_path / name))
    assert digests[0] == digests[1]
    assert len(digests[0]) == 12 + 2  # images, train-rle.csv, marker
    assert not set(digests[0].values()) & set(digests[2].values()) - {
        digests[0]["siim/ssl_ptx_demo.json"]
    }


def test_overwrite_removes_stale_images_and_spares_real_data(tmp_path: Path) -> None:
    demo.write_demo_root(tmp_path, n_siim=8, size=64, seed=1, progress=False, **SIIM_ONLY)
    demo.write_demo_root(tmp_path, n_siim=3, size=64, seed=2, progress=False, **SIIM_ONLY)
    assert len(_dicom_files(tmp_path)) == 3
    assert len(_csv_rows(tmp_path)) >= 3

    real = tmp_path / "real"
    (real / "siim").mkdir(parents=True)
    (real / "siim" / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        demo.write_demo_root(real, n_siim=3, size=64, progress=False, **SIIM_ONLY)
    assert (real / "siim" / "train-rle.csv").read_text() == "ImageId, EncodedPixels\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=32), "size must be between 64 and 1024"),
        (dict(size=2048), "size must be between 64 and 1024"),
        (dict(n_siim=0), "n_siim must be at least 1"),
        (dict(positive_fraction=1.5), "positive_fraction"),
        (dict(n_nih=-1), "n_nih must be 0"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        demo.write_demo_root(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "siim").exists()


def _lateral_crescent(lung: np.ndarray, shift: int) -> np.ndarray:
    """The part of ``lung`` not covered by itself moved ``shift`` px toward the image centre."""
    moved = np.zeros_like(lung)
    moved[shift:, shift:] = lung[:-shift, :-shift]
    return lung & (1 - moved)


def _high_pass(image: np.ndarray) -> np.ndarray:
    pixels = image.astype(np.float32)
    return pixels - cv2.GaussianBlur(pixels, (0, 0), 1.5)


@pytest.mark.parametrize("seed", range(4))
def test_pneumothorax_is_darker_and_loses_lung_texture(seed: int) -> None:
    size = 128
    anatomy = sample_anatomy(np.random.default_rng(seed))
    left, right = lung_masks(anatomy, size)
    ptx = _lateral_crescent(left, 10)
    plain = render_chest_xray(np.random.default_rng(100 + seed), size, anatomy=anatomy)
    sick = render_chest_xray(
        np.random.default_rng(100 + seed), size, anatomy=anatomy, pneumothorax=ptx
    )
    kernel = np.ones((3, 3), np.uint8)
    core = cv2.erode(ptx, kernel, iterations=2).astype(bool)
    far = ~cv2.dilate(ptx, kernel, iterations=3).astype(bool)
    # the same place in the other lung: the ribs and noise match, the lung texture is intact
    mirrored = np.roll(core[:, ::-1], round((2 * anatomy.midline - 1) * size), axis=1)
    mirrored &= cv2.erode(right, kernel, iterations=2).astype(bool)

    assert sick[core].mean() < plain[core].mean() - 3
    texture = _high_pass(sick)[core].std()
    assert texture < 0.92 * _high_pass(plain)[core].std()
    assert texture < 0.92 * _high_pass(sick)[mirrored].std()
    # outside its neighbourhood the image is untouched
    assert np.array_equal(sick[far], plain[far])


def test_pneumothorax_outside_the_lungs_is_not_drawn() -> None:
    size = 96
    anatomy = sample_anatomy(np.random.default_rng(0))
    left, right = lung_masks(anatomy, size)
    outside = (1 - (left | right)).astype(np.uint8)
    outside = cv2.erode(outside, np.ones((5, 5), np.uint8))
    plain = render_chest_xray(np.random.default_rng(1), size, anatomy=anatomy)
    sick = render_chest_xray(np.random.default_rng(1), size, anatomy=anatomy, pneumothorax=outside)
    assert np.array_equal(plain, sick)


def test_lung_masks_are_two_separate_fields_with_the_heart_on_the_image_right() -> None:
    anatomy = sample_anatomy(np.random.default_rng(3))
    left, right = lung_masks(anatomy, 256)
    for lung in (left, right):
        assert lung.dtype == np.uint8 and set(np.unique(lung)) == {0, 1}
        assert cv2.connectedComponents(lung)[0] == 2  # background + one field
    assert not (left & right).any()
    assert np.nonzero(left)[1].max() < np.nonzero(right)[1].min()
    # the heart takes room from the image-right (patient-left) lung
    assert right.sum() < left.sum()


def test_images_look_like_radiographs() -> None:
    size = 128
    anatomy = sample_anatomy(np.random.default_rng(7))
    left, right = lung_masks(anatomy, size)
    image = render_chest_xray(np.random.default_rng(8), size, anatomy=anatomy).astype(float)
    lungs = (left | right).astype(bool)
    corner_air = image[: size // 16, : size // 16].mean()
    spine_column = image[size // 2 :, round(anatomy.midline * size)].mean()
    assert corner_air < 40  # air outside the body is dark
    assert image[lungs].mean() < spine_column - 30  # aerated lung is darker than mediastinum
    assert image[lungs].mean() > corner_air + 20  # but brighter than free air


def test_real_shapes_keep_their_instance_count(siim_rle_csv: Path) -> None:
    rng = np.random.default_rng(0)
    singles = demo.real_siim_shapes(siim_rle_csv, rng, 128, multi=False)
    multis = demo.real_siim_shapes(siim_rle_csv, rng, 128, multi=True)
    for _ in range(5):
        single, multi = next(singles), next(multis)
        assert len(single) == 1 and len(multi) >= 1
        for mask in single + multi:
            assert mask.shape == (128, 128) and mask.dtype == np.uint8 and mask.any()
    assert max(len(next(multis)) for _ in range(10)) >= 2


def test_parametric_fallback_without_torchxrayvision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "xrv_siim_csv", lambda: None)
    summary = demo.write_demo_root(
        tmp_path, n_siim=24, n_chexpert=6, n_nih=6, n_montgomery=0, size=64, progress=False
    )
    assert summary.positives == round(24 * 0.22)
    assert summary.multi_instance_images >= 1
    for codes in _instances_by_image(tmp_path).values():
        assert all(code.strip() == "-1" or rle.area(code) > 0 for code in codes)
    marker = (tmp_path / "chexpert" / demo.MARKER_NAME).read_text()
    assert '"shapes": "parametric"' in marker


def test_command_line_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--root", str(tmp_path), "--n-siim", "6", "--size", "64", "--seed", "2"]
    args += ["--n-chexpert", "5", "--n-nih", "0", "--n-montgomery", "2", "--no-progress"]
    summary = demo.main(args)
    out = capsys.readouterr().out
    assert summary.images == len(_dicom_files(tmp_path)) == 6
    assert f"wrote 6 SIIM images ({summary.positives} with pneumothorax" in out
    assert str(summary.csv) in out
    assert summary.chexpert is not None and summary.chexpert.images == 5
    assert f"wrote 5 CheXpert images ({summary.chexpert.published_positives} labelled" in out
    assert summary.nih is None and not (tmp_path / "nih").exists() and "NIH" not in out
    assert summary.montgomery is not None and summary.montgomery.images == 2
    assert str(summary.truth_csv) in out


def test_command_line_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--root", str(tmp_path), "--size", "32", "--no-progress"])
    assert exit_info.value.code == 2
    assert "size must be between 64 and 1024 pixels, got 32" in capsys.readouterr().err


# --- the external parts: CheXpert, NIH ChestX-ray14, Montgomery ---------------------------------

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,"
    "Lung Opacity,Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,"
    "Pleural Effusion,Pleural Other,Fracture,Support Devices"
)
NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
CHEXPERT_PATH = re.compile(
    r"CheXpert-v1\.0-small/(train|valid)/patient\d{5}/study\d+/view\d+_(frontal|lateral)\.jpg"
)
EXTERNAL = dict(n_chexpert=40, n_nih=40, n_montgomery=6)
CHEXPERT_SHAPE = (156, 128)  # 128 wide, 128·390/320 tall


@pytest.fixture(scope="module")
def external_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, demo.DemoSummary]:
    """A small root with every external part, at 128 px."""
    root = tmp_path_factory.mktemp("external_root")
    summary = demo.write_demo_root(root, n_siim=2, size=128, seed=0, progress=False, **EXTERNAL)
    return root, summary


@pytest.fixture(scope="module")
def medium_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough external images at 64 px for label frequencies to be measured."""
    root = tmp_path_factory.mktemp("medium_root")
    demo.write_demo_root(
        root, n_siim=1, n_chexpert=300, n_nih=500, n_montgomery=40, size=64, progress=False
    )
    return root


def _chexpert_tables(root: Path) -> dict[str, pd.DataFrame]:
    folder = root / "chexpert" / "CheXpert-v1.0-small"
    return {
        split: pd.read_csv(folder / f"{split}.csv", dtype=str, keep_default_na=False)
        for split in ("train", "valid")
    }


def _truth(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "_truth" / "labels.csv", dtype=str, keep_default_na=False)


def _read_any(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image


def test_chexpert_follows_the_published_layout(external_root) -> None:
    root, summary = external_root
    folder = root / "chexpert"
    for split in ("train", "valid"):
        header = (folder / "CheXpert-v1.0-small" / f"{split}.csv").read_text().splitlines()[0]
        assert header == CHEXPERT_HEADER
    tables = _chexpert_tables(root)
    rows = pd.concat(tables.values())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))
    assert sorted(rows["Path"]) == on_disk
    assert len(on_disk) == summary.chexpert.images == 40
    assert len(tables["valid"]) >= 1 and len(tables["train"]) > len(tables["valid"])
    for split, table in tables.items():
        for path in table["Path"]:
            match = CHEXPERT_PATH.fullmatch(path)
            assert match and match[1] == split, path
    assert set(rows["Sex"]) <= {"Male", "Female"}
    assert rows["Age"].str.fullmatch(r"\d+").all()
    lateral = rows["Path"].str.endswith("_lateral.jpg")
    assert lateral.any() and not lateral.all()
    assert (rows["Frontal/Lateral"] == np.where(lateral, "Lateral", "Frontal")).all()
    assert (rows.loc[lateral, "AP/PA"] == "").all()
    assert set(rows.loc[~lateral, "AP/PA"]) == {"AP", "PA"}
    findings = CHEXPERT_HEADER.split(",")[5:]
    assert set(np.unique(tables["train"][findings])) == {"1.0", "0.0", "-1.0", ""}
    assert set(np.unique(tables["valid"][findings])) == {"1.0", "0.0"}
    # a study's views share its labels, as in the real file
    study = rows["Path"].str.rsplit("/", n=1).str[0]
    assert (rows.groupby(study)[findings].nunique() == 1).all().all()
    image = _read_any(folder / on_disk[0])
    assert image.dtype == np.uint8 and image.shape == CHEXPERT_SHAPE


def test_nih_follows_the_published_layout(external_root) -> None:
    root, summary = external_root
    folder = root / "nih"
    lines = (folder / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER
    assert all(line.count(",") == 11 and line.endswith(",") for line in lines[1:])
    table = pd.read_csv(folder / "Data_Entry_2017.csv")
    assert table.columns[7:].tolist() == [
        "OriginalImage[Width",
        "Height]",
        "OriginalImagePixelSpacing[x",
        "y]",
        "Unnamed: 11",
    ]
    assert table["Unnamed: 11"].isna().all()
    assert table["Height]"].between(2000, 3100).all() and table["y]"].between(0.1, 0.2).all()
    images = sorted(folder.glob("images_*/images/*.png"))
    assert len(images) == len(table) == summary.nih.images == 40
    assert {p.parents[1].name for p in images} == {"images_001", "images_002"}
    assert sorted(p.name for p in images) == sorted(table["Image Index"])
    assert table["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    expected = (
        table["Patient ID"].map("{:08d}".format) + "_" + table["Follow-up #"].map("{:03d}".format)
    )
    assert (expected + ".png" == table["Image Index"]).all()
    labels = table["Finding Labels"].str.split("|")
    assert all(parts == sorted(parts) for parts in labels)
    assert all(parts == ["No Finding"] or "No Finding" not in parts for parts in labels)
    assert set(table["View Position"]) == {"PA", "AP"}
    assert set(table["Patient Gender"]) <= {"M", "F"}
    lists = [
        (folder / name).read_text().split() for name in ("train_val_list.txt", "test_list.txt")
    ]
    assert sorted(lists[0] + lists[1]) == sorted(table["Image Index"])
    box_lines = (folder / "BBox_List_2017.csv").read_text().splitlines()
    assert box_lines[0] == "Image Index,Finding Label,Bbox [x,y,w,h],,,"
    assert all(line.count(",") == 5 for line in box_lines[1:])


def test_nih_boxes_frame_the_true_masks(medium_root: Path) -> None:
    boxes = pd.read_csv(medium_root / "nih" / "BBox_List_2017.csv")
    assert boxes.columns[:6].tolist() == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    assert set(boxes["Finding Label"]) >= {"Pneumothorax"}
    assert "Infiltration" not in set(boxes["Finding Label"])  # the box list says "Infiltrate"
    entries = pd.read_csv(medium_root / "nih" / "Data_Entry_2017.csv").set_index("Image Index")
    for row in boxes.itertuples(index=False):
        assert row[1] in entries.loc[row[0], "Finding Labels"].replace("Infiltration", "Infiltrate")
        x, y, w, h = (float(v) for v in row[2:6])
        assert x >= 0 and y >= 0 and x + w <= 64 and y + h <= 64
        if row[1] == "Pneumothorax":
            mask = cv2.imread(str(medium_root / "_truth" / "nih" / row[0]), cv2.IMREAD_GRAYSCALE)
            ys, xs = np.nonzero(mask)
            assert (x, y, w, h) == (xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1)


def test_nih_has_rgba_and_16_bit_pngs_of_the_same_grey_image(external_root) -> None:
    root, _ = external_root
    kinds: dict[str, list[np.ndarray]] = {"rgba": [], "16-bit": [], "grey": []}
    for path in sorted((root / "nih").glob("images_*/images/*.png")):
        image = _read_any(path)
        if image.ndim == 3:
            assert image.shape[2] == 4 and image.dtype == np.uint8
            assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
            assert (image[..., 3] == 255).all()
            kinds["rgba"].append(image)
        elif image.dtype == np.uint16:
            assert (image % 257 == 0).all()
            kinds["16-bit"].append(image)
        else:
            assert image.dtype == np.uint8
            kinds["grey"].append(image)
    assert len(kinds["rgba"]) == 2 and len(kinds["16-bit"]) == 1 and len(kinds["grey"]) == 37
    assert all(image.shape[:2] == (128, 128) for group in kinds.values() for image in group)


def test_montgomery_follows_the_published_layout(external_root) -> None:
    root, summary = external_root
    folder = root / "montgomery" / "MontgomerySet"
    names = sorted(p.name for p in (folder / "CXR_png").glob("*.png"))
    assert len(names) == summary.montgomery.images == 6
    assert all(re.fullmatch(r"MCUCXR_\d{4}_[01]\.png", name) for name in names)
    assert summary.montgomery.published_positives == sum(n.endswith("_1.png") for n in names)
    for side in ("leftMask", "rightMask"):
        assert sorted(p.name for p in (folder / "ManualMask" / side).glob("*.png")) == names
    readings = sorted((folder / "ClinicalReadings").glob("*.txt"))
    assert [p.stem for p in readings] == [Path(n).stem for n in names]
    for path in readings:
        sex, age, reading = path.read_text().splitlines()
        assert re.fullmatch(r"Patient's Sex: [MF]", sex)
        assert re.fullmatch(r"Patient's Age: \d{3}Y", age)
        assert (reading == "normal") == path.stem.endswith("_0")


def test_montgomery_masks_are_binary_lungs_on_the_right_sides(external_root) -> None:
    root, _ = external_root
    folder = root / "montgomery" / "MontgomerySet"
    shapes = set()
    for path in sorted((folder / "CXR_png").glob("*.png")):
        image = _read_any(path)
        assert image.dtype == np.uint8 and image.ndim == 2
        height, width = image.shape
        shapes.add("portrait" if height > width else "landscape")
        assert max(height, width) == round(128 * 4892 / 4020) and min(height, width) == 128
        left, right = (
            _read_any(folder / "ManualMask" / side / path.name)
            for side in ("leftMask", "rightMask")
        )
        for mask in (left, right):
            assert mask.shape == image.shape and set(np.unique(mask)) == {0, 255}
            assert cv2.connectedComponents(mask)[0] == 2
            ys, xs = np.nonzero(mask)
            assert ys.min() > 0 and xs.min() > 0 and ys.max() < height - 1 and xs.max() < width - 1
        assert not (left & right).any()
        # PA film: the patient's left lung is on the image's right
        assert np.nonzero(left)[1].min() > np.nonzero(right)[1].max()
        # the masked lungs are darker than the mediastinum between them
        lungs = (left | right) > 0
        between = image[:, np.nonzero(right)[1].max() + 2 : np.nonzero(left)[1].min() - 1]
        assert image[lungs].mean() < between.mean() - 10
    assert "portrait" in shapes


def test_truth_masks_cover_every_external_image(external_root) -> None:
    root, _ = external_root
    truth = _truth(root)
    assert truth.columns.tolist() == [
        "dataset",
        "image_id",
        "path",
        "published_label",
        "true_label",
        "mask_area",
    ]
    listed = {(root / p).resolve() for p in truth["path"]}
    written = set((root / "chexpert").rglob("*.jpg")) | set((root / "nih").rglob("*.png"))
    assert listed == {p.resolve() for p in written}
    chexpert = pd.concat(_chexpert_tables(root).values()).set_index("Path")["Pneumothorax"]
    nih = pd.read_csv(root / "nih" / "Data_Entry_2017.csv").set_index("Image Index")
    for row in truth.itertuples(index=False):
        mask_path = root / "_truth" / row.dataset / f"{row.image_id.removesuffix('.png')}.png"
        mask = _read_any(mask_path)
        image = _read_any(root / row.path)
        assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
        assert set(np.unique(mask)) <= {0, 255}
        assert int(row.mask_area) == np.count_nonzero(mask)
        assert row.true_label == str(int(np.count_nonzero(mask) > 0))
        if row.dataset == "chexpert":
            relative = Path(row.path).relative_to("chexpert").as_posix()
            assert row.published_label == chexpert[relative]
            split_and_id = relative.split("/", 2)[2].removesuffix(".jpg").replace("/", "_")
            assert row.image_id == split_and_id
        else:
            mentions = "Pneumothorax" in nih.loc[row.image_id, "Finding Labels"]
            assert row.published_label == ("1.0" if mentions else "0.0")
            assert Path(row.path).name == row.image_id
        if row.true_label == "1" and image.ndim == 2 and image.dtype == np.uint8:
            assert _brighter_than_outside_air(image, mask > 0)  # inside the body


def _share(flags: pd.Series) -> float:
    return float(flags.mean())


def test_label_frequencies_follow_the_real_files(medium_root: Path) -> None:
    train = _chexpert_tables(medium_root)["train"]
    frontal = train[train["Frontal/Lateral"] == "Frontal"]["Pneumothorax"]
    carried = frontal[frontal != ""]
    assert _share(frontal != "") == pytest.approx(0.357, abs=0.04)
    assert _share(carried == "1.0") == pytest.approx(0.26, abs=0.05)
    assert _share(carried == "-1.0") == pytest.approx(0.04, abs=0.03)
    assert _share(train["Frontal/Lateral"] == "Lateral") == pytest.approx(0.15, abs=0.06)
    assert _share(train.loc[train["AP/PA"] != "", "AP/PA"] == "AP") == pytest.approx(
        0.846, abs=0.07
    )
    # No Finding never sits beside a positive or uncertain pneumothorax
    assert not ((train["No Finding"] == "1.0") & train["Pneumothorax"].isin(["1.0", "-1.0"])).any()
    nih = pd.read_csv(medium_root / "nih" / "Data_Entry_2017.csv")
    assert _share(nih["Finding Labels"].str.contains("Pneumothorax")) == pytest.approx(
        0.047, abs=0.004
    )
    assert _share(nih["Finding Labels"] == "No Finding") == pytest.approx(0.5, abs=0.08)
    montgomery = list((medium_root / "montgomery" / "MontgomerySet" / "CXR_png").glob("*.png"))
    assert _share(pd.Series([p.stem.endswith("_1") for p in montgomery])) == pytest.approx(
        0.42, abs=0.02
    )


def _disagreement(truth: pd.DataFrame, dataset: str, published: str) -> float:
    rows = truth[(truth["dataset"] == dataset) & (truth["published_label"] == published)]
    rows = rows[~rows["path"].str.contains("/valid/")]
    expected_true = "1" if published == "1.0" else "0"
    return _share(rows["true_label"] != expected_true)


def test_published_labels_are_noisy_like_the_real_ones(medium_root: Path) -> None:
    truth = _truth(medium_root)
    chexpert_missed = _disagreement(truth, "chexpert", "1.0")
    chexpert_hidden = _disagreement(truth, "chexpert", "0.0")
    nih_missed, nih_hidden = (_disagreement(truth, "nih", label) for label in ("1.0", "0.0"))
    assert 0.02 <= chexpert_missed <= 0.13
    assert 0.01 <= chexpert_hidden <= 0.04
    assert 0.1 <= nih_missed <= 0.22
    assert 0.03 <= nih_hidden <= 0.05
    assert nih_missed > chexpert_missed and nih_hidden > chexpert_hidden
    for hidden_mix in ("-1.0", ""):
        share = _share(
            truth.loc[
                (truth["dataset"] == "chexpert") & (truth["published_label"] == hidden_mix),
                "true_label",
            ]
            == "1"
        )
        assert 0.0 < share < 0.7
    valid = truth[truth["path"].str.contains("/valid/")]
    assert (
        valid["true_label"] == (valid["published_label"] == "1.0").astype(int).astype(str)
    ).all()


def test_lateral_films_are_not_frontal(external_root) -> None:
    root, _ = external_root
    truth = _truth(root)
    lateral = truth[truth["image_id"].str.endswith("_lateral")]
    assert len(lateral) >= 1
    anatomy = sample_anatomy(np.random.default_rng(5))
    lung = lateral_lung_mask(anatomy, CHEXPERT_SHAPE)
    assert cv2.connectedComponents(lung)[0] == 2  # one field: both lungs superimposed
    frontal = render_chest_xray(np.random.default_rng(6), CHEXPERT_SHAPE, anatomy=anatomy)
    side_view = render_lateral_xray(np.random.default_rng(6), CHEXPERT_SHAPE, anatomy=anatomy)
    # the midline: the bright mediastinum between two lungs on a frontal film, lung (air)
    # between sternum and spine on a lateral one
    left, right = lung_masks(anatomy, CHEXPERT_SHAPE)
    rows = np.flatnonzero((left | right).any(axis=1))
    upper = slice(rows[0] + len(rows) // 5, rows[0] + len(rows) // 2)
    midline = round(anatomy.midline * CHEXPERT_SHAPE[1])
    frontal_lungs = frontal[(left | right) > 0].mean()
    assert frontal[upper, midline].mean() > frontal_lungs + 30
    assert side_view[upper, midline].mean() < side_view[lung > 0].mean() + 10


def test_non_square_images_put_the_chest_in_the_centred_square() -> None:
    anatomy = sample_anatomy(np.random.default_rng(2))
    side, top, left = chest_frame((150, 100))
    assert (side, top, left) == (100, 25, 0)
    square = lung_masks(anatomy, 100)
    for tall, small in zip(lung_masks(anatomy, (150, 100)), square, strict=True):
        assert np.array_equal(tall[top : top + side], small)
        assert not tall[:top].any() and not tall[top + side :].any()
    for wide, small in zip(lung_masks(anatomy, (100, 150)), square, strict=True):
        assert np.array_equal(wide[:, 25:125], small)
    rng_args = dict(anatomy=anatomy, drain=True)
    assert np.array_equal(
        render_chest_xray(np.random.default_rng(3), 96, **rng_args),
        render_chest_xray(np.random.default_rng(3), (96, 96), **rng_args),
    )


def test_each_part_has_its_own_seed_stream(tmp_path: Path) -> None:
    small = dict(n_siim=3, size=64, seed=7, progress=False)
    demo.write_demo_root(tmp_path / "a", n_chexpert=8, n_nih=8, n_montgomery=2, **small)
    demo.write_demo_root(tmp_path / "b", n_chexpert=8, n_nih=8, n_montgomery=2, **small)
    demo.write_demo_root(tmp_path / "c", n_chexpert=8, n_nih=3, n_montgomery=0, **small)
    demo.write_demo_root(tmp_path / "d", **SIIM_ONLY, **small)
    a, b, c, d = (_tree_digest(tmp_path / name) for name in "abcd")
    assert a == b

    def part(digests: dict[str, str], prefix: str) -> dict[str, str]:
        return {k: v for k, v in digests.items() if k.startswith(prefix)}

    assert part(a, "siim/") == part(c, "siim/") == part(d, "siim/")
    assert part(a, "chexpert/") == part(c, "chexpert/")
    assert part(a, "_truth/chexpert/") == part(c, "_truth/chexpert/")
    assert part(a, "nih/") != part(c, "nih/")
    assert not part(c, "montgomery/") and not part(d, "_truth/")


def test_disabled_parts_are_removed_and_real_folders_refused(tmp_path: Path) -> None:
    small = dict(n_siim=2, size=64, progress=False)
    demo.write_demo_root(tmp_path, n_chexpert=4, n_nih=4, n_montgomery=1, **small)
    summary = demo.write_demo_root(tmp_path, n_chexpert=4, n_nih=0, n_montgomery=0, **small)
    assert summary.nih is None and summary.montgomery is None
    assert not (tmp_path / "nih").exists() and not (tmp_path / "montgomery").exists()
    assert set(_truth(tmp_path)["dataset"]) == {"chexpert"}
    assert not (tmp_path / "_truth" / "nih").exists()

    real = tmp_path / "real"
    (real / "nih").mkdir(parents=True)
    (real / "nih" / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n")
    with pytest.raises(FileExistsError, match="real nih download"):
        demo.write_demo_root(real, n_chexpert=2, n_nih=2, n_montgomery=0, **small)
    assert sorted(p.name for p in real.iterdir()) == ["nih"]  # nothing written before the check
    assert (real / "nih" / "Data_Entry_2017.csv").read_text() == NIH_HEADER + "\n"
    # a real folder of a part that is left out is not touched either
    summary = demo.write_demo_root(real, n_chexpert=2, n_nih=0, n_montgomery=0, **small)
    assert (real / "nih" / "Data_Entry_2017.csv").is_file() and summary.chexpert.images == 2
