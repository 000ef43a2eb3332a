"""The synthetic demo data root: SIIM's layout, label counts, determinism and image content."""

from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest

from ssl_ptx.data import demo, rle
from ssl_ptx.data._phantom import lung_masks, render_chest_xray, sample_anatomy

DEMO_SIZE = 128  # conftest's demo_root: 48 images at 128², seed 0


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
            assert np.median(pixels[mask]) > 30
            ys, xs = np.nonzero(mask)
            assert ys.min() > 0 and xs.min() > 0 and xs.max() < DEMO_SIZE - 1


def test_summary_counts_match_the_files(tmp_path: Path) -> None:
    summary = demo.write_demo_root(tmp_path, n_siim=20, size=64, seed=5, progress=False)
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
    kwargs = dict(n_siim=12, size=64, progress=False)
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
    demo.write_demo_root(tmp_path, n_siim=8, size=64, seed=1, progress=False)
    demo.write_demo_root(tmp_path, n_siim=3, size=64, seed=2, progress=False)
    assert len(_dicom_files(tmp_path)) == 3
    assert len(_csv_rows(tmp_path)) >= 3

    real = tmp_path / "real"
    (real / "siim").mkdir(parents=True)
    (real / "siim" / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    with pytest.raises(FileExistsError, match="not a demo folder"):
        demo.write_demo_root(real, n_siim=3, size=64, progress=False)
    assert (real / "siim" / "train-rle.csv").read_text() == "ImageId, EncodedPixels\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(size=32), "size must be between 64 and 1024"),
        (dict(size=2048), "size must be between 64 and 1024"),
        (dict(n_siim=0), "n_siim must be at least 1"),
        (dict(positive_fraction=1.5), "positive_fraction"),
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
    monkeypatch.setattr(demo, "_xrv_siim_csv", lambda: None)
    summary = demo.write_demo_root(tmp_path, n_siim=24, size=64, seed=0, progress=False)
    assert summary.positives == round(24 * 0.22)
    assert summary.multi_instance_images >= 1
    for codes in _instances_by_image(tmp_path).values():
        assert all(code.strip() == "-1" or rle.area(code) > 0 for code in codes)


def test_command_line_writes_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    summary = demo.main(
        ["--root", str(tmp_path), "--n-siim", "6", "--size", "64", "--seed", "2", "--no-progress"]
    )
    out = capsys.readouterr().out
    assert summary.images == len(_dicom_files(tmp_path)) == 6
    assert f"wrote 6 SIIM images ({summary.positives} with pneumothorax" in out
    assert str(summary.csv) in out


def test_command_line_reports_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--root", str(tmp_path), "--size", "32", "--no-progress"])
    assert exit_info.value.code == 2
    assert "size must be between 64 and 1024 pixels, got 32" in capsys.readouterr().err
