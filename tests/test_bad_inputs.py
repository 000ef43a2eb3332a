"""Bad-input catalogue (issue 10): one row per broken input, each asserting the behaviour.

Every row makes its bad input in ``tmp_path``, hands it to an entry point users reach (the
readers, the cache build, the Trainer, the predict recipe, the pseudo-label filter, the config
loader) and checks one of three outcomes:

* :class:`Raises` — an error of the library's own type (exactly that type, not a subclass
  leaking from numpy / pandas / PIL / pydicom) whose message names the file (and line or row
  where there is one) and what is wrong;
* :class:`Unreadable` — ``read_image`` raises ``ImageReadError`` naming the file, and a cache
  build over it plus a good image continues: the good image is written, the bad one is listed
  in ``<cache>.skipped.csv`` with the same reason;
* :class:`Listed` — a long operation continues and lists the bad item (skip-and-list);
* :class:`Behaves` — not an error: the input is read correctly (MONOCHROME1, 16-bit, RGBA,
  NaN/Inf batches).

``docs/reliability.md`` carries the table of :data:`CASES`; ``python tests/test_bad_inputs.py``
prints it, and :func:`test_reliability_doc_lists_every_case` keeps the two equal.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from external_data import chexpert, montgomery
from ssl_ptx.config import ConfigError, DataConfig, load_config
from ssl_ptx.data.cache import CacheReader, build_cache
from ssl_ptx.data.dicom import DicomError
from ssl_ptx.data.images import ImageReadError, read_image
from ssl_ptx.data.manifest import MANIFEST_COLUMNS, read_manifest_csv
from ssl_ptx.data.siim import load_siim, read_rle_csv
from ssl_ptx.engine import Callback, Trainer
from ssl_ptx.engine.data import build_siim_datasets
from ssl_ptx.engine.loaders import build_train_loader
from ssl_ptx.engine.rng import seed_everything
from ssl_ptx.inference import Predictor
from ssl_ptx.pseudo import PseudoLabelFilter, published_rules

sys.path.insert(0, str(Path(__file__).parent))  # run as a script, it prints the doc table
from test_dicom import _dataset, _save  # noqa: E402
from test_inference import Constant, _load_recipe, _tiny_checkpoint  # noqa: E402
from test_trainer import TinyNet, ToySegmentation, bce, trainer_config  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
_PIXELS = np.random.default_rng(0).integers(0, 256, (40, 30), dtype=np.uint8)
_GREY = np.random.default_rng(1).integers(0, 256, (20, 24), dtype=np.uint8)
_MPEG2 = UID("1.2.840.10008.1.2.4.100")  # a transfer syntax no installed plugin decodes


# ------------------------------------------------------------------------- expected outcomes


def _assert_message(message: str, path: Path | None, patterns: tuple[str, ...]) -> None:
    if path is not None:
        assert str(path) in message, f"the message does not name {path}: {message}"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"


@dataclass(frozen=True)
class Raises:
    """The entry point raises exactly ``error``, naming the input (unless ``names_file`` is
    False) and matching every regex of ``patterns``."""

    error: type[BaseException]
    patterns: tuple[str, ...]
    names_file: bool = True

    def verify(self, case: Case, path: Path, tmp_path: Path) -> None:
        with pytest.raises(self.error) as caught:
            case.entry(path)
        assert type(caught.value) is self.error, f"raised {type(caught.value).__name__}"
        _assert_message(str(caught.value), path if self.names_file else None, self.patterns)


@dataclass(frozen=True)
class Unreadable:
    """``read_image`` raises ``ImageReadError`` naming the file; a cache build over the file
    and a good image writes the good one and lists the bad one in ``skipped.csv``."""

    pattern: str

    def verify(self, case: Case, path: Path, tmp_path: Path) -> None:
        Raises(ImageReadError, (self.pattern,)).verify(case, path, tmp_path)
        good = _write_png(tmp_path / "good.png", _GREY)
        manifest = _manifest(
            [{"image_id": "good", "path": good}, {"image_id": "bad", "path": path}]
        )
        report = build_cache(manifest, tmp_path / "cache.h5", size=16, progress=False)
        skipped = pd.read_csv(tmp_path / "cache.h5.skipped.csv")
        assert report.n_written == 1 and skipped["image_id"].tolist() == ["bad"]
        assert skipped.at[0, "path"] == str(path)
        _assert_message(skipped.at[0, "error"], path, (self.pattern,))
        with CacheReader(tmp_path / "cache.h5") as cache:
            assert cache.image_ids == ("good",)


@dataclass(frozen=True)
class Listing:
    """What a long operation finished (``done`` ids) and what it listed as skipped
    (``image_id``, ``error`` and, where the operation records it, ``path``)."""

    done: list[str]
    skipped: pd.DataFrame


@dataclass(frozen=True)
class Listed:
    """The entry point returns a :class:`Listing`: the run finished ``done`` and listed
    exactly ``skipped_id`` with an error matching ``pattern``."""

    skipped_id: str
    done: tuple[str, ...]
    pattern: str

    def verify(self, case: Case, path: Path, tmp_path: Path) -> None:
        listing = case.entry(path)
        assert sorted(listing.done) == sorted(self.done)
        assert listing.skipped["image_id"].tolist() == [self.skipped_id]
        row = listing.skipped.iloc[0]
        assert re.search(self.pattern, row["error"]), row["error"]
        if "path" in listing.skipped.columns:
            assert row["path"] == str(path)


@dataclass(frozen=True)
class Behaves:
    """Not an error: ``check(entry(path), path)`` asserts what the input must come out as."""

    check: Callable[[Any, Path], None]

    def verify(self, case: Case, path: Path, tmp_path: Path) -> None:
        self.check(case.entry(path), path)


@dataclass(frozen=True)
class Case:
    """One row of the catalogue.

    Attributes:
        id: the row's name (the test id and the first column of the doc table).
        input: what is wrong with the input, in words.
        entry_name: the public entry point exercised, in words.
        outcome: the behaviour asserted, in words.
        make: writes the bad input under ``tmp_path`` and returns the path the entry takes.
        entry: calls the entry point on that path.
        expect: the assertion (:class:`Raises`, :class:`Unreadable`, :class:`Listed`,
            :class:`Behaves`).
    """

    id: str
    input: str
    entry_name: str
    outcome: str
    make: Callable[[Path], Path]
    entry: Callable[[Path], Any]
    expect: Raises | Unreadable | Listed | Behaves


# ------------------------------------------------------------------------ making bad inputs


def _write_png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return path


def _write_dicom(path: Path, pixels: np.ndarray = _PIXELS, **options: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(_dataset(pixels, **options), path)


def _truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _manifest(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """A manifest of ``rows`` (``image_id``, ``path`` and any overrides), other columns at
    their 'unknown' values."""
    defaults = {
        "source": "test",
        "label": 0.0,
        "rle": np.nan,
        "mask_path": np.nan,
        "fold": 0,
        "view": "",
        "patient_id": "",
        "height": 0,
        "width": 0,
        "mask_area": -1,
    }
    table = pd.DataFrame([{**defaults, **row} for row in rows])
    table["path"] = table["path"].astype(str)
    for column in ("rle", "mask_path"):
        table[column] = table[column].astype(object)
    return table.astype({c: t for c, t in MANIFEST_COLUMNS.items() if t != "object"})


def _text_file(name: str, text: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return make


def _not_a_dicom(tmp_path: Path) -> Path:
    return _text_file("image.dcm", "ImageId,EncodedPixels\n" * 40)(tmp_path)


def _dicom_cut_in_pixels(tmp_path: Path) -> Path:
    return _truncated(_write_dicom(tmp_path / "cut.dcm"), keep=0.8)


def _dicom_cut_in_header(tmp_path: Path) -> Path:
    return _truncated(_write_dicom(tmp_path / "cut.dcm"), keep=0.3)


def _dicom_without_pixels(tmp_path: Path) -> Path:
    dataset = _dataset(_PIXELS)
    del dataset.PixelData
    return _save(dataset, tmp_path / "nopixels.dcm")


def _dicom_mpeg2(tmp_path: Path) -> Path:
    dataset = _dataset(_PIXELS)
    dataset.PixelData = encapsulate([b"\x00" * 64])
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = _MPEG2
    return _save(dataset, tmp_path / "mpeg2.dcm")


_RAMP_12BIT = np.linspace(0, 4095, 40 * 30).reshape(40, 30).astype(np.uint16) // 3 + 100


def _dicom_12bit(tmp_path: Path) -> Path:
    return _write_dicom(tmp_path / "12bit.dcm", _RAMP_12BIT, bits=12)


def _raster_cut(name: str) -> Callable[[Path], Path]:
    def make(tmp_path: Path) -> Path:
        return _truncated(_write_png(tmp_path / name, _GREY), keep=0.5)

    return make


_ALPHA = np.random.default_rng(2).integers(0, 256, (20, 24), dtype=np.uint8)


def _rgba_png(tmp_path: Path) -> Path:
    rgba = np.dstack([_GREY, _GREY, _GREY, _ALPHA])
    rgba[0, 0, :3] = (255, 0, 0)  # one pure red pixel: luma 0.299 · 255 = 76
    return _write_png(tmp_path / "rgba.png", rgba, "RGBA")


_RAMP_16BIT = np.linspace(0, 4095, 20 * 24).reshape(20, 24).astype(np.uint16)


def _png_16bit(tmp_path: Path) -> Path:
    return _write_png(tmp_path / "16bit.png", _RAMP_16BIT)


def _siim_root(tmp_path: Path, n_images: int, rle_of_first: str = "-1") -> Path:
    """A SIIM root: ``n_images`` 32² DICOMs and a train-rle.csv (the first row's RLE given)."""
    root = tmp_path / "siim"
    ids = []
    for index in range(n_images):
        dataset = _dataset(np.full((32, 32), index, np.uint8))
        ids.append(dataset.SOPInstanceUID)
        (root / "dicom-images-train").mkdir(parents=True, exist_ok=True)
        _save(dataset, root / "dicom-images-train" / f"{dataset.SOPInstanceUID}.dcm")
    rows = [f"{image_id}, {rle_of_first if n == 0 else '-1'}" for n, image_id in enumerate(ids)]
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n" + "\n".join(rows) + "\n")
    return root


def _siim_rle_past_image(tmp_path: Path) -> Path:
    return _siim_root(tmp_path, 1, rle_of_first="1000 100") / "train-rle.csv"


def _siim_with_a_corrupt_dicom(tmp_path: Path) -> Path:
    root = _siim_root(tmp_path, 2)
    bad = next((root / "dicom-images-train").glob("*.dcm"))
    bad.write_bytes(b"not a dicom" * 30)
    return bad


def _siim_without_images(tmp_path: Path) -> Path:
    root = tmp_path / "siim"
    root.mkdir()
    (root / "train-rle.csv").write_text("ImageId, EncodedPixels\n")
    return root


def _image_and_smaller_mask(tmp_path: Path) -> Path:
    _write_png(tmp_path / "mask.png", np.zeros((10, 12), np.uint8))
    return _write_png(tmp_path / "image.png", _GREY)


def _image_and_other_manifest_size(tmp_path: Path) -> Path:
    return _write_png(tmp_path / "image.png", _GREY)


def _montgomery_with_small_masks(tmp_path: Path) -> Path:
    dataset = tmp_path / "MontgomerySet"
    for name, mask_shape in (("MCUCXR_0001_0.png", (20, 24)), ("MCUCXR_0002_1.png", (10, 12))):
        _write_png(dataset / "CXR_png" / name, _GREY)
        for side in montgomery.MASK_FOLDERS:
            _write_png(dataset / side / name, np.full(mask_shape, 255, np.uint8))
    return dataset / "CXR_png" / "MCUCXR_0002_1.png"


def _chexpert_escaping_path(tmp_path: Path) -> Path:
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA,Pneumothorax\n"
    row = "CheXpert-v1.0-small/train/../../../../etc/passwd,Male,30,Frontal,PA,1.0\n"
    (folder / "train.csv").write_text(header + row)
    return folder / "train.csv"


def _manifest_csv_with_bad_fold(tmp_path: Path) -> Path:
    path = tmp_path / "manifest.csv"
    table = _manifest([{"image_id": "a", "path": "a.png"}, {"image_id": "b", "path": "b.png"}])
    table.astype({"fold": object}).assign(fold=[0, "zz"]).to_csv(path, index=False)
    return path


def _folder_with_a_truncated_dicom(tmp_path: Path) -> Path:
    folder = tmp_path / "dicoms"
    for name in ("good1", "good2"):
        _write_dicom(folder / f"{name}.dcm")
    return _truncated(_write_dicom(folder / "bad.dcm"), keep=0.8)


def _chexpert_pool_with_a_truncated_jpeg(tmp_path: Path) -> Path:
    for name in ("good1", "good2", "good3"):
        _write_png(tmp_path / "pool" / f"{name}.png", _GREY)
    return _raster_cut("pool/bad.jpg")(tmp_path)


# ------------------------------------------------------------------------------ entry points


def _cache_listing(manifest: pd.DataFrame, out: Path) -> Listing:
    report = build_cache(manifest, out, size=16, progress=False)
    with CacheReader(out) as cache:
        done = list(cache.image_ids)
    skipped = pd.DataFrame([vars(entry) for entry in report.skipped])
    on_disk = pd.read_csv(out.with_name(out.name + ".skipped.csv"))
    pd.testing.assert_frame_equal(skipped, on_disk, check_dtype=False)
    return Listing(done, skipped)


def _cache_with_mask(image: Path) -> Listing:
    manifest = _manifest(
        [
            {"image_id": "good", "path": image, "mask_path": str(image)},
            {"image_id": "bad", "path": image, "mask_path": str(image.parent / "mask.png")},
        ]
    )
    return _cache_listing(manifest, image.parent / "cache.h5")


def _cache_with_manifest_size(image: Path) -> Listing:
    manifest = _manifest(
        [
            {"image_id": "good", "path": image, "height": 20, "width": 24},
            {"image_id": "bad", "path": image, "height": 30, "width": 24},
        ]
    )
    return _cache_listing(manifest, image.parent / "cache.h5")


def _montgomery_listing(image: Path) -> Listing:
    manifest = montgomery.load(image.parents[2], workers=1, progress=False)
    skipped = manifest.attrs["skipped"]
    table = pd.DataFrame({"image_id": list(skipped), "error": list(skipped.values())})
    return Listing(manifest["image_id"].tolist(), table)


def _build_datasets(root: Path, **config: Any) -> Any:
    return build_siim_datasets(DataConfig(siim_dir=str(root), **config), progress=False)


def _empty_fold(tmp_path: Path) -> Path:
    return _siim_root(tmp_path, 3)


def _train_with_nonfinite_images(out_dir: Path) -> tuple[dict[str, float], list[tuple]]:
    """One epoch of 4 batches of 8 where image 3 is all NaN and image 12 all +Inf; returns the
    metrics and, per batch, (finite input?, optimiser stepped?)."""

    class Record(Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[bool, bool]] = []

        def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
            finite = bool(torch.isfinite(batch["image"]).all())
            self.batches.append((finite, bool(outputs["optimizer_stepped"])))

    seed_everything(0)
    dataset = ToySegmentation()
    dataset.images[3] = float("nan")
    dataset.images[12] = float("inf")
    loader = build_train_loader(dataset, DataConfig(batch_size=8, num_workers=0), epochs=1, seed=0)
    record = Record()
    trainer = Trainer(TinyNet(), bce, trainer_config(epochs=1), out_dir=out_dir, callbacks=[record])
    result = trainer.fit(loader)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    return result.metrics, record.batches


def _check_nonfinite_steps_skipped(result: tuple, path: Path) -> None:
    metrics, batches = result
    assert len(batches) == 4
    assert all(finite == stepped for finite, stepped in batches)  # skipped exactly those
    n_bad = sum(not finite for finite, _ in batches)
    assert 1 <= n_bad <= 2 and metrics["train_nonfinite"] == n_bad


def _predict_recipe_listing(bad: Path) -> Listing:
    folder, work = bad.parent, bad.parents[1]
    _tiny_checkpoint(work / "best.pt", seed=0)
    out = work / "out"
    args = [str(work / "best.pt"), "--dicom-dir", str(folder), "--out", str(out)]
    code = _load_recipe().main([*args, "--no-tta", "--overlays", "1", "--no-progress"])
    assert code == 0
    submission = pd.read_csv(out / "submission.csv")
    return Listing(submission["ImageId"].tolist(), pd.read_csv(out / "skipped.csv"))


def _pseudo_filter_listing(bad: Path) -> Listing:
    pool = bad.parent
    files = sorted(pool.glob("*.png")) + [bad]
    manifest = _manifest(
        [{"image_id": f.stem, "path": f, "label": 1.0, "source": "chexpert"} for f in files]
    )
    predictor = Predictor(Constant(0.9), tta=(), device="cpu", progress=False)
    pseudo = PseudoLabelFilter(
        predictor, published_rules(0.5, min_area=0), size=16, batch_size=2, gallery_size=0,
        progress=False,
    )  # fmt: skip
    result = pseudo.run(manifest, pool.parent / "pseudo")
    assert (pool.parent / "pseudo" / "skipped.csv").is_file()
    return Listing(result.manifest["image_id"].tolist(), result.skipped)


# ------------------------------------------------------------------------------ the catalogue


def _inverted(image: np.ndarray, path: Path) -> None:
    np.testing.assert_array_equal(image, 255 - _PIXELS)


def _stretched(stored: np.ndarray) -> Callable[[np.ndarray, Path], None]:
    """The check that an image is ``stored`` stretched min–max onto 0..255 (not ``>> 8``)."""

    def check(image: np.ndarray, path: Path) -> None:
        low, high = float(stored.min()), float(stored.max())
        expected = np.rint((stored - low) * (255.0 / (high - low))).astype(np.uint8)
        assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
        np.testing.assert_array_equal(image, expected)

    return check


def _alpha_dropped(image: np.ndarray, path: Path) -> None:
    expected = _GREY.copy()
    expected[0, 0] = 76
    np.testing.assert_array_equal(image, expected)


_READ = "read_image; build_cache"
_SIIM_CSV = "ssl_ptx.data.siim.read_rle_csv"

CASES: list[Case] = [
    Case(
        "dicom_not_a_dicom", "a .dcm file holding CSV text", _READ,
        "ImageReadError 'not a DICOM file'; cache skips and lists it",
        _not_a_dicom, read_image, Unreadable("not a DICOM file"),
    ),
    Case(
        "dicom_truncated_pixels", "a DICOM cut at 80 % (inside the pixel data)", _READ,
        "ImageReadError 'cannot decode the pixel data'; cache skips and lists it",
        _dicom_cut_in_pixels, read_image, Unreadable("cannot decode the pixel data"),
    ),
    Case(
        "dicom_truncated_header", "a DICOM cut at 30 % (before the pixel data)", _READ,
        "ImageReadError 'has no pixel data'; cache skips and lists it",
        _dicom_cut_in_header, read_image, Unreadable("has no pixel data"),
    ),
    Case(
        "dicom_without_pixel_data", "a complete DICOM header without PixelData", _READ,
        "ImageReadError 'has no pixel data'; cache skips and lists it",
        _dicom_without_pixels, read_image, Unreadable("has no pixel data"),
    ),
    Case(
        "dicom_unsupported_syntax", "pixel data in MPEG2 (1.2.840.10008.1.2.4.100)", _READ,
        "ImageReadError 'cannot decode the pixel data (MPEG2 ...)'; cache skips and lists it",
        _dicom_mpeg2, read_image, Unreadable(r"cannot decode the pixel data \(MPEG2"),
    ),
    Case(
        "dicom_monochrome1", "MONOCHROME1 (bright = low value)", "read_image",
        "read, inverted: 255 - stored value", lambda t: _write_dicom(
            t / "m1.dcm", photometric="MONOCHROME1"
        ), read_image, Behaves(_inverted),
    ),
    Case(
        "dicom_16bit", "12-bit values in 16-bit pixels, no window", "read_image",
        "read, stretched min-max onto 0..255 (not >> 8)",
        _dicom_12bit, read_image, Behaves(_stretched(_RAMP_12BIT)),
    ),
    Case(
        "png_truncated", "a PNG cut in half", _READ,
        "ImageReadError 'cannot decode the image'; cache skips and lists it",
        _raster_cut("cut.png"), read_image, Unreadable("cannot decode the image"),
    ),
    Case(
        "jpeg_truncated", "a JPEG cut in half", _READ,
        "ImageReadError 'cannot decode the image'; cache skips and lists it",
        _raster_cut("cut.jpg"), read_image, Unreadable("cannot decode the image"),
    ),
    Case(
        "png_rgba", "an RGBA PNG with random alpha", "read_image",
        "read, grey = ITU-R 601 luma of RGB, alpha dropped (not composited)",
        _rgba_png, read_image, Behaves(_alpha_dropped),
    ),
    Case(
        "png_16bit", "a 16-bit PNG holding 12-bit values", "read_image",
        "read, stretched min-max onto 0..255 (not >> 8)",
        _png_16bit, read_image, Behaves(_stretched(_RAMP_16BIT)),
    ),
    Case(
        "image_zero_bytes", "a 0-byte .png", _READ,
        "ImageReadError 'the file is empty (0 bytes)'; cache skips and lists it",
        _text_file("empty.png", ""), read_image, Unreadable(r"the file is empty \(0 bytes\)"),
    ),
    Case(
        "siim_csv_missing_column", "train-rle.csv without EncodedPixels", _SIIM_CSV,
        "ValueError naming the file, line 1 and the missing column",
        _text_file("train-rle.csv", "ImageId\n1.2.3\n"), read_rle_csv,
        Raises(ValueError, (r"line 1: missing column\(s\) \['EncodedPixels'\]",)),
    ),
    Case(
        "siim_csv_renamed_column", "header 'ImageId, Pixels'", _SIIM_CSV,
        "ValueError naming the file, line 1, the missing column and the header found",
        _text_file("train-rle.csv", "ImageId, Pixels\n1.2.3, -1\n"), read_rle_csv,
        Raises(ValueError, (r"line 1: missing column", r"\['ImageId', 'Pixels'\]")),
    ),
    Case(
        "siim_csv_empty_and_rle", "one ImageId with a '-1' row and an RLE row", _SIIM_CSV,
        "ValueError naming the file, the image and both lines",
        _text_file("train-rle.csv", "ImageId, EncodedPixels\nx, -1\ny, -1\nx, 5 3\n"),
        read_rle_csv, Raises(ValueError, (r"x is marked empty \('-1', line 2\).*\(line 4\)",)),
    ),
    Case(
        "siim_rle_malformed", "EncodedPixels '5 3 7' (odd token count)", _SIIM_CSV,
        "ValueError naming the file, line 2, the image and the defect",
        _text_file("train-rle.csv", "ImageId, EncodedPixels\nx, 5 3 7\n"), read_rle_csv,
        Raises(ValueError, (r"line 2: malformed EncodedPixels of x: .*odd number of tokens",)),
    ),
    Case(
        "siim_rle_past_image", "an RLE ending at pixel 1100 of a 32x32 DICOM",
        "ssl_ptx.data.siim.load_siim", "ValueError naming the CSV, the image, its size and DICOM",
        _siim_rle_past_image, lambda csv: load_siim(csv.parent, progress=False),
        Raises(ValueError, (r"ends at pixel 1100, past its 32×32 DICOM \(.*\.dcm\)",)),
    ),
    Case(
        "siim_corrupt_dicom_header", "one of the SIIM root's .dcm files is not a DICOM",
        "ssl_ptx.data.siim.load_siim", "DicomError naming the file (before any long step)",
        _siim_with_a_corrupt_dicom,
        lambda bad: load_siim(bad.parents[1], progress=False),
        Raises(DicomError, ("not a DICOM file",)),
    ),
    Case(
        "image_mask_size_mismatch", "a 10x12 mask_path for a 20x24 image", "build_cache",
        "skipped and listed in <cache>.skipped.csv; the other rows are cached",
        _image_and_smaller_mask, _cache_with_mask,
        Listed("bad", ("good",), r"mask file .*mask\.png is 10×12, image is 20×24"),
    ),
    Case(
        "image_manifest_size_mismatch", "manifest says 30x24, the file is 20x24", "build_cache",
        "skipped and listed in <cache>.skipped.csv; the other rows are cached",
        _image_and_other_manifest_size, _cache_with_manifest_size,
        Listed("bad", ("good",), "manifest says 30×24, file is 20×24"),
    ),
    Case(
        "montgomery_mask_size_mismatch", "Montgomery lung masks 10x12 for a 20x24 image",
        "external_data.montgomery.load", "skipped and listed in df.attrs['skipped']",
        _montgomery_with_small_masks, _montgomery_listing,
        Listed("MCUCXR_0002_1", ("MCUCXR_0001_0",), "the masks are 10×12 but the image is 20×24"),
    ),
    Case(
        "empty_dataset", "a SIIM root whose train-rle.csv has no rows",
        "ssl_ptx.engine.data.build_siim_datasets", "ConfigError naming the root and the counts",
        _siim_without_images, _build_datasets,
        Raises(ConfigError, ("gives 0 validation and 0 training images",)),
    ),
    Case(
        "empty_fold", "3 images in 5 folds, data.fold=4",
        "ssl_ptx.engine.data.build_siim_datasets", "ConfigError naming the fold, root and counts",
        _empty_fold, lambda root: _build_datasets(root, fold=4),
        Raises(ConfigError, (r"data\.fold=4: .* gives 0 validation and 3 training images",)),
    ),
    Case(
        "manifest_path_escapes_root", "CheXpert Path '.../train/../../../../etc/passwd'",
        "external_data.chexpert.load", "ValueError naming the CSV, line 2 and the path; refused",
        _chexpert_escaping_path, lambda csv: chexpert.load(csv.parents[1], progress=False),
        Raises(ValueError, (r"line 2: Path '.*\.\./etc/passwd' leaves the dataset folder",)),
    ),
    Case(
        "manifest_csv_bad_cell", "a manifest CSV whose fold is 'zz'",
        "ssl_ptx.data.manifest.read_manifest_csv (python -m ssl_ptx.data.cache)",
        "ValueError naming the file, row and column", _manifest_csv_with_bad_fold,
        read_manifest_csv, Raises(ValueError, (r"row 1: fold 'zz' is not an integer",)),
    ),
    Case(
        "manifest_csv_empty", "a 0-byte manifest CSV",
        "ssl_ptx.data.manifest.read_manifest_csv (python -m ssl_ptx.data.cache)",
        "ValueError naming the file: cannot be read as a CSV file",
        _text_file("manifest.csv", ""), read_manifest_csv,
        Raises(ValueError, ("cannot be read as a CSV file",)),
    ),
    Case(
        "nonfinite_batch", "an all-NaN and an all-Inf image in the training set",
        "ssl_ptx.engine.Trainer.fit",
        "each batch holding one skips its step; train_nonfinite counts them",
        lambda t: t, _train_with_nonfinite_images, Behaves(_check_nonfinite_steps_skipped),
    ),
    Case(
        "config_unknown_key", "YAML 'trainer: {lrr: 0.1}'", "ssl_ptx.config.load_config",
        "ConfigError naming the file, the dotted key and the known keys",
        _text_file("config.yaml", "trainer:\n  lrr: 0.1\n"), load_config,
        Raises(ConfigError, (r"unknown key 'trainer\.lrr'; known keys here: .*trainer\.lr\b",)),
    ),
    Case(
        "config_wrong_type", "YAML 'trainer: {epochs: many}'", "ssl_ptx.config.load_config",
        "ConfigError naming the file, the dotted key and the expected type",
        _text_file("config.yaml", "trainer:\n  epochs: many\n"), load_config,
        Raises(ConfigError, (r"trainer\.epochs: expected int, got 'many'",)),
    ),
    Case(
        "predict_unreadable_image", "a truncated DICOM among the --dicom-dir images",
        "recipes/predict.py", "the others are predicted into submission.csv; it is in skipped.csv",
        _folder_with_a_truncated_dicom, _predict_recipe_listing,
        Listed("bad", ("good1", "good2"), "cannot decode the pixel data"),
    ),
    Case(
        "pseudo_unreadable_image", "a truncated JPEG in the external pool",
        "ssl_ptx.pseudo.PseudoLabelFilter.run", "the others are decided; it is in skipped.csv",
        _chexpert_pool_with_a_truncated_jpeg, _pseudo_filter_listing,
        Listed("bad", ("good1", "good2", "good3"), "cannot decode the image"),
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, tmp_path: Path) -> None:
    path = case.make(tmp_path)
    case.expect.verify(case, path, tmp_path)


def markdown_table() -> str:
    """The catalogue as the Markdown table of ``docs/reliability.md``."""
    lines = ["| id | input | entry point | outcome |", "| --- | --- | --- | --- |"]
    for case in CASES:
        cells = (f"`{case.id}`", case.input, case.entry_name, case.outcome)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


def test_reliability_doc_lists_every_case() -> None:
    assert markdown_table() in DOC.read_text(), (
        "docs/reliability.md is out of date: paste the output of `python tests/test_bad_inputs.py`"
    )


if __name__ == "__main__":
    print(markdown_table())
