"""Every benchmark in one run: a table of figures and ratios against the reference measured in
the same run, as JSON and as Markdown in ``docs/benchmarks.md``.

Runs, in this process and with quick settings (``--full``: each benchmark's own defaults):

  rle            bench_rle.py           encode / decode vs straightforward Python loops
  data           bench_data.py          HDF5 cache vs DICOM read + resize; cache-build memory
  lovasz         bench_lovasz.py        symmetric Lovasz forward + backward vs smp, twice
  ema            bench_ema.py           ModelEMA.update vs timm's ModelEmaV3.update
  mean_teacher   bench_mean_teacher.py  one Mean-Teacher step vs its parts timed alone
  model          bench_model.py         UNet-CBAM training step vs smp's Unet
  inference      bench_inference.py     Predictor throughput, probability storage, rule tuner,
                                        and with a checkpoint the end-to-end speed on its fold
  filter         bench_filter.py        PseudoLabelFilter end to end vs the model alone
  gpu            (CUDA only)            training images/s of the full preset (576², bf16
                                        autocast, channels_last, SE-ResNeXt50 UNet-CBAM) and
                                        inference images/s at 1024², each against fp32

The inference benchmark's checkpoint part uses the newest
``outputs/demo_supervised/checkpoints/best-*.pt`` (``make demo``) or --checkpoint; without one
it measures the demo preset's untrained model only, and the table says so. The table's ratio is
how many times better ssl_ptx's figure is than the reference's (faster, or smaller), so > 1
favours ssl_ptx. The Markdown replaces what lies between ``<!-- run_all:begin -->`` and
``<!-- run_all:end -->`` in the page (appended at its end when the markers are missing); the
rest of the page is kept.

    python benchmarks/run_all.py                     # quick settings: minutes on 2 idle cores
    python benchmarks/run_all.py --only rle ema --markdown none
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from ssl_ptx.fileio import atomic_write_bytes

__all__ = [
    "BEGIN_MARKER",
    "END_MARKER",
    "Figure",
    "environment",
    "gpu_figures",
    "main",
    "markdown_table",
    "replace_between_markers",
]

ROOT = Path(__file__).resolve().parents[1]
BEGIN_MARKER = "<!-- run_all:begin -->"
END_MARKER = "<!-- run_all:end -->"
NAMES = ("rle", "data", "lovasz", "ema", "mean_teacher", "model", "inference", "filter", "gpu")


@dataclass
class Figure:
    """One row of the table.

    Attributes:
        benchmark: the benchmark's name (``NAMES``).
        measure: what was measured, with its setting.
        value: ssl_ptx's figure.
        unit: its unit (ms, img/s, MiB, s …).
        reference: what it is compared with ("" when nothing is).
        reference_value: the reference's figure in the same unit (NaN when none).
        higher_is_better: True for rates (img/s), False for times and memory.
    """

    benchmark: str
    measure: str
    value: float
    unit: str
    reference: str = ""
    reference_value: float = math.nan
    higher_is_better: bool = False

    @property
    def ratio(self) -> float:
        """How many times better ``value`` is than ``reference_value`` (> 1 favours ssl_ptx)."""
        if not (self.value > 0 and self.reference_value > 0):
            return math.nan
        if self.higher_is_better:
            return self.value / self.reference_value
        return self.reference_value / self.value

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


# ------------------------------------------------------------------------- the benchmarks


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported under its own name (the folder is not a package; it
    goes on ``sys.path`` so that spawned worker processes can import the module too)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


def _rle(figures: dict) -> list[Figure]:
    sample = f"loop timed on {figures['loop_rows_sampled']} rows"
    return [
        Figure(
            "rle",
            f"decode, {figures['rows']:,} real SIIM rows at 1024²",
            figures["ssl_ptx_decode_ms_per_row"],
            "ms/row",
            f"Python loop per run, C-contiguous result ({sample})",
            figures["loop_decode_contiguous_ms_per_row"],
        ),
        Figure(
            "rle",
            "encode, same rows",
            figures["ssl_ptx_encode_ms_per_row"],
            "ms/row",
            f"Python loop per pixel ({sample})",
            figures["loop_encode_ms_per_row"],
        ),
    ]


def _data(figures: dict) -> list[Figure]:
    load = figures["load"]
    first, last = figures["build_memory"][0], figures["build_memory"][-1]
    return [
        Figure(
            "data",
            f"load image + mask at 256², {load['samples']} samples",
            load["cache_ms"],
            "ms/sample",
            "pydicom read + OpenCV resize + RLE decode",
            load["dicom_ms"],
        ),
        Figure(
            "data",
            f"cache build, tracemalloc peak at {last['images']:,} images",
            last["tracemalloc_peak_mib"],
            "MiB",
            f"the same at {first['images']:,} images (flat = 1)",
            first["tracemalloc_peak_mib"],
        ),
    ]


def _lovasz(rows: list[dict]) -> list[Figure]:
    return [
        Figure(
            "lovasz",
            f"symmetric Lovasz fwd + bwd, 8 × {row['size']}², {row['logits']} logits",
            row["ssl_ptx_ms"],
            "ms",
            "smp LovaszLoss(per_image=True), twice",
            row["smp_ms"],
        )
        for row in rows
    ]


def _ema(figures: dict) -> list[Figure]:
    return [
        Figure(
            "ema",
            f"ModelEMA.update, UNet-CBAM({figures['encoder']}) {figures['parameters_M']}M params",
            figures["ssl_ptx_ms"],
            "ms",
            "timm ModelEmaV3.update",
            figures["timm_ms"],
        )
    ]


def _mean_teacher(figures: dict) -> list[Figure]:
    return [
        Figure(
            "mean_teacher",
            f"MeanTeacher step, {figures['encoder']} {figures['size']}², batch {figures['batch']}",
            figures["step_ms"],
            "ms",
            "sum of its parts timed alone",
            figures["parts_sum_ms"],
        )
    ]


def _model(figures: dict, setting: str) -> list[Figure]:
    return [
        Figure(
            "model",
            f"UNet-CBAM training step, {setting}",
            figures["unet_cbam_ms"],
            "ms",
            "smp Unet, same encoder and decoder widths",
            figures["smp_unet_ms"],
        )
    ]


def _inference(figures: dict, checkpoint: Path | None) -> list[Figure]:
    rows = []
    if "throughput" in figures:
        speed = figures["throughput"]
        rows += [
            Figure(
                "inference",
                f"Predictor.predict_batch, demo preset (untrained), {speed['size']}², no TTA",
                speed["no_tta_img_s"],
                "img/s",
                higher_is_better=True,
            ),
            Figure(
                "inference",
                f"the same with horizontal-flip TTA, {speed['size']}²",
                speed["hflip_tta_img_s"],
                "img/s",
                higher_is_better=True,
            ),
        ]
    if "storage" in figures:
        store = figures["storage"]
        rows.append(
            Figure(
                "inference",
                f"ProbabilityStore of {store['maps']:,} maps at {store['side']}² (uint8)",
                store["uint8_store_traced_mib"],
                "MiB",
                "list of float32 maps",
                store["float32_list_traced_mib"],
            )
        )
    if "tuner" in figures:
        tuner = figures["tuner"]
        rows.append(
            Figure(
                "inference",
                f"triplet tuner, {tuner['grid_points']} rules × {tuner['maps']:,} maps at "
                f"{tuner['side']}²",
                tuner["triplet_tune_s"],
                "s",
                "each rule applied to each map (estimated from a subset)",
                tuner["naive_estimate_s"],
            )
        )
    if "held_out" in figures and checkpoint is not None:
        held = figures["held_out"]
        rows.append(
            Figure(
                "inference",
                f"end to end (DICOM read → paste back), {checkpoint.name}, "
                f"{held['images']} validation images, flip TTA",
                held["hflip_tta_end_to_end_img_s"],
                "img/s",
                higher_is_better=True,
            )
        )
    return rows


def _filter(figures: dict) -> list[Figure]:
    return [
        Figure(
            "filter",
            f"PseudoLabelFilter end to end, {figures['images']} CheXpert images at "
            f"{figures['size']}²",
            figures["filter_end_to_end_img_s"],
            "img/s",
            "Predictor.predict_batch alone on the same images",
            figures["model_alone_img_s"],
            higher_is_better=True,
        )
    ]


def newest_checkpoint(folder: Path) -> Path | None:
    """The highest-epoch ``best-*.pt`` in ``folder`` (None when there is none)."""
    found = sorted(folder.glob("best-*.pt"))
    return found[-1] if found else None


# ------------------------------------------------------------------------------------ GPU


def _synchronised_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds for ``repeats`` calls of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    timing = load_benchmark("_timing")
    return timing.seconds(lambda: [fn() for _ in range(repeats)], device)


def gpu_figures(
    device: torch.device,
    *,
    size: int = 576,
    batch: int = 9,
    steps: int = 30,
    inference_size: int = 1024,
    inference_batch: int = 8,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> list[Figure]:
    """Training and inference images/s of the full preset's model on ``device``.

    Training: ``steps`` optimiser steps (Adam, symmetric Lovasz, gradient clipping at 1) on
    synthetic ``[batch, 3, size, size]`` tensors with ~22 % positive masks, autocast to
    ``amp_dtype`` with the model and inputs in channels_last, against the same steps in float32
    with the default memory format. Inference: ``Predictor.predict_batch`` (no TTA) on
    ``[inference_batch, 1, inference_size, inference_size]`` images, the same two ways.
    """
    from ssl_ptx.config import config_to_dict, preset
    from ssl_ptx.inference import Predictor
    from ssl_ptx.losses import build_loss
    from ssl_ptx.models import create_model

    config = preset("full")
    torch.manual_seed(0)
    images = torch.rand(batch, config.model.in_channels, size, size, device=device)
    masks = torch.zeros(batch, 1, size, size, device=device)
    masks[: max(1, round(0.22 * batch)), :, size // 3 : size // 2, size // 4 : size // 3] = 1
    loss_fn = build_loss(config.loss.name)
    test_images = torch.rand(inference_batch, 1, inference_size, inference_size)
    rates: dict[str, dict[str, float]] = {}
    for name, dtype, memory_format in (
        ("fast", amp_dtype, torch.channels_last),
        ("fp32", None, torch.contiguous_format),
    ):
        model = create_model(config_to_dict(config.model)).to(device, memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.trainer.lr)
        inputs = images.contiguous(memory_format=memory_format)
        autocast = (
            functools.partial(torch.autocast, device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext
        )

        def step(model=model, optimizer=optimizer, inputs=inputs, autocast=autocast) -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(inputs).float(), masks)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.trainer.clip_grad_norm)
            optimizer.step()

        train_s = _synchronised_seconds(step, device, steps)
        predictor = Predictor(
            model,
            tta=(),
            device=device,
            amp="bf16" if dtype is not None else "none",
            progress=False,
        )
        infer_s = _synchronised_seconds(lambda p=predictor: p.predict_batch(test_images), device, 5)
        rates[name] = {"train": batch * steps / train_s, "infer": inference_batch * 5 / infer_s}
        del model, optimizer, predictor
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = config.model.encoder_name
    return [
        Figure(
            "gpu",
            f"training, full preset ({name} UNet-CBAM, hypercolumn) {size}², batch {batch}, "
            "bf16 autocast + channels_last",
            rates["fast"]["train"],
            "img/s",
            "the same in float32, default memory format",
            rates["fp32"]["train"],
            higher_is_better=True,
        ),
        Figure(
            "gpu",
            f"inference, full preset at {inference_size}², batch {inference_batch}, no TTA, "
            "bf16 + channels_last",
            rates["fast"]["infer"],
            "img/s",
            "the same in float32",
            rates["fp32"]["infer"],
            higher_is_better=True,
        ),
    ]


# ------------------------------------------------------------------------ the environment


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Where the figures were measured: device, CPU model, cores, torch threads, load."""
    info: dict[str, Any] = {
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = round(os.getloadavg()[0], 2)
    return info


def describe(env: dict[str, Any]) -> str:
    """One sentence naming the machine of ``env`` (see :func:`environment`)."""
    where = f"{env['gpu']} (CUDA) and " if env.get("gpu") else ""
    load = (
        f", load average {env['load_average_at_start']} at the start"
        if "load_average_at_start" in env
        else ""
    )
    return (
        f"{where}{env['cpu']} CPU, {env['cpu_cores']} cores, {env['torch_threads']} torch "
        f"threads{load}; torch {env['torch']}, Python {env['python']}"
    )


# ------------------------------------------------------------------------------ Markdown


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown_table(
    figures: Sequence[Figure], env: dict[str, Any], seconds: float, notes: Sequence[str] = ()
) -> str:
    """The Markdown block written between the markers: the machine, the table, the notes."""
    lines = [
        "## All benchmarks in one run (`benchmarks/run_all.py`)",
        "",
        f"Measured on {describe(env)}; the whole run took {seconds / 60:.1f} minutes. "
        "Ratio = how many times better ssl_ptx's figure is than the reference measured in the "
        "same run (faster, or smaller); > 1 favours ssl_ptx.",
        "",
        "| benchmark | measure | ssl_ptx | unit | reference | reference figure | ratio |",
        "| --- | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for figure in figures:
        ratio = figure.ratio
        lines.append(
            f"| {figure.benchmark} | {figure.measure} | {_number(figure.value)} | {figure.unit} "
            f"| {figure.reference} | {_number(figure.reference_value)} | "
            f"{'' if math.isnan(ratio) else f'{ratio:.2f}×'} |"
        )
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"


def replace_between_markers(
    page: str, block: str, begin: str = BEGIN_MARKER, end: str = END_MARKER
) -> str:
    """``page`` with the text between ``begin`` and ``end`` replaced by ``block`` (the markers
    kept); without the markers, ``block`` between new markers is appended to the page.

    Raises:
        ValueError: only one of the markers is present, or ``end`` comes before ``begin``.
    """
    has_begin, has_end = begin in page, end in page
    if not has_begin and not has_end:
        return page.rstrip("\n") + f"\n\n{begin}\n{block.rstrip()}\n{end}\n"
    if has_begin != has_end or page.index(end) < page.index(begin):
        raise ValueError(f"the page has a broken {begin} … {end} pair; fix it by hand")
    head, rest = page.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block.rstrip()}\n{end}{tail}"


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only", nargs="+", choices=NAMES, help="run these benchmarks only (default: all)"
    )
    parser.add_argument(
        "--full", action="store_true", help="each benchmark's own defaults (much longer)"
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint for the inference benchmark's end-to-end part (default: the newest "
        "outputs/demo_supervised/checkpoints/best-*.pt, if any)",
    )
    parser.add_argument(
        "--chexpert-dir",
        type=Path,
        default=ROOT / "demo_data" / "chexpert",
        help="CheXpert folder of the filter benchmark (default: demo_data/chexpert)",
    )
    parser.add_argument(
        "--gpu-steps", type=int, default=30, help="training steps of the GPU benchmark (30)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("outputs/benchmarks/run_all.json"),
        help="figures as JSON (default: outputs/benchmarks/run_all.json)",
    )
    parser.add_argument(
        "--markdown",
        default=str(ROOT / "docs" / "benchmarks.md"),
        help="page whose run_all block is replaced (default: docs/benchmarks.md; 'none': no page)",
    )
    return parser.parse_args(argv)


