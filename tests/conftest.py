"""Shared fixtures: the real label files shipped in torchxrayvision and a small demo root."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def xrv_data_dir() -> Path:
    """torchxrayvision's ``data/`` folder with the real SIIM, CheXpert and NIH label files."""
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or spec.origin is None:
        pytest.fail("torchxrayvision is not installed: run `make test` or `pip install -e .[dev]`")
    return Path(spec.origin).parent / "data"


@pytest.fixture(scope="session")
def siim_rle_csv(xrv_data_dir: Path) -> Path:
    """The real stage-1 ``train-rle.csv`` (12,954 rows), gzipped."""
    return xrv_data_dir / "siim-pneumothorax-train-rle.csv.gz"


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo data root, written once per session: 48 SIIM images, 40 CheXpert, 40 NIH and
    6 Montgomery at 128², seed 0 (true external masks in ``_truth/``)."""
    from ssl_ptx.data.demo import write_demo_root

    root = tmp_path_factory.mktemp("demo_root")
    write_demo_root(
        root, n_siim=48, n_chexpert=40, n_nih=40, n_montgomery=6, size=128, seed=0, progress=False
    )
    return root
