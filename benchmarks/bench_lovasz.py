"""Symmetric per-image Lovasz hinge, forward + backward: ssl_ptx against smp.

The baseline is what a user of segmentation_models_pytorch writes for the 3rd place's loss:
``LovaszLoss(mode="binary", per_image=True)`` applied to (z, y) and to (−z, 1 − y), halved —
two sorts per image in a Python loop over the batch. ``ssl_ptx.losses.symmetric_lovasz`` does
one batched radix sort of the pixels whose hinge error is positive.

Targets: real SIIM pneumothorax masks (the stage-1 ``train-rle.csv`` shipped with
torchxrayvision) resized to each size, on about 22 % of the images (2 of 8), the rest empty.
Logits: "untrained", z ~ N(0, 1) (about 84 % of errors positive), and "trained-like",
z = 4·(2y − 1) + N(0, 2²) (about 7 % positive). Each run also checks that both give the same
loss and gradient. Prints the median time of each over ``--repeats`` runs (alternating the
two) and the ratios; the targets are ≥ 3× (untrained) and ≥ 10× (trained-like).

    python benchmarks/bench_lovasz.py [--device cuda] [--sizes 256 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from _timing import seconds
from segmentation_models_pytorch.losses import LovaszLoss

from ssl_ptx.data.demo import real_siim_shapes
from ssl_ptx.losses import symmetric_lovasz

TARGET_SPEEDUP = {"untrained": 3.0, "trained-like": 10.0}


def siim_targets(batch: int, size: int, positive_rate: float, seed: int) -> torch.Tensor:
    """``[batch, 1, size, size]`` float masks: real SIIM shapes on ``round(rate·batch)`` images."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        raise SystemExit("bench_lovasz needs torchxrayvision for the real SIIM masks")
    csv = Path(spec.origin).parent / "data" / "siim-pneumothorax-train-rle.csv.gz"
    rng = np.random.default_rng(seed)
    shapes = real_siim_shapes(csv, rng, size, multi=False)
    targets = np.zeros((batch, 1, size, size), np.float32)
    n_positive = max(1, round(positive_rate * batch))
    for index in rng.choice(batch, n_positive, replace=False):
        targets[index, 0] = np.clip(np.sum(next(shapes), axis=0), 0, 1)
    return torch.from_numpy(targets)


def smp_symmetric_lovasz() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    hinge = LovaszLoss(mode="binary", per_image=True)
    return lambda z, y: 0.5 * (hinge(z, y) + hinge(-z, 1 - y))


def _time_backward(loss_fn, z: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds for one forward + backward, and the gradient."""
    z = z.detach().requires_grad_()
    elapsed = seconds(lambda: loss_fn(z, y).backward(), z.device)
    return elapsed, z.grad


def compare(z: torch.Tensor, y: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median ms of both implementations, their ratio, and how far their results differ."""
    baseline = smp_symmetric_lovasz()
    with torch.no_grad():
        ours_value, smp_value = symmetric_lovasz(z, y), baseline(z, y)
    _, ours_grad = _time_backward(symmetric_lovasz, z, y)  # warm-up, and the gradients
    _, smp_grad = _time_backward(baseline, z, y)
    times: dict[str, list[float]] = {"ssl_ptx": [], "smp": []}
    for _ in range(repeats):
        times["ssl_ptx"].append(_time_backward(symmetric_lovasz, z, y)[0])
        times["smp"].append(_time_backward(baseline, z, y)[0])
    ours_ms = 1e3 * statistics.median(times["ssl_ptx"])
    smp_ms = 1e3 * statistics.median(times["smp"])
    return {
        "ssl_ptx_ms": ours_ms,
        "smp_ms": smp_ms,
        "speedup": smp_ms / ours_ms,
        "loss": float(ours_value),
        "loss_relative_difference": float(abs(ours_value - smp_value) / abs(smp_value)),
        "grad_max_abs_difference": float((ours_grad - smp_grad).abs().max()),
        "grad_max_abs": float(smp_grad.abs().max()),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default: 8)")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="image sides (default: 256 512)"
    )
    parser.add_argument(
        "--positive-rate", type=float, default=0.22, help="share of positive images (0.22)"
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (default: 7)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    rows = []
    print(f"device {device}, batch {args.batch}, torch threads {torch.get_num_threads()}")
    print(
        f"{'size':>5} {'logits':<13} {'positive err':>12} {'ssl_ptx ms':>10} {'smp ms':>9} "
        f"{'speedup':>8} {'target':>7} {'loss rel diff':>13} {'grad max diff':>13}"
    )
    for size in args.sizes:
        y = siim_targets(args.batch, size, args.positive_rate, args.seed).to(device)
        generator = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(y.shape, generator=generator).to(device)
        for kind, z in (("untrained", noise), ("trained-like", 4 * (2 * y - 1) + 2 * noise)):
            figures = compare(z, y, args.repeats)
            positive_share = float(((1 - z * (2 * y - 1)) > 0).float().mean())
            target = TARGET_SPEEDUP[kind]
            row = {"size": size, "logits": kind, "positive_error_share": positive_share}
            row |= figures | {"target": target, "target_met": figures["speedup"] >= target}
            rows.append(row)
            print(
                f"{size:>5} {kind:<13} {positive_share:>12.1%} {figures['ssl_ptx_ms']:>10.1f} "
                f"{figures['smp_ms']:>9.1f} {figures['speedup']:>7.1f}x {target:>6.0f}x "
                f"{figures['loss_relative_difference']:>13.1e} "
                f"{figures['grad_max_abs_difference']:>13.1e}"
            )
    disagreements = [
        r
        for r in rows
        if r["loss_relative_difference"] > 1e-4
        or r["grad_max_abs_difference"] > 1e-4 * r["grad_max_abs"]
    ]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    if disagreements:
        raise SystemExit(f"ssl_ptx and smp disagree: {disagreements}")
    print("values and gradients agree with smp (loss rtol 1e-4, gradient 1e-4 of its max)")
    return rows


if __name__ == "__main__":
    main()