def plan(args: argparse.Namespace) -> dict[str, Callable[[], tuple[Any, list[Figure]]]]:
    """Benchmark name → a call returning ``(raw figures, table rows)``, in running order
    (``args.checkpoint``: the inference benchmark's checkpoint, or None)."""
    quick = not args.full
    checkpoint = args.checkpoint
    model_argv = ["--size", "128", "--batch", "2", "--repeats", "3"] if quick else []
    model_setting = "resnet34, 2 × 1 × 128²" if quick else "resnet34, 4 × 1 × 256²"
    inference_argv = (
        ["--maps", "200", "--images", "32", "--repeats", "2", "--splits", "2"] if quick else []
    )
    if checkpoint is None:
        inference_argv += ["--parts", "throughput", "storage", "tuner"]
    else:
        inference_argv += ["--checkpoint", str(checkpoint)]

    def run(module: str, argv: list[str], rows: Callable[[Any], list[Figure]]):
        def call() -> tuple[Any, list[Figure]]:
            raw = load_benchmark(module).main(argv)
            return raw, rows(raw)

        return call

    calls = {
        "rle": run("bench_rle", ["--baseline-rows", "60"] if quick else [], _rle),
        "data": run("bench_data", ["--sizes", "500", "2000"], _data),
        "lovasz": run(
            "bench_lovasz", ["--sizes", "256", "--repeats", "3"] if quick else [], _lovasz
        ),
        "ema": run("bench_ema", ["--repeats", "10"] if quick else [], _ema),
        "mean_teacher": run(
            "bench_mean_teacher", ["--repeats", "3"] if quick else [], _mean_teacher
        ),
        "model": run("bench_model", model_argv, lambda raw: _model(raw, model_setting)),
        "inference": run(
            "bench_inference", inference_argv, lambda raw: _inference(raw, checkpoint)
        ),
        "filter": run(
            "bench_filter",
            ["--chexpert-dir", str(args.chexpert_dir)]
            + (["--images", "64", "--repeats", "1"] if quick else []),
            _filter,
        ),
    }
    if torch.cuda.is_available():
        device = torch.device("cuda")
        calls["gpu"] = lambda: (None, gpu_figures(device, steps=args.gpu_steps))
    selected = args.only or NAMES
    return {name: call for name, call in calls.items() if name in selected}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    started = time.perf_counter()
    env = environment()
    checkpoint = args.checkpoint = args.checkpoint or newest_checkpoint(
        ROOT / "outputs" / "demo_supervised" / "checkpoints"
    )
    notes = [
        f"inference: the end-to-end row uses the trained checkpoint `{checkpoint}`"
        if checkpoint is not None
        else "inference: no trained checkpoint found (run `make demo`); only the demo "
        "preset's untrained model was measured (speed does not depend on the weights)"
    ]
    if not torch.cuda.is_available():
        notes.append("gpu: no CUDA device here, so no full-preset training or 1024² figures")
    raw: dict[str, Any] = {}
    table: list[Figure] = []
    errors: dict[str, str] = {}
    for name, call in plan(args).items():
        print(f"\n=== {name} ===", flush=True)
        tick = time.perf_counter()
        try:
            raw[name], rows = call()
        except (Exception, SystemExit) as error:  # one failure must not lose the other figures
            errors[name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
            notes.append(f"{name}: failed ({errors[name]})")
            continue
        table += rows
        print(f"=== {name}: {time.perf_counter() - tick:.0f} s", flush=True)
    seconds = time.perf_counter() - started
    block = markdown_table(table, env, seconds, notes)
    print("\n" + block)
    report = {
        "environment": env,
        "seconds": seconds,
        "settings": "full" if args.full else "quick",
        "table": [figure.as_dict() for figure in table],
        "notes": notes,
        "errors": errors,
        "raw": raw,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(report, indent=2, default=str).encode())
    if args.markdown != "none":
        page = Path(args.markdown)
        text = page.read_text() if page.is_file() else "# Benchmarks\n"
        atomic_write_bytes(page, replace_between_markers(text, block).encode())
    if errors:
        raise SystemExit(f"benchmarks failed: {sorted(errors)}")
    return report


if __name__ == "__main__":
    main()
