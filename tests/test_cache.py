from __future__ import annotations

import multiprocessing
import pickle
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest

from ssl_ptx.data import cache as cache_module
from ssl_ptx.data import rle
from ssl_ptx.data.cache import (
    CACHE_VERSION,
    CacheReader,
    build_cache,
    main,
    open_cache,
    read_sample,
)
from ssl_ptx.data.manifest import MANIFEST_COLUMNS, empty_manifest


def make_png_manifest(
    folder: Path, n: int, *, seed: int = 0, side: int | None = None
) -> pd.DataFrame:
    """A manifest of ``n`` grey PNGs written into ``folder``, with every kind of mask source.

    Rows cycle through: RLE positive, RLE empty ("-1"), mask file, no mask with label 1
    (CheXpert-like), no mask and no label (unlabelled). Sizes vary and are not square unless
    ``side`` is given.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        height, width = (
            (side, side) if side else (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
        )
        image = rng.integers(0, 256, (height, width), dtype=np.uint8)
        mask = np.zeros((height, width), np.uint8)
        y, x = int(rng.integers(5, height - 15)), int(rng.integers(5, width - 15))
        mask[y : y + 12, x : x + 9] = 1
        path = folder / f"img_{i:04d}.png"
        cv2.imwrite(str(path), image)
        kind = i % 5
        row = {
            "image_id": f"id{i:04d}",
            "path": str(path),
            "source": "test",
            "label": [1.0, 0.0, 1.0, 1.0, np.nan][kind],
            "rle": [rle.encode(mask), "-1", np.nan, np.nan, np.nan][kind],
            "mask_path": np.nan,
            "fold": i % 3,
            "view": "PA" if i % 2 else "AP",
            "patient_id": f"p{i // 2}",
            "height": height,
            "width": width,
            "mask_area": int(mask.sum()) if kind in (0, 2) else (0 if kind == 1 else -1),
        }
        if kind == 2:
            mask_path = folder / f"mask_{i:04d}.png"
            cv2.imwrite(str(mask_path), mask * 255)
            row["mask_path"] = str(mask_path)
        rows.append(row)
    return pd.DataFrame(rows).astype(MANIFEST_COLUMNS)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as file:
        return {
            "images": file["images"][:],
            "masks": file["masks"][:],
            "has_mask": file["has_mask"][:],
            "image_ids": file["image_ids"].asstr()[:],
            "labels": file["labels"][:],
        }


def test_round_trip_equals_direct_read_and_resize(tmp_path: Path) -> None:
    manifest = make_png_manifest(tmp_path / "png", 23)
    out = tmp_path / "c.h5"
    report = build_cache(manifest, out, size=32, chunk=5, progress=False)
    assert report.n_written == 23 and report.n_skipped == 0
    assert not (tmp_path / "c.h5.parts").exists() and not (tmp_path / "c.h5.tmp").exists()
    with open_cache(out) as reader:
        assert len(reader) == 23 and reader.size == 32
        for row in manifest.to_dict("records"):
            image, mask, has_mask = read_sample(row, 32)
            cached_image, cached_mask = reader[reader.index_of(row["image_id"])]
            assert cached_image.shape == (32, 32) and cached_image.dtype == np.uint8
            np.testing.assert_array_equal(cached_image, image)
            np.testing.assert_array_equal(cached_mask, mask)
            assert reader.has_mask[reader.index_of(row["image_id"])] == has_mask
        np.testing.assert_array_equal(reader.labels, manifest["label"].to_numpy())
        meta = reader.metadata()
        for column in ("image_id", "path", "source", "fold", "view", "patient_id", "height"):
            assert meta[column].tolist() == manifest[column].tolist()
        with h5py.File(out, "r") as file:
            assert file["images"].chunks == (1, 32, 32)
            assert file.attrs["n"] == 23 and file.attrs["version"] == CACHE_VERSION
            assert file["masks"].shape == (23, 32, 4)  # bit-packed rows


def test_masks_come_from_rle_mask_file_or_nothing(tmp_path: Path) -> None:
    manifest = make_png_manifest(tmp_path / "png", 5)
    for row in manifest.to_dict("records"):
        image, mask, has_mask = read_sample(row)
        assert image.shape == mask.shape == (row["height"], row["width"])
        assert has_mask == (isinstance(row["rle"], str) or isinstance(row["mask_path"], str))
        assert int(mask.sum()) == max(row["mask_area"], 0)


def test_image_ids_map_to_their_rows(tmp_path: Path) -> None:
    manifest = make_png_manifest(tmp_path / "png", 12).sample(frac=1.0, random_state=3)
    out = tmp_path / "c.h5"
    build_cache(manifest, out, size=16, chunk=4, progress=False)
    reader = CacheReader(out)
    assert list(reader.image_ids) == manifest["image_id"].tolist()
    for row, image_id in enumerate(manifest["image_id"]):
        assert reader.index_of(image_id) == row
    with pytest.raises(KeyError, match="'missing' is not in cache"):
        reader.index_of("missing")
    with pytest.raises(IndexError, match="out of range"):
        reader[12]
    np.testing.assert_array_equal(reader[-1][0], reader[11][0])


def test_bad_files_are_skipped_and_listed(tmp_path: Path) -> None:
    manifest = make_png_manifest(tmp_path / "png", 10)
    Path(manifest.loc[3, "path"]).write_bytes(b"not a png at all")
    manifest.loc[6, "path"] = str(tmp_path / "png" / "gone.png")
    manifest.loc[5, "rle"] = "5 3 7"  # odd token count
    manifest.loc[0, "height"] = 999  # disagrees with the file
    out = tmp_path / "c.h5"
    report = build_cache(manifest, out, size=16, chunk=4, progress=False)
    bad = {"id0000", "id0003", "id0005", "id0006"}
    assert report.n_written == 6 and report.n_skipped == 4
    assert {s.image_id for s in report.skipped} == bad
    by_id = {s.image_id: s for s in report.skipped}
    assert by_id["id0006"].path.endswith("gone.png")
    assert "rle" in by_id["id0005"].error and "999" in by_id["id0000"].error
    listed = pd.read_csv(tmp_path / "c.h5.skipped.csv")
    assert list(listed.columns) == ["image_id", "path", "error"]
    assert set(listed["image_id"]) == bad
    assert not bad & set(CacheReader(out).image_ids)


_KILLED_CHILD = r"""
import sys, time
import pandas as pd
from ssl_ptx.data import cache
from ssl_ptx.data.manifest import MANIFEST_COLUMNS

