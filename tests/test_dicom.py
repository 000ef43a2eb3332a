"""DICOM reading: display convention, LUTs, compression, metadata and errors."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ssl_ptx.data.dicom import METADATA_KEYS, DicomError, read_dicom, read_dicom_metadata
from ssl_ptx.data.images import read_image


def _dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 8) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.set_pixel_data(pixels, photometric, bits)
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def pixels8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)


def test_8bit_monochrome2_is_pixel_array_unchanged(tmp_path, pixels8):
    path = _save(_dataset(pixels8), tmp_path / "a.dcm")
    image, metadata = read_dicom(path)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, pixels8)
    np.testing.assert_array_equal(image, pydicom.dcmread(path).pixel_array)
    assert tuple(metadata) == METADATA_KEYS
    assert (metadata["Rows"], metadata["Columns"]) == (40, 30)


def test_identity_rescale_keeps_the_8bit_values(tmp_path, pixels8):
    ds = _dataset(pixels8)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    image, _ = read_dicom(_save(ds, tmp_path / "a.dcm"))
    np.testing.assert_array_equal(image, pixels8)


def test_monochrome1_is_inverted(tmp_path, pixels8):
    image, _ = read_dicom(_save(_dataset(pixels8, "MONOCHROME1"), tmp_path / "m1.dcm"))
    np.testing.assert_array_equal(image, 255 - pixels8)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((values - (center - width / 2)) / width * 255, 0, 255)


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_16bit_signed_rescale_then_window(tmp_path, photometric):
    raw = np.random.default_rng(1).integers(-600, 900, (32, 32)).astype(np.int16)
    ds = _dataset(raw, photometric, 16)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1024
    ds.WindowCenter, ds.WindowWidth = -300, 1200
    image, _ = read_dicom(_save(ds, tmp_path / "w.dcm"))
    expected = _linear_window(raw * 2.0 - 1024, -300, 1200)
    if photometric == "MONOCHROME1":
        expected = 255 - expected
    assert image.dtype == np.uint8
    assert np.abs(image.astype(float) - expected).max() <= 1.0
    assert image.min() == 0 if photometric == "MONOCHROME2" else image.max() == 255


def test_12bit_without_lut_is_stretched_min_max(tmp_path):
    raw = np.random.default_rng(2).integers(700, 3100, (24, 20)).astype(np.uint16)
    image, _ = read_dicom(_save(_dataset(raw, bits=12), tmp_path / "b12.dcm"))
    expected = (raw - raw.min()) / (raw.max() - raw.min()) * 255
    assert np.abs(image.astype(float) - expected).max() <= 0.5
    assert (image.min(), image.max()) == (0, 255)


def test_voi_lut_sequence_is_applied_and_stretched_over_its_entries(tmp_path):
    raw = np.arange(256, dtype=np.uint16).reshape(16, 16)
    ds = _dataset(raw, bits=12)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.add_new(0x00283006, "US", [1000 + 2 * i for i in range(128)] + [1256] * 128)
    ds.VOILUTSequence = [lut]
    image, _ = read_dicom(_save(ds, tmp_path / "voi.dcm"))
    entries = np.array(lut.LUTData, float)
    expected = (entries[raw] - entries.min()) / (entries.max() - entries.min()) * 255
    assert np.abs(image - expected).max() <= 0.5


def test_jpeg_baseline_decodes_close_to_the_original(tmp_path):
    yy, xx = np.mgrid[0:64, 0:48]
    original = (2 * yy + xx + 40).astype(np.uint8)  # smooth: JPEG keeps it well
    buffer = io.BytesIO()
    Image.fromarray(original).save(buffer, format="JPEG", quality=95)
    ds = _dataset(original)
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    image, _ = read_dicom(_save(ds, tmp_path / "jpeg.dcm"))
    error = np.abs(image.astype(int) - original)
    assert error.mean() < 1.5 and error.max() <= 8


def test_multi_frame_returns_the_first_frame(tmp_path):
    frames = np.stack([np.full((8, 6), value, np.uint8) for value in (10, 200, 90)])
    frames[0, 0, 0] = 0
    ds = _dataset(frames)
    assert int(ds.NumberOfFrames) == 3
    image, _ = read_dicom(_save(ds, tmp_path / "multi.dcm"))
    np.testing.assert_array_equal(image, frames[0])


def test_rgb_is_reduced_to_luma(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    image, _ = read_dicom(_save(_dataset(rgb, "RGB"), tmp_path / "rgb.dcm"))
    expected = rgb @ np.array([0.299, 0.587, 0.114])
    assert image.shape == (10, 12)
    assert np.abs(image - expected).max() <= 0.5


def test_metadata_reads_tags_without_pixels_or_warnings(tmp_path, pixels8):
    ds = _dataset(pixels8)
    ds.PatientID = "patient-7"
    ds.ViewPosition = "PA"
    ds.PatientSex = "F"
    ds.PixelSpacing = [0.168, 0.143]
    # SIIM's bare-number age, invalid for VR AS
    ds.add(DataElement(0x00101010, "AS", "38", validation_mode=config.IGNORE))
    path = _save(ds, tmp_path / "tags.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metadata = read_dicom_metadata(path)
        _, from_image = read_dicom(path)
    assert metadata == from_image
    assert metadata["PatientID"] == "patient-7"
    assert metadata["ViewPosition"] == "PA"
    assert metadata["PatientSex"] == "F"
    assert metadata["PatientAge"] == "38"
    assert metadata["PixelSpacing"] == (0.168, 0.143)
    assert metadata["PhotometricInterpretation"] == "MONOCHROME2"
    assert metadata["SOPInstanceUID"] == ds.SOPInstanceUID


def test_metadata_of_missing_tags_is_empty(tmp_path, pixels8):
    metadata = read_dicom_metadata(_save(_dataset(pixels8), tmp_path / "bare.dcm"))
    assert metadata["PatientID"] == metadata["ViewPosition"] == metadata["PatientAge"] == ""
    assert metadata["PixelSpacing"] is None


def test_random_bytes_are_not_a_dicom(tmp_path):
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(4).bytes(2000))
    with pytest.raises(DicomError, match="not a DICOM") as info:
        read_dicom(path)
    assert str(path) in str(info.value)
    with pytest.raises(DicomError, match="noise.dcm"):
        read_dicom_metadata(path)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_raises_dicom_error(tmp_path, pixels8, keep):
    data = _save(_dataset(pixels8), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DicomError) as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_file_cut_before_the_pixel_data_reports_no_pixel_data(tmp_path, pixels8):
    data = _save(_dataset(pixels8), tmp_path / "full.dcm").read_bytes()
    path = tmp_path / "header_only.dcm"
    path.write_bytes(data[: data.index(b"\xe0\x7f\x10\x00")])  # up to the PixelData tag
    with pytest.raises(DicomError, match="no pixel data") as info:
        read_dicom(path)
    assert str(path) in str(info.value)


def test_dicom_without_pixel_data(tmp_path, pixels8):
    ds = _dataset(pixels8)
    del ds.PixelData
    path = _save(ds, tmp_path / "nopix.dcm")
    with pytest.raises(DicomError, match="no pixel data") as info:
        read_dicom(path)
    assert str(path) in str(info.value)
    assert read_dicom_metadata(path)["Rows"] == 40  # the header alone is still readable


def test_undecodable_transfer_syntax(tmp_path, pixels8):
    ds = _dataset(pixels8)
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    path = _save(ds, tmp_path / "j2k.dcm")
    with pytest.raises(DicomError, match="cannot decode") as info:
        read_dicom(path)
    assert str(path) in str(info.value) and "JPEG 2000" in str(info.value)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "absent.dcm")


def test_dicom_is_read_by_suffix_or_by_its_marker(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (12, 9), dtype=np.uint8)
    data = _save(_dataset(pixels), tmp_path / "source.dcm").read_bytes()
    (tmp_path / "a.dcm").write_bytes(data)
    (tmp_path / "no_suffix").write_bytes(data)
    np.testing.assert_array_equal(read_image(tmp_path / "a.dcm"), pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "no_suffix"), pixels)
