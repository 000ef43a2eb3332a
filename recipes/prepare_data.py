"""Prepare SIIM data for training: manifest with folds → HDF5 cache → a picture to check it.

Reads a SIIM root in its published layout (the DICOM tree and train-rle.csv or
stage_2_train.csv; the demo root written by `python -m ssl_ptx.data.demo` has the same layout),
and writes to --out:

  manifest.csv        one row per image: id, path, label, union RLE, fold, view, size, area
  cache_<size>.h5     images and masks decoded and resized once (resumable; rerun to continue;
                      rebuilt when the label CSV has changed since, e.g. a rewritten demo root)
  cache_grid.png      a contact sheet of cached images, pneumothorax outlined in red

Example:
  python recipes/prepare_data.py --siim-dir demo_data/siim --out outputs/demo --size 256
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_ptx.data.cache import CacheReader, build_cache
from ssl_ptx.data.siim import find_label_csv, load_siim
from ssl_ptx.fileio import atomic_path, atomic_write_bytes
from ssl_ptx.viz import cache_contact_sheet, write_png


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--siim-dir", type=Path, required=True, help="SIIM root (DICOM tree + label CSV)"
    )
    parser.add_argument("--csv", type=Path, help="label CSV (default: found under --siim-dir)")
    parser.add_argument("--out", type=Path, default=Path("outputs/siim"), help="output folder")
    parser.add_argument("--size", type=int, default=256, help="cached image side in pixels")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fold assignment")
    parser.add_argument("--grid", type=int, default=24, help="images in the contact sheet")
    parser.add_argument("--rebuild-cache", action="store_true", help="rebuild an existing cache")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def _label_csv_identity(csv: Path) -> str:
    """Path, size and modification time of the label CSV: a rewritten root changes it."""
    stat = csv.stat()
    return f"{csv.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    progress = not args.no_progress
    manifest = load_siim(
        args.siim_dir, csv=args.csv, n_folds=args.folds, seed=args.seed, progress=progress
    )
    manifest_path = args.out / "manifest.csv"
    with atomic_path(manifest_path) as tmp:
        manifest.to_csv(tmp, index=False)
    n_pos = int((manifest["label"] == 1).sum())
    share = n_pos / max(len(manifest), 1)
    print(f"manifest: {len(manifest)} images, {n_pos} positive ({share:.1%}), {args.folds} folds")
    print(f"          -> {manifest_path}")

    cache_path = args.out / f"cache_{args.size}.h5"
    source_path = cache_path.with_suffix(".source")
    source = _label_csv_identity(args.csv or find_label_csv(args.siim_dir))
    stale = source_path.is_file() and source_path.read_text() != source
    if stale:
        print(f"cache: {cache_path} was built from an older label CSV; rebuilding")
    if cache_path.exists() and not (args.rebuild_cache or stale):
        with CacheReader(cache_path) as cache:
            if not set(cache.image_ids) <= set(manifest["image_id"]):
                raise SystemExit(
                    f"{cache_path} holds other images than the manifest; use --rebuild-cache"
                )
            n_cached = len(cache)
        print(f"cache: reusing {cache_path} ({n_cached} images; --rebuild-cache to rebuild)")
    else:
        report = build_cache(
            manifest,
            cache_path,
            size=args.size,
            progress=progress,
            overwrite=args.rebuild_cache or stale,
        )
        atomic_write_bytes(source_path, source.encode())
        print(f"cache: {report.n_written} images at {args.size}², {report.n_skipped} skipped")
        print(f"       -> {cache_path}")

    sheet = cache_contact_sheet(cache_path, n=args.grid, seed=args.seed)
    grid_path = write_png(args.out / "cache_grid.png", sheet)
    print(f"picture: {grid_path}")


if __name__ == "__main__":
    main()
