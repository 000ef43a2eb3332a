"""One Mean-Teacher step against the sum of its parts measured alone (target ≤ 1.1×).

The step is ``MeanTeacher.training_loss`` (student forward on labelled + unlabelled images,
teacher forward, losses) + backward + Adam step + ``update_teacher`` (EMA update, and with the
default ``teacher_bn="refresh"`` a train-mode teacher forward on the labelled batch). The parts,
each timed alone on the same model and inputs: student forward + backward on the concatenated
batch (BCE on the labelled rows + the same consistency on the unlabelled rows), the teacher's
no-grad forward(s), the Adam step, ``ModelEMA.update``. Prints median milliseconds over rounds
that alternate the step and the parts.

    python benchmarks/bench_mean_teacher.py [--encoder resnet34] [--size 64] [--labelled 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from _timing import seconds

from ssl_ptx.mean_teacher import MeanTeacher, sigmoid_mse
from ssl_ptx.models import create_model


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoder", default="resnet34", help="encoder of the UNet-CBAM")
    parser.add_argument("--size", type=int, default=64, help="image side, multiple of 32")
    parser.add_argument("--labelled", type=int, default=4, help="labelled images per step")
    parser.add_argument("--unlabelled", type=int, default=2, help="unlabelled images per step")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(
        {"encoder_name": args.encoder, "encoder_weights": None, "in_channels": 1}
    ).to(device)
    model.train()
    mt = MeanTeacher(model, rampup_length=0)
    optimizer = torch.optim.Adam(model.parameters(), 3e-4)
    shape = (1, args.size, args.size)
    x_lab = torch.randn(args.labelled, *shape, device=device)
    y = (torch.rand(args.labelled, *shape, device=device) > 0.9).float()
    x_unl_s = torch.randn(args.unlabelled, *shape, device=device)
    x_unl_t = x_unl_s + 0.1 * torch.randn_like(x_unl_s)

    def mean_teacher_step() -> None:
        loss, _ = mt.training_loss(x_lab, y, x_unl_s, x_unl_t, F.binary_cross_entropy_with_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        mt.update_teacher()

    with torch.no_grad():
        target = mt.teacher.module(x_unl_t)

    def student_forward_backward() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(torch.cat([x_lab, x_unl_s]))
        n = args.labelled
        loss = F.binary_cross_entropy_with_logits(out[:n], y) + sigmoid_mse(out[n:], target)
        loss.backward()

    def teacher_forwards() -> None:
        mt.teacher_outputs(x_unl_t)
        with torch.no_grad():  # the BN refresh forward of teacher_bn="refresh"
            mt.teacher.module.train()
            mt.teacher.module(x_lab)
            mt.teacher.module.eval()

    parts = {
        "student_fwd_bwd": student_forward_backward,
        "teacher_forwards": teacher_forwards,
        "optimizer_step": optimizer.step,
        "ema_update": lambda: mt.teacher.update(model),
    }
    times: dict[str, list[float]] = {"step": [], **{name: [] for name in parts}}
    for round_ in range(args.repeats + 2):  # two warm-up rounds
        measured = {"step": seconds(mean_teacher_step, device)}
        measured.update({name: seconds(fn, device) for name, fn in parts.items()})
        if round_ >= 2:
            for name, value in measured.items():
                times[name].append(value)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    parts_sum = sum(ms[name] for name in parts)
    result = {
        "device": str(device),
        "encoder": args.encoder,
        "size": args.size,
        "batch": f"{args.labelled}+{args.unlabelled}",
        **{f"{name}_ms": round(value, 2) for name, value in ms.items()},
        "parts_sum_ms": round(parts_sum, 2),
        "ratio": round(ms["step"] / parts_sum, 3),
    }
    print(
        f"MeanTeacher step {ms['step']:.1f} ms vs parts "
        + " + ".join(f"{name} {ms[name]:.1f}" for name in parts)
        + f" = {parts_sum:.1f} ms: ratio {result['ratio']:.3f}x (target <= 1.1x) "
        f"[UNet-CBAM({args.encoder}), {args.size}², batch {result['batch']}, {device}]"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
