"""HDF5 cache: decode and resize every image and mask of a manifest once, into one file.

Layout of the file (``h5py``)::

    images      [N, S, S] uint8   grey image, chunked per image (1, S, S)
    masks       [N, S, ceil(S/8)] uint8   0/1 target bit-packed along each row
                                  (``np.packbits(mask, axis=-1)``: 8× smaller, and unpacking is
                                  ~10× faster than decompressing), chunked per image; all zero
                                  where no mask is known
    has_mask    [N]       uint8   1 where the manifest gave a mask (``rle`` or ``mask_path``)
    image_ids   [N]       str     the reader maps image id → row
    labels      [N]       float64 manifest label (1, 0, -1 or NaN)
    meta/<col>  [N]       the other manifest columns of :data:`STORED_COLUMNS`
    attrs       version, size, n, columns (the stored manifest columns), manifest_fingerprint
    lung_boxes/<key>/boxes    [N, 4] float64  optional, added later by :func:`store_lung_boxes`:
                                  a lung box per image, ``(y0, x0, y1, x1)`` as fractions of
                                  the image side (so they hold for the original image too)
    lung_boxes/<key>/reasons  [N] str         "lungs", or why the box is the full image
    lung_boxes/<key>.attrs    info (JSON): what computed them (e.g. lung checkpoint, settings)

The build streams: it reads ``chunk`` manifest rows at a time, writes each block to its own part
file in ``<out>.parts/`` (atomically), and finally merges the parts into ``<out>.tmp``, which is
renamed to ``out``. An interrupted build therefore resumes at the first missing block, and
``out`` never exists half-written. Images that cannot be read are skipped, listed in the report
and in ``<out>.skipped.csv``. Lung boxes are computed the same way, block by block into
``<out>.lung-<key>.parts/``, and written into the finished cache in one short step at the end.

Command line::

    python -m ssl_ptx.data.cache MANIFEST_CSV OUT.h5 --size 256
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ssl_ptx.data import rle
from ssl_ptx.data.images import read_image, resize_image, resize_mask
from ssl_ptx.data.manifest import MANIFEST_COLUMNS, read_manifest_csv, validate_manifest
from ssl_ptx.fileio import atomic_path

__all__ = [
    "CACHE_VERSION",
    "STORED_COLUMNS",
    "CacheReader",
    "CacheReport",
    "LungBoxes",
    "SampleReadError",
    "SkippedImage",
    "build_cache",
    "check_box_fractions",
    "main",
    "manifest_fingerprint",
    "manifest_has_mask",
    "open_cache",
    "read_sample",
    "store_lung_boxes",
    "write_skipped_csv",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
#: manifest columns kept in the cache besides ``image_id`` and ``label`` (under ``meta/``)
STORED_COLUMNS: tuple[str, ...] = (
    "path",
    "source",
    "fold",
    "view",
    "patient_id",
    "height",
    "width",
    "mask_area",
)
_FINGERPRINT_COLUMNS = ["image_id", "path", "label", "rle", "mask_path"]
_BUILD_INFO = "build.json"
_LUNG_GROUP = "lung_boxes"
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")


class SampleReadError(ValueError):
    """An image or mask of a manifest row could not be read; names the image id and path."""

    def __init__(self, image_id: str, path: str, reason: str) -> None:
        super().__init__(f"image {image_id!r} ({path}): {reason}")
        self.image_id = image_id
        self.path = path
        self.reason = reason


def _present(value: Any) -> bool:
    """True when a manifest cell holds a value (not NaN / None / blank)."""
    return isinstance(value, str) and value.strip() != ""


def manifest_has_mask(manifest: pd.DataFrame) -> np.ndarray:
    """bool [N]: rows whose manifest gives a mask (an ``rle`` or a ``mask_path``)."""
    return (manifest["rle"].map(_present) | manifest["mask_path"].map(_present)).to_numpy(bool)


def read_sample(
    row: Mapping[str, Any], size: int | tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Read the image and target mask of one manifest row.

    The mask comes from ``rle`` (decoded at the image's native shape; ``"-1"`` is empty) or,
    when ``rle`` is missing, from ``mask_path`` (an image file, > 0 is foreground). With neither,
    the mask is all zero and ``has_mask`` is False.

    Args:
        row: a manifest row (``image_id``, ``path``, ``rle``, ``mask_path``, ``height``,
            ``width``).
        size: output side (int, square) or ``(height, width)`` in pixels; None keeps the native
            size.

    Returns:
        ``(image, mask, has_mask)``: image uint8 H×W grey, mask uint8 H×W with values 0/1.

    Raises:
        SampleReadError: the image or mask file cannot be read, the RLE is invalid, or the
            sizes disagree (manifest height/width, image, mask file).
    """
    image_id, path = str(row["image_id"]), str(row["path"])
    try:
        image = read_image(path)
        native = image.shape[:2]
        expected = _manifest_shape(row)
        if expected is not None and expected != native:
            raise ValueError(
                f"manifest says {expected[0]}×{expected[1]}, file is {native[0]}×{native[1]}"
            )
        mask, has_mask = _read_mask(row, native)
    except (ValueError, OSError) as error:
        raise SampleReadError(image_id, path, str(error)) from error
    if size is not None:
        image = resize_image(image, size)
        mask = resize_mask(mask, size)
    return image, mask, has_mask


