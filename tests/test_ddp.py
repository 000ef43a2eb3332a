"""DDP: a 2-process CPU (gloo) run under torchrun matches a 1-process run of the same global
batch. This file is also the script that torchrun starts (``python -m torch.distributed.run
--standalone --nproc_per_node=2 tests/test_ddp.py OUT``).

Why the two runs must agree: per-process batch = global batch / 2, the samplers shard one
shared order by rank (rank r takes positions r, r+2, …), so the two processes' batches of a
step are together the 1-process batch of that step, and DDP averages the gradients. The model
has no BatchNorm (whose statistics would be per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_ptx.config import DataConfig
from ssl_ptx.engine import Trainer, init_distributed, seed_everything
from ssl_ptx.engine.checkpoint import load_checkpoint
from ssl_ptx.engine.distributed import all_gather_objects, destroy_distributed
from ssl_ptx.engine.loaders import build_train_loader, build_val_loader

sys.path.insert(0, str(Path(__file__).parent))  # torchrun runs this file as a script
from test_trainer import TinyNet, ToySegmentation, bce, trainer_config  # noqa: E402

_DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def train_toy(out_dir: Path) -> tuple[Trainer, DataLoader, DataLoader]:
    """2 epochs of SGD on 32 toy images, global batch 4, 2 micro-batches per step; returns
    the trainer and its training and validation loaders."""
    context = init_distributed("cpu")
    seed_everything(0)
    dataset = ToySegmentation(n=32)
    data = DataConfig(batch_size=4, val_batch_size=3, num_workers=0)
    layout = {"world_size": context.world_size, "rank": context.rank}
    train_loader = build_train_loader(dataset, data, epochs=2, seed=0, **layout)
    val_loader = build_val_loader(dataset, data, **layout)
    config = trainer_config(
        optimizer="sgd", lr=0.5, momentum=0.9, accumulate=2, clip_grad_norm=1.0, top_k=1
    )
    trainer = Trainer(TinyNet(), bce, config, out_dir=out_dir)
    trainer.fit(train_loader, val_loader)
    return trainer, train_loader, val_loader


def test_two_process_gloo_run_matches_one_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV}
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        __file__,
        str(tmp_path / "ddp"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_sizes"] == [2, 2]
    assert report["shards"] == [[16, 16], [16, 16]]  # train and validation images per rank

    single, _, _ = train_toy(tmp_path / "single")
    assert single.world_size == 1
    ddp = load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert ddp["world_size"] == 2 and len(ddp["rng"]) == 2
    assert ddp["global_step"] == single.global_step == 8
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(ddp["model"][key], value, rtol=1e-5, atol=1e-6)
    assert ddp["metrics"]["val_images"] == 32  # gathered from both shards, none twice
    for key in ("val_dice", "val_dice_pos", "val_fp_rate", "val_loss", "train_loss"):
        assert ddp["metrics"][key] == pytest.approx(single.callback_metrics[key], abs=1e-4), key
    # rank 0 alone wrote the run's files
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == [
        "checkpoints",
        "curves.png",
        "last.pt",
        "metrics.csv",
        "report.json",
    ]


def _main(out_dir: Path) -> None:
    trainer, train_loader, val_loader = train_toy(out_dir)
    shards = all_gather_objects([len(train_loader.sampler), len(val_loader.sampler)])
    world_sizes = all_gather_objects(trainer.world_size)
    if trainer.is_main:
        report = {"world_sizes": world_sizes, "shards": shards}
        (out_dir / "report.json").write_text(json.dumps(report))
    destroy_distributed()


if __name__ == "__main__":
    _main(Path(sys.argv[1]))
