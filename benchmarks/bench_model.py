"""Forward + backward time of UNet-CBAM against smp's plain ``Unet`` with the same encoder.

Both models get the same encoder, decoder widths, decoder upsampling and input; the difference
is the CBAM module at the end of each decoder block (and, optionally, the hypercolumn head).
Prints the median milliseconds per training step (forward, loss, backward) over rounds that
alternate the models, and images/s.

    python benchmarks/bench_model.py [--encoder resnet34] [--size 256] [--batch 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from _timing import seconds
from torch import nn

from ssl_ptx.models import create_model

WARMUP_STEPS = 2  # the first CPU steps also build oneDNN kernels


def step_seconds(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds of one training step: forward, mean-logit loss, backward."""
    model.zero_grad(set_to_none=True)
    return seconds(lambda: model(x).mean().backward(), x.device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet34", help="smp or tu- encoder (resnet34)")
    parser.add_argument("--size", type=int, default=256, help="image side, multiple of 32")
    parser.add_argument("--batch", type=int, default=4, help="images per step (default: 4)")
    parser.add_argument("--in-channels", type=int, default=1, choices=(1, 3))
    parser.add_argument(
        "--decoder-channels",
        type=int,
        nargs=5,
        default=[256, 128, 64, 32, 16],
        help="decoder widths, coarse to fine (default: smp's 256 128 64 32 16)",
    )
    parser.add_argument("--cbam-kernel", type=int, default=7, help="CBAM spatial kernel (7)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps (default: 5)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    device = torch.device(args.device)
    common = {
        "encoder_name": args.encoder,
        "encoder_weights": None,
        "in_channels": args.in_channels,
        "decoder_channels": tuple(args.decoder_channels),
        "decoder_interpolation": "bilinear",
    }
    models = {
        "smp_unet": smp.Unet(**common, classes=1),
        "unet_cbam": create_model("unet_cbam", **common, cbam_kernel=args.cbam_kernel),
        "unet_cbam_hypercolumn": create_model(
            "unet_cbam", **common, cbam_kernel=args.cbam_kernel, hypercolumn=True
        ),
    }
    x = torch.randn(args.batch, args.in_channels, args.size, args.size, device=device)
    for model in models.values():
        model.to(device).train()
        for _ in range(WARMUP_STEPS):
            step_seconds(model, x)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.repeats):  # round-robin, so that a busy moment hits every model
        for name, model in models.items():
            times[name].append(step_seconds(model, x))
    figures: dict[str, float] = {}
    for name, model in models.items():
        seconds = statistics.median(times[name])
        figures[f"{name}_ms"] = 1e3 * seconds
        figures[f"{name}_images_per_s"] = args.batch / seconds
        figures[f"{name}_parameters_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    for name in ("unet_cbam", "unet_cbam_hypercolumn"):
        figures[f"{name}_overhead"] = figures[f"{name}_ms"] / figures["smp_unet_ms"] - 1
    print(
        f"{args.encoder}, {args.batch}×{args.in_channels}×{args.size}², device {device}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for name in models:
        overhead = figures.get(f"{name}_overhead")
        print(
            f"{name:<22} {figures[f'{name}_ms']:>8.1f} ms/step "
            f"{figures[f'{name}_images_per_s']:>7.1f} img/s "
            f"{figures[f'{name}_parameters_m']:>6.2f} M params"
            + ("" if overhead is None else f"  {overhead:+.1%} vs smp Unet")
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