def _manifest_shape(row: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(height, width)`` from the manifest, or None when unknown (0 or missing)."""
    height, width = row.get("height"), row.get("width")
    if pd.isna(height) or pd.isna(width) or min(height, width) <= 0:
        return None
    return int(height), int(width)


def _read_mask(row: Mapping[str, Any], shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The 0/1 target of ``row`` at ``shape`` and whether the manifest gave one."""
    encoded, mask_path = row.get("rle"), row.get("mask_path")
    if _present(encoded):
        try:
            return rle.decode(encoded, shape), True
        except ValueError as error:
            raise ValueError(f"bad rle: {error}") from error
    if _present(mask_path):
        mask = read_image(mask_path)
        if mask.shape[:2] != shape:
            raise ValueError(
                f"mask file {mask_path} is {mask.shape[0]}×{mask.shape[1]}, "
                f"image is {shape[0]}×{shape[1]}"
            )
        return (mask > 0).astype(np.uint8), True
    return np.zeros(shape, np.uint8), False


@dataclass(frozen=True)
class SkippedImage:
    """A manifest row left out of the cache, and why."""

    image_id: str
    path: str
    error: str


@dataclass
class CacheReport:
    """What :func:`build_cache` did.

    Attributes:
        out_path: the cache file.
        n_written: images in the cache.
        skipped: rows left out because their image or mask could not be read.
        seconds: wall time of this call.
        blocks_reused: blocks found already done by an interrupted earlier build.
    """

    out_path: Path
    n_written: int
    skipped: list[SkippedImage] = field(default_factory=list)
    seconds: float = 0.0
    blocks_reused: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def _row_hashes(manifest: pd.DataFrame) -> bytes:
    """One 64-bit hash per row of the columns that decide what a cache holds."""
    rows = pd.util.hash_pandas_object(manifest[_FINGERPRINT_COLUMNS].astype(str), index=False)
    return rows.to_numpy().tobytes()


def manifest_fingerprint(manifest: pd.DataFrame) -> str:
    """SHA-256 hex digest of a manifest's ``image_id``, ``path``, ``label``, ``rle`` and
    ``mask_path`` columns, row by row: equal manifests give equal caches."""
    return hashlib.sha256(_row_hashes(manifest)).hexdigest()


def _fingerprint(manifest: pd.DataFrame, size: int, chunk: int) -> str:
    """Hash of everything that decides the cache's content, so stale parts are never reused."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}:{size}:{chunk}:{len(manifest)}".encode())
    digest.update(_row_hashes(manifest))
    return digest.hexdigest()


def _prepare_parts_dir(parts_dir: Path, fingerprint: str, *, overwrite: bool) -> None:
    """Create ``parts_dir`` for this build, or check that the parts in it belong to it."""
    info_path = parts_dir / _BUILD_INFO
    if overwrite and parts_dir.exists():
        shutil.rmtree(parts_dir)
    if info_path.exists():
        found = json.loads(info_path.read_text()).get("fingerprint")
        if found != fingerprint:
            raise ValueError(
                f"{parts_dir} holds parts of a build with another manifest, size or chunk; "
                "pass overwrite=True (--overwrite) to discard them"
            )
        return
    parts_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(info_path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "version": CACHE_VERSION}))


def _packed_width(size: int) -> int:
    """Bytes per row of a bit-packed mask row of ``size`` pixels."""
    return -(-size // 8)


def _write_part(part_path: Path, rows: pd.DataFrame, size: int) -> None:
    """Read the rows of one block, resize, and write them atomically to ``part_path``."""
    images = np.zeros((len(rows), size, size), np.uint8)
    masks = np.zeros_like(images)
    has_mask = np.zeros(len(rows), np.uint8)
    ok = np.zeros(len(rows), bool)
    skipped: list[list[str]] = []
    for k, row in enumerate(rows.to_dict("records")):
        try:
            images[k], masks[k], has_mask[k] = read_sample(row, size)
            ok[k] = True
        except SampleReadError as error:
            skipped.append([error.image_id, error.path, error.reason])
    with atomic_path(part_path) as tmp, h5py.File(tmp, "w") as part:
        part["images"] = images[ok]
        part["masks"] = np.packbits(masks[ok], axis=-1)
        part["has_mask"] = has_mask[ok]
        part["rows"] = rows.index.to_numpy(np.int64)[ok]
        part.attrs["skipped"] = json.dumps(skipped)


def _merge_parts(
    part_paths: Sequence[Path], manifest: pd.DataFrame, tmp_path: Path, size: int, fingerprint: str
) -> tuple[int, list[SkippedImage]]:
    """Concatenate the part files into a complete cache at ``tmp_path``, one part at a time."""
    rows_per_part, skipped = [], []
    for part_path in part_paths:
        with h5py.File(part_path, "r") as part:
            rows_per_part.append(part["rows"][:])
            skipped += [SkippedImage(*entry) for entry in json.loads(part.attrs["skipped"])]
    rows = np.concatenate(rows_per_part) if rows_per_part else np.empty(0, np.int64)
    written = manifest.iloc[rows]
    n = len(rows)
    with h5py.File(tmp_path, "w") as out:
        for name, width in (("images", size), ("masks", _packed_width(size))):
            out.create_dataset(
                name,
                shape=(n, size, width),
                maxshape=(None, size, width),  # lets an empty cache still be chunked per image
                dtype=np.uint8,
                chunks=(1, size, width),
            )
        has_mask = out.create_dataset("has_mask", shape=(n,), dtype=np.uint8)
        start = 0
        for part_path in part_paths:
            with h5py.File(part_path, "r") as part:
                stop = start + len(part["rows"])
                out["images"][start:stop] = part["images"][:]
                out["masks"][start:stop] = part["masks"][:]
                has_mask[start:stop] = part["has_mask"][:]
            start = stop
        out.create_dataset(
            "image_ids", data=written["image_id"].astype(str).tolist(), dtype=h5py.string_dtype()
        )
        out["labels"] = written["label"].to_numpy(np.float64)
        for column in STORED_COLUMNS:
            values = written[column]
            if MANIFEST_COLUMNS[column] == "object":
                out.create_dataset(
                    f"meta/{column}",
                    data=values.fillna("").astype(str).tolist(),
                    dtype=h5py.string_dtype(),
                )
            else:
                out[f"meta/{column}"] = values.to_numpy(MANIFEST_COLUMNS[column])
        out.attrs.update(
            version=CACHE_VERSION,
            size=size,
            n=n,
            columns=["image_id", "label", *STORED_COLUMNS],
            manifest_fingerprint=fingerprint,
        )
    return n, skipped


def write_skipped_csv(csv_path: str | Path, skipped: Sequence[SkippedImage]) -> None:
    """Write the skipped rows (image_id, path, error) to ``csv_path`` atomically, or remove a
    stale list there when ``skipped`` is empty."""
    csv_path = Path(csv_path)
    if not skipped:
        csv_path.unlink(missing_ok=True)
        return
    table = pd.DataFrame([vars(entry) for entry in skipped], columns=["image_id", "path", "error"])
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)


def build_cache(
    manifest: pd.DataFrame,
    out_path: str | Path,
    *,
    size: int = 256,
    chunk: int = 64,
    progress: bool = True,
    overwrite: bool = False,
) -> CacheReport:
    """Decode, resize and store every image and mask of ``manifest`` in one HDF5 file.

    Memory stays at about ``chunk`` images whatever the manifest's length. Rerunning after an
    interruption (crash, kill, Ctrl-C) with the same arguments resumes at the first block not
    yet written; ``out_path`` appears only once the cache is complete.

    Args:
        manifest: a manifest (:mod:`ssl_ptx.data.manifest`).
        out_path: the ``.h5`` file to write. Work files: ``<out>.parts/`` (removed at the end),
            ``<out>.tmp``; skipped rows go to ``<out>.skipped.csv``.
        size: side in pixels of the stored square images and masks (images are squashed, not
            cropped, when not square).
        chunk: manifest rows per part file (the unit of resumption).
        progress: show a tqdm progress bar.
        overwrite: replace an existing ``out_path`` and discard parts of an earlier build;
            otherwise an existing ``out_path`` is an error.

    Returns:
        A :class:`CacheReport`.

    Raises:
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
        ValueError: the manifest is invalid, ``size``/``chunk`` are not positive, or
            ``<out>.parts/`` belongs to a build with other arguments.
    """
    started = time.perf_counter()
    out_path = Path(out_path)
    if size <= 0 or chunk <= 0:
        raise ValueError(f"size and chunk must be positive, got size={size}, chunk={chunk}")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) to rebuild")
    manifest = validate_manifest(manifest).reset_index(drop=True)
    fingerprint = _fingerprint(manifest, size, chunk)
    parts_dir = out_path.with_name(out_path.name + ".parts")
    _prepare_parts_dir(parts_dir, fingerprint, overwrite=overwrite)

    starts = range(0, len(manifest), chunk)
    part_paths = [parts_dir / f"part-{i:06d}.h5" for i in range(len(starts))]
    done = [path.exists() for path in part_paths]
    rows_done = sum(
        min(chunk, len(manifest) - start) for start, d in zip(starts, done, strict=True) if d
    )
    with tqdm(
        total=len(manifest),
        initial=rows_done,
        desc=f"cache {out_path.name}",
        unit="img",
        disable=not progress,
    ) as bar:
        for start, part_path, already in zip(starts, part_paths, done, strict=True):
            if already:
                continue
            block = manifest.iloc[start : start + chunk]
            _write_part(part_path, block, size)
            bar.update(len(block))

    tmp_path = out_path.with_name(out_path.name + ".tmp")
    n_written, skipped = _merge_parts(part_paths, manifest, tmp_path, size, fingerprint)
    write_skipped_csv(out_path.with_name(out_path.name + ".skipped.csv"), skipped)
    os.replace(tmp_path, out_path)
    shutil.rmtree(parts_dir)
    return CacheReport(
        out_path=out_path,
        n_written=n_written,
        skipped=skipped,
        seconds=time.perf_counter() - started,
        blocks_reused=sum(done),
    )


#: lung boxes of a batch of cached images: ``uint8`` S×S images → ``(fractions, reasons)``,
#: fractions ``float`` [B, 4] rows ``(y0, x0, y1, x1)`` in [0, 1] and one reason per image
#: (e.g. ``ssl_ptx.lung_crop.LungCropper.normalised_boxes``)
BoxPredictor = Callable[[list[np.ndarray]], tuple[np.ndarray, Sequence[str]]]


@dataclass(frozen=True)
class LungBoxes:
    """Lung boxes stored in a cache under one key (see :func:`store_lung_boxes`).

    Attributes:
        key: the name they are stored under (``lung_boxes/<key>``).
        boxes: ``float64`` [N, 4], one ``(y0, x0, y1, x1)`` row per cached image, in fractions
            of the image side (``ssl_ptx.lung_crop.Box.from_fractions`` gives pixels at any
            size, the original image's included).
        reasons: per image, ``"lungs"`` or why the box is the full image (``"no_lung"``, …).
        info: what computed them, as given to :func:`store_lung_boxes`.
    """

    key: str
    boxes: np.ndarray
    reasons: tuple[str, ...]
    info: dict[str, Any]


def _check_key(key: str) -> None:
    if not _KEY_PATTERN.fullmatch(key) or key.endswith(".incomplete"):
        raise ValueError(f"lung box key {key!r}: use letters, digits, '_', '.' and '-' only")


def _read_lung_boxes(file: h5py.File, key: str) -> LungBoxes | None:
    """The boxes stored under ``key`` in an open cache, or None."""
    group = file.get(f"{_LUNG_GROUP}/{key}")
    if group is None:
        return None
    return LungBoxes(
        key=key,
        boxes=_read_only(group["boxes"][:]),
        reasons=tuple(group["reasons"].asstr()[:]),
        info=json.loads(group.attrs["info"]),
    )


def check_box_fractions(boxes: np.ndarray, n: int, name: str) -> np.ndarray:
    """``boxes`` as a read-only ``float64`` [n, 4] array of ``(y0, x0, y1, x1)`` fractions.

    Raises:
        ValueError: another shape, a value outside [0, 1], or an end not after its start; the
            message starts with ``name`` and gives the first bad row.
    """
    boxes = np.array(boxes, dtype=np.float64)
    if boxes.shape != (n, 4):
        raise ValueError(f"{name}: expected shape ({n}, 4), one box per image; got {boxes.shape}")
    valid = (
        (boxes >= 0).all(axis=1)
        & (boxes <= 1).all(axis=1)
        & (boxes[:, 0] < boxes[:, 2])
        & (boxes[:, 1] < boxes[:, 3])
    )
    if not valid.all():
        row = int(np.flatnonzero(~valid)[0])
        raise ValueError(
            f"{name}, row {row}: {boxes[row].tolist()} is not (y0, x0, y1, x1) fractions in "
            "[0, 1] with y0 < y1 and x0 < x1"
        )
    return _read_only(boxes)


def store_lung_boxes(
    cache_path: str | Path,
    key: str,
    predict: BoxPredictor,
    *,
    info: Mapping[str, Any] | None = None,
    chunk: int = 256,
    progress: bool = True,
) -> LungBoxes:
    """Compute a lung box for every image of a cache and store them in it, under ``key``.

    The cached images are read ``chunk`` at a time and passed to ``predict``; each block's
    boxes go to a part file in ``<cache>.lung-<key>.parts/`` (atomically), so a rerun after an
    interruption resumes at the first missing block. At the end the boxes are written into the
    cache (``lung_boxes/<key>``, made visible under that name only once complete) and the parts
    are removed. When ``key`` is already stored nothing is computed.

    The cache must not be open for writing elsewhere, nor open in this process (a
    :class:`CacheReader` that has read images): HDF5 cannot add the boxes then.

    Args:
        cache_path: a cache written by :func:`build_cache`.
        key: name of this set of boxes (letters, digits, ``_ . -``), e.g. a hash of the lung
            checkpoint, so boxes of several lung models can live side by side.
        predict: see :data:`BoxPredictor`.
        info: JSON-serialisable description stored with the boxes (checkpoint, settings).
        chunk: images per block (the unit of resumption and of memory use).
        progress: show a tqdm progress bar over images.

    Returns:
        The stored :class:`LungBoxes`.

    Raises:
        FileNotFoundError: no cache at ``cache_path``.
        ValueError: a bad ``key`` or ``chunk``, or ``predict`` returned boxes of the wrong shape
            or outside [0, 1] (the message names the cache row).
    """
    cache_path = Path(cache_path)
    _check_key(key)
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    if not cache_path.is_file():
        raise FileNotFoundError(f"cache file {cache_path} does not exist")
    with h5py.File(cache_path, "r") as file:
        stored = _read_lung_boxes(file, key)
        n, build = int(file.attrs["n"]), str(file.attrs["manifest_fingerprint"])
    if stored is not None:
        return stored
    info = json.loads(json.dumps(dict(info or {})))  # fails early when not JSON-serialisable
    parts_dir = cache_path.with_name(f"{cache_path.name}.lung-{key}.parts")
    parts_fingerprint = hashlib.sha256(f"{build}:{n}:{chunk}".encode()).hexdigest()
    try:
        _prepare_parts_dir(parts_dir, parts_fingerprint, overwrite=False)
    except ValueError:
        logger.warning("%s: parts of another cache or chunk size; starting over", parts_dir)
        _prepare_parts_dir(parts_dir, parts_fingerprint, overwrite=True)

    starts = range(0, n, chunk)
    part_paths = [parts_dir / f"part-{i:06d}.npz" for i in range(len(starts))]
    done = [path.exists() for path in part_paths]
    rows_done = sum(min(chunk, n - start) for start, d in zip(starts, done, strict=True) if d)
    with (
        h5py.File(cache_path, "r") as file,
        tqdm(
            total=n, initial=rows_done, desc="lung boxes", unit="img", disable=not progress
        ) as bar,
    ):
        images = file["images"]
        for start, part_path, already in zip(starts, part_paths, done, strict=True):
            if already:
                continue
            block = list(images[start : start + chunk])
            boxes, reasons = predict(block)
            where = f"lung boxes of cache rows {start}..{start + len(block) - 1}"
            boxes = check_box_fractions(boxes, len(block), where)
            if len(reasons) != len(block):
                raise ValueError(f"{where}: {len(reasons)} reasons for {len(block)} images")
            with atomic_path(part_path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, boxes=boxes, reasons=np.asarray(reasons, dtype=str))
            bar.update(len(block))

    boxes_parts, reasons = [], []
    for part_path in part_paths:
        with np.load(part_path, allow_pickle=False) as part:
            boxes_parts.append(part["boxes"])
            reasons += part["reasons"].tolist()
    boxes = np.concatenate(boxes_parts) if boxes_parts else np.empty((0, 4), np.float64)
    with h5py.File(cache_path, "r+") as file:
        group = file.require_group(_LUNG_GROUP)
        incomplete = f"{key}.incomplete"
        if incomplete in group:
            del group[incomplete]
        entry = group.create_group(incomplete)
        entry["boxes"] = boxes
        entry.create_dataset("reasons", data=reasons, dtype=h5py.string_dtype())
        entry.attrs["info"] = json.dumps(info)
        group.move(incomplete, key)
    shutil.rmtree(parts_dir)
    return LungBoxes(key=key, boxes=_read_only(boxes), reasons=tuple(reasons), info=info)


class CacheReader:
    """Random access to a cache written by :func:`build_cache`.

    The HDF5 file is opened lazily, once per process (it is reopened when ``os.getpid()``
    changes), so a reader can be handed to DataLoader workers, forked or spawned.

    Example:
        >>> with CacheReader("siim_256.h5") as cache:
        ...     image, mask = cache[cache.index_of("1.2.276.0.7230010.3.1.4.8323329.1000")]

    Attributes:
        path: the cache file.
        size: side of the stored images in pixels.
        image_ids: the image id of every row.
        labels: float64 [N] manifest labels (1, 0, -1, NaN).
        has_mask: bool [N], True where the manifest gave a mask.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"cache file {self.path} does not exist")
        with h5py.File(self.path, "r") as file:
            version = file.attrs.get("version")
            if version != CACHE_VERSION:
                raise ValueError(
                    f"{self.path}: cache version {version!r}, this code reads {CACHE_VERSION}; "
                    "rebuild it with build_cache"
                )
            self.size = int(file.attrs["size"])
            self.image_ids: tuple[str, ...] = tuple(file["image_ids"].asstr()[:])
            self.labels = _read_only(file["labels"][:])
            self.has_mask = _read_only(file["has_mask"][:].astype(bool))
            self._columns = list(file.attrs["columns"])
        self._row_of = {image_id: row for row, image_id in enumerate(self.image_ids)}
        self._file: h5py.File | None = None
        self._arrays: tuple[h5py.Dataset, h5py.Dataset] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def index_of(self, image_id: str) -> int:
        """Row of ``image_id``; KeyError naming the cache when it is not stored."""
        try:
            return self._row_of[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in cache {self.path}") from None

    def _handle(self) -> h5py.File:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            self._file = h5py.File(self.path, "r")
            # looking a dataset up by name costs ~0.1 ms; keep the handles for __getitem__
            self._arrays = (self._file["images"], self._file["masks"])
            self._pid = pid
        return self._file

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """``(image, mask)`` of row ``index``: uint8 [S, S] each, the mask 0/1."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} out of range for cache {self.path} with {n} images")
        index = int(index) % n
        self._handle()
        images, masks = self._arrays
        return images[index], np.unpackbits(masks[index], axis=-1, count=self.size)

    def metadata(self) -> pd.DataFrame:
        """The stored manifest columns (``image_id``, ``label``, :data:`STORED_COLUMNS`) and
        ``has_mask``, one row per cached image, in cache order."""
        file = self._handle()
        table = {"image_id": list(self.image_ids), "label": self.labels.copy()}
        for column in self._columns[2:]:
            values = file[f"meta/{column}"]
            table[column] = values.asstr()[:] if values.dtype.kind == "O" else values[:]
        table["has_mask"] = self.has_mask.copy()
        return pd.DataFrame(table)

    def lung_box_keys(self) -> list[str]:
        """Keys of the lung boxes stored in the cache (:func:`store_lung_boxes`), sorted."""
        with h5py.File(self.path, "r") as file:
            group = file.get(_LUNG_GROUP)
            return sorted(k for k in group if not k.endswith(".incomplete")) if group else []

    def lung_boxes(self, key: str) -> LungBoxes:
        """The lung boxes stored under ``key``; KeyError naming the cache and the stored keys."""
        with h5py.File(self.path, "r") as file:
            stored = _read_lung_boxes(file, key)
        if stored is None:
            raise KeyError(
                f"cache {self.path} has no lung boxes {key!r}; stored: {self.lung_box_keys()} "
                "(compute them with store_lung_boxes)"
            )
        return stored

    def close(self) -> None:
        """Close this process's handle (a later access reopens it)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._arrays, self._pid = None, None, None

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"], state["_arrays"], state["_pid"] = None, None, None
        return state

    def __repr__(self) -> str:
        return f"CacheReader({str(self.path)!r}, n={len(self)}, size={self.size})"


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


def open_cache(path: str | Path) -> CacheReader:
    """Open a cache written by :func:`build_cache` (same as ``CacheReader(path)``)."""
    return CacheReader(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: build a cache from a manifest CSV; returns the exit status (2 on a bad
    manifest, an existing output without ``--overwrite``, or foreign parts)."""
    parser = argparse.ArgumentParser(
        prog="python -m ssl_ptx.data.cache",
        description="Decode and resize a manifest's images and masks once into an HDF5 cache. "
        "Rerun the same command to resume an interrupted build.",
    )
    parser.add_argument("manifest", type=Path, help="manifest CSV (ssl_ptx.data.manifest columns)")
    parser.add_argument("out", type=Path, help="output .h5 file")
    parser.add_argument("--size", type=int, default=256, help="side in pixels (default 256)")
    parser.add_argument("--chunk", type=int, default=64, help="rows per part file (default 64)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild an existing cache")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        report = build_cache(
            read_manifest_csv(args.manifest),
            args.out,
            size=args.size,
            chunk=args.chunk,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"wrote {report.n_written} images ({args.size}×{args.size}) to {report.out_path} "
        f"in {report.seconds:.1f} s"
    )
    if report.skipped:
        print(f"skipped {report.n_skipped}: see {args.out}.skipped.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
