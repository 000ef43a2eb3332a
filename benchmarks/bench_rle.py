"""RLE encode/decode speed on the real SIIM rows, against straightforward loop versions.

Decodes and re-encodes every row of the real stage-1 ``train-rle.csv`` shipped with
torchxrayvision with ``ssl_ptx.data.rle``, and a sample of the same rows with a per-pixel loop
encoder and a per-run loop decoder (the full set would take the loop encoder about an hour).
Prints per-row times and the speed-up ratios measured in this one run.

    python benchmarks/bench_rle.py [--baseline-rows 200]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ssl_ptx.data import rle

SHAPE = (1024, 1024)


def loop_encode(mask: np.ndarray) -> str:
    """Reference encoder: one Python step per pixel, column-major, relative starts."""
    tokens: list[int] = []
    run_start, previous_end = -1, 0
    for index, value in enumerate(mask.T.ravel().tolist()):
        if value and run_start < 0:
            run_start = index
        elif not value and run_start >= 0:
            tokens += [run_start - previous_end, index - run_start]
            previous_end, run_start = index, -1
    if run_start >= 0:
        tokens += [run_start - previous_end, mask.size - run_start]
    return " ".join(map(str, tokens)) if tokens else "-1"


def loop_decode(text: str, shape: tuple[int, int] = SHAPE) -> np.ndarray:
    """Reference decoder: one Python step per run."""
    flat = np.zeros(shape[0] * shape[1], np.uint8)
    values = text.split()
    if values != ["-1"]:
        position = 0
        for start, length in zip(values[0::2], values[1::2], strict=True):
            position += int(start)
            flat[position : position + int(length)] = 1
            position += int(length)
    return flat.reshape(shape[1], shape[0]).T


def _per_row_seconds(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(item)
    return (time.perf_counter() - start) / len(items)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline-rows", type=int, default=200, help="rows timed with the loop versions"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    csv = (
        Path(importlib.util.find_spec("torchxrayvision").origin).parent
        / "data"
        / "siim-pneumothorax-train-rle.csv.gz"
    )
    values = pd.read_csv(csv).iloc[:, 1].str.strip().tolist()
    masks = [rle.decode(v) for v in values]

    ours_decode = _per_row_seconds(rle.decode, values)
    ours_encode = _per_row_seconds(rle.encode, masks)
    # the baseline sample keeps the real positive/negative mix: every k-th row
    step = max(1, len(values) // args.baseline_rows)
    sample = list(range(0, len(values), step))[: args.baseline_rows]
    loop_dec = _per_row_seconds(loop_decode, [values[i] for i in sample])
    # ssl_ptx returns a C-contiguous H×W array; the loop's transposed view is not one
    loop_dec_c = _per_row_seconds(
        lambda v: np.ascontiguousarray(loop_decode(v)), [values[i] for i in sample]
    )
    loop_enc = _per_row_seconds(loop_encode, [masks[i] for i in sample])
    assert all(loop_encode(masks[i]) == values[i] for i in sample[:20]), "loop encoder disagrees"

    figures = {
        "rows": len(values),
        "ssl_ptx_decode_ms_per_row": ours_decode * 1e3,
        "ssl_ptx_encode_ms_per_row": ours_encode * 1e3,
        "ssl_ptx_all_rows_decode_plus_encode_s": (ours_decode + ours_encode) * len(values),
        "loop_rows_sampled": len(sample),
        "loop_decode_ms_per_row": loop_dec * 1e3,
        "loop_decode_contiguous_ms_per_row": loop_dec_c * 1e3,
        "loop_encode_ms_per_row": loop_enc * 1e3,
        "decode_speedup_vs_view": loop_dec / ours_decode,
        "decode_speedup_vs_contiguous": loop_dec_c / ours_decode,
        "encode_speedup": loop_enc / ours_encode,
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(
            f"{key:<{width}}  {value:,.3f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