manifest = pd.read_pickle(sys.argv[1])
real_read, calls = cache.read_image, [0]

def read_then_hang(path):
    calls[0] += 1
    if calls[0] > int(sys.argv[3]):
        time.sleep(120)  # stuck mid-build: the parent kills us here
    return real_read(path)

cache.read_image = read_then_hang
cache.build_cache(manifest, sys.argv[2], size=24, chunk=4, progress=False)
"""


def test_killed_build_resumes_to_the_same_cache(tmp_path: Path, monkeypatch) -> None:
    manifest = make_png_manifest(tmp_path / "png", 18, seed=1)
    manifest.to_pickle(tmp_path / "m.pkl")
    out = tmp_path / "killed.h5"
    parts = tmp_path / "killed.h5.parts"
    # 10 image reads = block 0 (4 images + 1 mask file) and block 1, then it hangs in block 2
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_CHILD, str(tmp_path / "m.pkl"), str(out), "10"]
    )
    try:
        deadline = time.monotonic() + 60
        while not (parts / "part-000001.h5").exists():
            assert child.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no part file appeared"
            time.sleep(0.05)
        time.sleep(0.3)
        assert not out.exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    assert sorted(p.name for p in parts.glob("part-*.h5")) == ["part-000000.h5", "part-000001.h5"]

    read_paths: list[str] = []
    real_read = cache_module.read_image
    monkeypatch.setattr(
        cache_module, "read_image", lambda path: read_paths.append(str(path)) or real_read(path)
    )
    report = build_cache(manifest, out, size=24, chunk=4, progress=False)
    assert report.blocks_reused == 2
    assert set(read_paths).isdisjoint(manifest["path"].iloc[:8])  # done blocks not reread
    monkeypatch.undo()

    straight = tmp_path / "straight.h5"
    build_cache(manifest, straight, size=24, chunk=4, progress=False)
    resumed, expected = _arrays(out), _arrays(straight)
    for key in expected:
        np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)
    assert not parts.exists()


def test_parts_of_another_build_are_refused_unless_overwrite(tmp_path: Path, monkeypatch) -> None:
    manifest = make_png_manifest(tmp_path / "png", 8)
    out = tmp_path / "c.h5"

    def interrupt(path):
        raise KeyboardInterrupt

    real_read = cache_module.read_image
    calls = [0]

    def read_then_interrupt(path):
        calls[0] += 1
        return real_read(path) if calls[0] <= 5 else interrupt(path)

    monkeypatch.setattr(cache_module, "read_image", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        build_cache(manifest, out, size=16, chunk=4, progress=False)
    monkeypatch.undo()
    assert not out.exists()
    assert [p.name for p in (tmp_path / "c.h5.parts").iterdir() if p.suffix != ".json"] == [
        "part-000000.h5"
    ]  # no half-written part left behind
    with pytest.raises(ValueError, match="another manifest, size or chunk"):
        build_cache(manifest, out, size=20, chunk=4, progress=False)
    report = build_cache(manifest, out, size=20, chunk=4, progress=False, overwrite=True)
    assert report.blocks_reused == 0 and CacheReader(out).size == 20
    with pytest.raises(FileExistsError, match="c.h5 exists"):
        build_cache(manifest, out, size=20, progress=False)


def _peak_build_bytes(manifest: pd.DataFrame, out: Path, size: int) -> int:
    tracemalloc.start()
    try:
        build_cache(manifest, out, size=size, chunk=8, progress=False)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_build_memory_does_not_grow_with_the_number_of_images(tmp_path: Path) -> None:
    """Loose check of the Python/numpy peak (tracemalloc); the benchmark measures RSS.

    Holding every image would add at least one stored image (size² bytes) per extra row; the
    streaming build only adds manifest bookkeeping (well under half of that).
    """
    size, n_small, n_large = 64, 32, 128
    build_cache(make_png_manifest(tmp_path / "warm", 4), tmp_path / "warm.h5", progress=False)
    small = make_png_manifest(tmp_path / "small", n_small, side=96)
    large = make_png_manifest(tmp_path / "large", n_large, side=96)
    peak_small = _peak_build_bytes(small, tmp_path / "small.h5", size)
    peak_large = _peak_build_bytes(large, tmp_path / "large.h5", size)
    assert peak_large - peak_small < 0.5 * (n_large - n_small) * size * size
    assert peak_large < n_large * size * size  # less than the images alone, masks aside


def _sum_first_image(reader: CacheReader) -> int:
    return int(reader[0][0].sum())


def test_reader_reopens_in_forked_and_spawned_workers(tmp_path: Path) -> None:
    manifest = make_png_manifest(tmp_path / "png", 4)
    out = tmp_path / "c.h5"
    build_cache(manifest, out, size=16, progress=False)
    reader = CacheReader(out)
    expected = _sum_first_image(reader)  # opens the file in the parent first
    clone = pickle.loads(pickle.dumps(reader))
    assert _sum_first_image(clone) == expected
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            assert pool.apply(_sum_first_image, (reader,)) == expected
    reader.close()
    assert _sum_first_image(reader) == expected  # reopens after close


def test_empty_manifest_gives_an_empty_cache(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    report = build_cache(empty_manifest(), out, size=8, progress=False)
    assert report.n_written == 0 and len(CacheReader(out)) == 0


def test_command_line_builds_from_a_manifest_csv(tmp_path: Path, capsys) -> None:
    manifest = make_png_manifest(tmp_path / "png", 6)
    csv = tmp_path / "manifest.csv"
    manifest.to_csv(csv, index=False)
    out = tmp_path / "cli.h5"
    assert main([str(csv), str(out), "--size", "20", "--chunk", "4", "--no-progress"]) == 0
    assert "wrote 6 images" in capsys.readouterr().out
    reference = tmp_path / "direct.h5"
    build_cache(manifest, reference, size=20, chunk=4, progress=False)
    for key, value in _arrays(reference).items():
        np.testing.assert_array_equal(_arrays(out)[key], value, err_msg=key)


def test_opening_a_missing_or_foreign_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        CacheReader(tmp_path / "nothing.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as file:
        file["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="foreign.h5: cache version None"):
        CacheReader(foreign)
