"""ModelEMA.update time against timm's ``ModelEmaV3.update`` on the UNet-CBAM (resnet34).

Both average every floating state entry (parameters and BatchNorm statistics) with one fused
foreach lerp and copy the integer buffers; they differ in how the tensors are gathered. The
student's weights are nudged between updates so every update does real work. Prints the
median milliseconds per update over rounds that alternate the two, and the ratio (target
≤ 1.0×).

    python benchmarks/bench_ema.py [--encoder resnet34] [--repeats 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from _timing import seconds
from timm.utils.model_ema import ModelEmaV3

from ssl_ptx.ema import ModelEMA
from ssl_ptx.models import create_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet34", help="encoder of the UNet-CBAM")
    parser.add_argument("--repeats", type=int, default=30, help="timed updates of each")
    parser.add_argument("--decay", type=float, default=0.999)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = create_model({"encoder_name": args.encoder, "encoder_weights": None}).to(device)
    ours = ModelEMA(model, decay=args.decay)
    timm_ema = ModelEmaV3(model, decay=args.decay)
    params = list(model.parameters())
    times: dict[str, list[float]] = {"ssl_ptx": [], "timm": []}
    with torch.no_grad():
        for round_ in range(args.repeats + 2):  # two warm-up rounds
            torch._foreach_add_(params, 1e-4)
            t_ours = seconds(lambda: ours.update(model), device)
            t_timm = seconds(lambda: timm_ema.update(model), device)
            if round_ >= 2:
                times["ssl_ptx"].append(t_ours)
                times["timm"].append(t_timm)
    figures = {name: 1000 * statistics.median(values) for name, values in times.items()}
    n_params = sum(p.numel() for p in params)
    result = {
        "device": str(device),
        "encoder": args.encoder,
        "parameters_M": round(n_params / 1e6, 2),
        "ssl_ptx_ms": round(figures["ssl_ptx"], 3),
        "timm_ms": round(figures["timm"], 3),
        "ratio": round(figures["ssl_ptx"] / figures["timm"], 3),
    }
    print(
        f"UNet-CBAM({args.encoder}) {result['parameters_M']}M parameters on {device}: "
        f"ModelEMA.update {result['ssl_ptx_ms']:.3f} ms, timm ModelEmaV3.update "
        f"{result['timm_ms']:.3f} ms, ratio {result['ratio']:.3f}x (target <= 1.0x)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
