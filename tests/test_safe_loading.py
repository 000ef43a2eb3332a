"""Safe loading (issue 10): no file the library reads can run code.

A checkpoint holding a pickle that would execute code (an object whose ``__reduce__`` opens a
marker file for writing) is refused by every load path a user reaches, with a clear error that
names the file, and the marker is never written. The payload is live: the same file loaded
unsafely (``torch.load(weights_only=False)``, ``pickle.loads``) does write the marker. YAML
configs with a python tag are refused the same way. A scan of the source tree keeps every
``torch.load`` at ``weights_only=True`` and every YAML read at ``yaml.safe_load``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ssl_ptx.cli import resolve_config
from ssl_ptx.config import PRESETS, ConfigError, apply_overrides, load_config, preset
from ssl_ptx.ema import ModelEMA
from ssl_ptx.engine import Trainer
from ssl_ptx.engine.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    load_checkpoint,
    load_weights,
)
from ssl_ptx.engine.ema_callback import EMACallback
from ssl_ptx.inference import Predictor, average_checkpoints, load_model
from ssl_ptx.lung_crop import LungCropper

sys.path.insert(0, str(Path(__file__).parent))
from test_inference import _load_recipe, _run_config  # noqa: E402
from test_trainer import TinyNet, ToySegmentation, bce, toy_loaders, trainer_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("ssl_ptx", "external_data", "recipes", "benchmarks")


class WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str, str]]:
        return open, (str(self.marker), "w")


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint that looks right (format, kind, model, config) with the payload inside."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": "full",
        "model": TinyNet().state_dict(),
        "config": {**_run_config(), "note": WritesMarker(marker)},
        "metrics": {"val_dice": 0.5},
    }
    torch.save(state, path)
    return path


def _evil_pickle(path: Path, marker: Path) -> Path:
    """A bare pickle (no zip archive) named like a checkpoint."""
    path.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "model": WritesMarker(marker)}))
    return path


def _evil_legacy(path: Path, marker: Path) -> Path:
    """The pre-1.6 torch.save format (a pickle stream, not a zip)."""
    torch.save({"model": WritesMarker(marker)}, path, _use_new_zipfile_serialization=False)
    return path


FILES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "checkpoint": (_evil_checkpoint, "holds objects that safe loading"),
    "bare_pickle": (_evil_pickle, "cannot read this checkpoint"),
    "legacy_torch": (_evil_legacy, "cannot read this checkpoint"),
}


def _load_recipe_module(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _resume_args(path: Path) -> argparse.Namespace:
    return argparse.Namespace(preset=None, config=None, overrides=[], resume=str(path), out=None)


def _trainer_with_ema_resume(path: Path) -> None:
    train_loader, _ = toy_loaders(ToySegmentation(n=16))
    ema = EMACallback(0.9, validate=False)
    trainer = Trainer(
        TinyNet(), bce, trainer_config(), out_dir=path.parent / "run", callbacks=[ema]
    )
    trainer.fit(train_loader, resume=path)


def _predict_recipe(path: Path) -> None:
    out = path.parent / "predict"
    _load_recipe().main([str(path), "--dicom-dir", str(path.parent), "--out", str(out)])


def _train_recipe_resume(path: Path) -> None:
    module = _load_recipe_module("train_supervised")
    module.main(["--resume", str(path), "--out", str(path.parent / "run"), "--no-progress"])


#: every way a user loads a checkpoint → the error it must raise
LOAD_PATHS: dict[str, tuple[Callable[[Path], Any], type[BaseException]]] = {
    "load_checkpoint": (load_checkpoint, CheckpointError),
    "load_weights": (lambda p: load_weights(TinyNet(), p), CheckpointError),
    "model_ema_load_weights": (lambda p: load_weights(ModelEMA(TinyNet()), p), CheckpointError),
    "inference_load_model": (load_model, CheckpointError),
    "average_checkpoints": (lambda p: average_checkpoints([p, p]), CheckpointError),
    "predictor_from_checkpoints": (
        lambda p: Predictor.from_checkpoints([p], device="cpu"),
        CheckpointError,
    ),
    "lung_cropper_from_checkpoint": (LungCropper.from_checkpoint, CheckpointError),
    "trainer_resume_with_ema": (_trainer_with_ema_resume, CheckpointError),
    "cli_resolve_config_resume": (
        lambda p: resolve_config(_resume_args(p), PRESETS, {}),
        CheckpointError,
    ),
    "recipe_train_supervised_resume": (_train_recipe_resume, SystemExit),
    "recipe_predict": (_predict_recipe, SystemExit),
}


@pytest.mark.parametrize("kind", list(FILES))
def test_the_payloads_are_live(kind: str, tmp_path: Path) -> None:
    """Loaded unsafely, each file does run its code (so the refusals below mean something)."""
    marker = tmp_path / "marker"
    path = FILES[kind][0](tmp_path / "evil.pt", marker)
    if kind == "bare_pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", list(FILES))
@pytest.mark.parametrize("load_path", list(LOAD_PATHS))
def test_code_in_a_checkpoint_never_runs(load_path: str, kind: str, tmp_path: Path) -> None:
    make, message = FILES[kind]
    load, error = LOAD_PATHS[load_path]
    marker = tmp_path / "marker"
    path = make(tmp_path / "evil.pt", marker)
    with pytest.raises(error) as caught:
        load(path)
    text = str(caught.value.code if isinstance(caught.value, SystemExit) else caught.value)
    assert str(path) in text and message in text, text
    assert not marker.exists()


def test_a_yaml_python_tag_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    command = f"!!python/object/apply:builtins.open [{str(marker)!r}, 'w']"
    config_file = tmp_path / "config.yaml"
    config_file.write_text(f"trainer:\n  lr: {command}\n")
    with pytest.raises(ConfigError, match="not valid YAML: could not determine a constructor"):
        load_config(config_file)
    with pytest.raises(ConfigError, match=r"--set .*cannot parse"):
        apply_overrides(preset("demo"), [f"trainer.lr={command}"])
    assert not marker.exists()
    args = argparse.Namespace(preset=None, config=config_file, overrides=[], resume=None)
    with pytest.raises(ConfigError, match=str(config_file)):
        resolve_config(args, PRESETS, {})
    assert not marker.exists()


# ----------------------------------------------------------------------------- the source scan

#: calls that unpickle or run code from a file, by dotted name
_FORBIDDEN = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads",
    "joblib.load", "pd.read_pickle", "pandas.read_pickle", "yaml.load", "yaml.load_all",
    "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load", "yaml.full_load_all",
    "marshal.load", "marshal.loads", "shelve.open", "torch.jit.load",
}  # fmt: skip


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword_is_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
        for k in call.keywords
    )


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """``file:line: call`` for every unsafe load in ``source``: ``torch.load`` without
    ``weights_only=True``, ``np.load`` with ``allow_pickle=True``, a call of
    :data:`_FORBIDDEN`, or ``load`` imported by name from torch / pickle / yaml."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "yaml"):
            for alias in node.names:
                if "load" in alias.name:
                    found.append(
                        f"{filename}:{node.lineno}: from {node.module} import {alias.name}"
                    )
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        unsafe = (
            name in _FORBIDDEN
            or (name == "torch.load" and not _keyword_is_true(node, "weights_only"))
            or (name in ("np.load", "numpy.load") and _keyword_is_true(node, "allow_pickle"))
        )
        if unsafe:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_scan_catches_unsafe_loads() -> None:
    bad = """
import pickle, torch, yaml, numpy as np
from torch import load
torch.load(path)
torch.load(path, weights_only=False)
yaml.load(text, Loader=yaml.Loader)
pickle.loads(data)
np.load(path, allow_pickle=True)
"""
    good = """
import torch, yaml, numpy as np
torch.load(path, map_location="cpu", weights_only=True)
yaml.safe_load(text)
np.load(path, allow_pickle=False)
"""
    assert [line.split(": ", 1)[1] for line in unsafe_loads(bad)] == [
        "from torch import load",
        "torch.load",
        "torch.load",
        "yaml.load",
        "pickle.loads",
        "np.load",
    ]
    assert unsafe_loads(good) == []


def test_every_load_in_the_source_tree_is_safe() -> None:
    files = sorted(path for folder in SCANNED for path in (ROOT / folder).rglob("*.py"))
    assert len(files) > 50
    found = [hit for path in files for hit in unsafe_loads(path.read_text(), str(path))]
    assert found == []
    loads = sum(path.read_text().count("torch.load(") for path in files)
    assert loads >= 1  # the checkpoint reader is scanned
