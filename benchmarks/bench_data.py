"""Data-layer figures: cached vs direct sample loading, and cache-build memory vs data size.

1. Per-sample load time from the HDF5 cache against reading the DICOM and resizing it each time
   (the same images, the same output size, measured in this run). By default on a demo root of
   1024² DICOMs (SIIM's size) written for the purpose; --siim-dir times a given root instead.
2. Peak memory of the cache build over N1 and N2 demo images (default 500 and 2,000), each build
   in a fresh process: peak RSS growth during the build and the tracemalloc peak of Python/numpy
   allocations. A streaming build keeps both flat as N grows.

    python benchmarks/bench_data.py [--siim-dir ROOT] [--size 256] [--sizes 500 2000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _demo_siim(work: Path, n: int, size: int) -> Path:
    """A demo SIIM root of ``n`` DICOMs at ``size``², written once under ``work``."""
    from ssl_ptx.data.demo import write_demo_root

    root = work / f"load_demo_{n}_{size}"
    if not (root / "siim" / "train-rle.csv").exists():
        write_demo_root(
            root, n_siim=n, n_chexpert=0, n_nih=0, n_montgomery=0, size=size, seed=2, progress=False
        )
    return root / "siim"


def _load_times(siim_dir: Path, size: int, n: int) -> dict[str, float]:
    from ssl_ptx.data import rle
    from ssl_ptx.data.cache import CacheReader, build_cache
    from ssl_ptx.data.images import read_image, resize_image, resize_mask
    from ssl_ptx.data.siim import load_siim

    manifest = load_siim(siim_dir, progress=False).iloc[:n]
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "bench.h5"
        build_cache(manifest, cache, size=size, progress=False)
        reader = CacheReader(cache)
        order = np.random.default_rng(0).permutation(len(manifest))

        start = time.perf_counter()
        for i in order:
            _image, _mask = reader[int(i)]
        cached = (time.perf_counter() - start) / len(order)

        start = time.perf_counter()
        for i in order:
            row = manifest.iloc[int(i)]
            _image = resize_image(read_image(row["path"]), size)
            _mask = resize_mask(rle.decode(row["rle"], (row["height"], row["width"])), size)
        direct = (time.perf_counter() - start) / len(order)
        reader.close()
    return {
        "samples": len(order),
        "cache_ms": cached * 1e3,
        "dicom_ms": direct * 1e3,
        "speedup": direct / cached,
    }


_CHILD = r"""
import sys, tempfile, time, tracemalloc
from pathlib import Path
from ssl_ptx.data.demo import write_demo_root
from ssl_ptx.data.siim import load_siim
from ssl_ptx.data.cache import build_cache

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

n, size, root = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
if not (root / "siim" / "train-rle.csv").exists():
    write_demo_root(root, n_siim=n, n_chexpert=0, n_nih=0, n_montgomery=0, size=size, seed=1,
                    progress=False)
manifest = load_siim(root / "siim", progress=False)
rss_before = status_kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
tracemalloc.start()
with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    build_cache(manifest, Path(tmp) / "c.h5", size=size, progress=False)
    seconds = time.perf_counter() - start
peak = tracemalloc.get_traced_memory()[1]
print(n, seconds, peak, rss_before, status_kib("VmHWM"))
"""


def _build_memory(n: int, size: int, work: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(n), str(size), str(work / f"demo_{n}")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    _, seconds, peak, rss_before, rss_after = map(float, out[-5:])
    return {
        "images": n,
        "build_s": seconds,
        "tracemalloc_peak_mib": peak / 2**20,
        "rss_growth_mib": (rss_after - rss_before) / 1024,  # /proc figures are KiB
        "rss_peak_mib": rss_after / 1024,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--siim-dir", type=Path, help="SIIM root for the load timing (default: a demo root)"
    )
    parser.add_argument("--dicom-size", type=int, default=1024, help="side of the demo DICOMs")
    parser.add_argument("--size", type=int, default=256, help="cached side in pixels")
    parser.add_argument("--samples", type=int, default=200, help="images in the load timing")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[500, 2000], help="N for the memory runs"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("outputs/bench_data"),
        help="scratch folder for demo roots",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    siim_dir = args.siim_dir or _demo_siim(args.work, args.samples, args.dicom_size)
    figures = {"load": _load_times(siim_dir, args.size, args.samples)}
    print(
        f"per-sample load of {figures['load']['samples']} samples from {siim_dir} at {args.size}²:"
    )
    print(
        "  HDF5 cache {cache_ms:.3f} ms, DICOM read + resize {dicom_ms:.3f} ms, "
        "speed-up {speedup:.1f}x".format(**figures["load"])
    )
    figures["build_memory"] = [_build_memory(n, args.size, args.work) for n in args.sizes]
    for row in figures["build_memory"]:
        print(
            "cache build over {images} images: {build_s:.1f} s, "
            "tracemalloc peak {tracemalloc_peak_mib:.1f} MiB, RSS growth {rss_growth_mib:.1f} MiB "
            "(peak RSS {rss_peak_mib:.0f} MiB)".format(**row)
        )
    first, last = figures["build_memory"][0], figures["build_memory"][-1]
    print(
        f"memory ratio N={last['images']} / N={first['images']}: tracemalloc "
        f"{last['tracemalloc_peak_mib'] / max(first['tracemalloc_peak_mib'], 1e-9):.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
