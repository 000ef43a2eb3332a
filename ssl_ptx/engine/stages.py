"""Staged training: one config, consecutive runs ("stages"), each starting from the best weights
of the stage before — the 1st place's 512 → 1024 "uptrain" with falling learning rates and
positive rates, or the 10th place's BCE+Dice → soft pseudo labels → symmetric Lovasz.

A config declares ``stages``: a list of mappings of dotted keys (the ``--set`` syntax) to
values, e.g. in YAML::

    stages:
      - {data.size: 512, trainer.lr: 1.0e-4, data.positive_rate: 0.8, trainer.epochs: 30}
      - {data.size: 1024, trainer.lr: 1.0e-5, data.positive_rate: 0.6}

Stage k's config is the base config with the overrides of stages 1 … k applied in order
(cumulative: a stage changes what differs from the stage before), ``out_dir`` =
``OUT/stage-<k>`` and no ``stages``. Nested mappings (``{data: {size: 512}}``) work too.

Stage 1 starts as the base config says; stage k > 1 loads the weights (only: the optimiser and
the schedule start afresh) of stage k − 1's best checkpoint (``FitResult.best_checkpoint``; its
``last.pt`` when it kept none). ``OUT/last.pt`` records the staged run: its config and the
result of every finished stage. With ``resume=True`` finished stages are not redone and an
interrupted stage continues from its own ``last.pt``, so a run killed in stage 2 resumes in
stage 2 and ends with the weights of an uninterrupted run (on CPU, same seed).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ssl_ptx.config import ConfigError, config_from_dict, config_to_dict, save_config
from ssl_ptx.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ssl_ptx.engine.distributed import barrier, init_distributed
from ssl_ptx.engine.trainer import FitResult

__all__ = ["STAGES_KIND", "BuildAndFit", "run_stages", "stage_configs", "stage_dir"]

logger = logging.getLogger(__name__)

ConfigT = TypeVar("ConfigT")
#: ``kind`` of the ``OUT/last.pt`` that records a staged run
STAGES_KIND = "stages"
#: ``build_and_fit(stage_config, init_weights, resume) -> FitResult``: build the stage's data,
#: model (loading ``init_weights`` when not None) and Trainer, and fit (from ``resume``, a
#: ``last.pt``, when not None)
BuildAndFit = Callable[[Any, Path | None, Path | None], FitResult]
_RESERVED = ("stages", "out_dir")


def stage_dir(out_dir: str | Path, index: int) -> Path:
    """Output folder of stage ``index`` (1-based): ``OUT/stage-<index>``."""
    return Path(out_dir) / f"stage-{index}"


def _nested(overrides: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"data.size": 64}`` → ``{"data": {"size": 64}}``; reserved keys are refused."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{where}: keys must be dotted config names, got {key!r}")
        *parents, leaf = key.split(".")
        if key.split(".")[0] in _RESERVED:
            raise ConfigError(f"{where}: {key!r} cannot be set per stage")
        section = nested
        for name in parents:
            section = section.setdefault(name, {})
            if not isinstance(section, dict):
                raise ConfigError(f"{where}: {key!r} conflicts with another key of the stage")
        section[leaf] = copy.deepcopy(value)  # the config's own stages stay untouched
    return nested


def stage_configs(config: ConfigT) -> list[ConfigT]:
    """The config of every stage of ``config`` (a config dataclass with ``stages`` and
    ``out_dir``): cumulative overrides, ``out_dir`` = ``OUT/stage-<k>``, ``stages`` empty.

    Raises:
        ConfigError: no stages, a stage that is not a mapping, an unknown key or a bad value
            (the message names the stage, 1-based, and the key).
    """
    stages = list(getattr(config, "stages", None) or [])
    if not stages:
        raise ConfigError("stages: the config declares no stages")
    configs = []
    current = dataclasses.replace(config, stages=[])
    for index, overrides in enumerate(stages, start=1):
        where = f"stages[{index}]"
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"{where}: expected a mapping of config keys, got {overrides!r}")
        current = config_from_dict(_nested(overrides, where), current, source=where)
        configs.append(dataclasses.replace(current, out_dir=str(stage_dir(config.out_dir, index))))
    return configs


def _record(result: FitResult) -> dict[str, Any]:
    """A FitResult as plain values (safe for ``weights_only`` loading)."""
    return {
        "metrics": {key: float(value) for key, value in result.metrics.items()},
        "best_score": float(result.best_score),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "last_checkpoint": str(result.last_checkpoint),
        "epochs": int(result.epochs),
        "global_step": int(result.global_step),
    }


def _fit_result(record: Mapping[str, Any]) -> FitResult:
    best = record["best_checkpoint"]
    return FitResult(
        metrics=dict(record["metrics"]),
        best_score=record["best_score"],
        best_checkpoint=Path(best) if best is not None else None,
        last_checkpoint=Path(record["last_checkpoint"]),
        epochs=record["epochs"],
        global_step=record["global_step"],
    )


def _finished_stages(path: Path, config_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The finished stages recorded in ``path`` (none when it does not exist)."""
    if not path.exists():
        return []
    state = load_checkpoint(path, required=("kind", "config", "done"))
    if state["kind"] != STAGES_KIND:
        raise CheckpointError(
            f"{path}: a {state['kind']!r} checkpoint, not the record of a staged run; use "
            "another output folder for the staged run"
        )
    if state["config"].get("stages") != config_dict["stages"]:
        logger.warning("%s: resuming with changed stages; finished stages are kept", path)
    return list(state["done"])


def run_stages(
    config: Any,
    build_and_fit: BuildAndFit,
    *,
    resume: bool = False,
    device: str | None = None,
) -> list[FitResult]:
    """Run the stages of ``config`` one after another.

    Args:
        config: a config dataclass (``TrainConfig``) with ``stages`` and ``out_dir``.
        build_and_fit: runs one stage (see :data:`BuildAndFit`).
        resume: skip the stages that ``OUT/last.pt`` records as finished and continue an
            interrupted stage from ``OUT/stage-<k>/last.pt``; False starts from stage 1.
        device: only to learn the process's rank under torchrun (default:
            ``config.trainer.device``); files are written by rank 0.

    Returns:
        One :class:`FitResult` per stage (those of skipped stages as recorded).

    Raises:
        ConfigError: see :func:`stage_configs`.
        CheckpointError: ``OUT/last.pt`` exists but does not record a staged run.
    """
    configs = stage_configs(config)
    out = Path(config.out_dir)
    record_path = out / "last.pt"
    config_dict = config_to_dict(config)
    context = init_distributed(device or config.trainer.device)
    done = _finished_stages(record_path, config_dict)[: len(configs)] if resume else []
    if context.is_main:
        save_config(config, out / "config.yaml")
    results = [_fit_result(record) for record in done]
    for index, stage_config in enumerate(configs, start=1):
        if index <= len(results):
            logger.info("stage %d/%d finished before: skipped", index, len(configs))
            continue
        previous = results[-1] if results else None
        init = None
        if previous is not None:
            init = previous.best_checkpoint or previous.last_checkpoint
        stage_last = stage_dir(out, index) / "last.pt"
        stage_resume = stage_last if resume and stage_last.exists() else None
        if context.is_main:
            logger.info(
                "stage %d/%d: %s%s",
                index,
                len(configs),
                config.stages[index - 1],
                f", from {init}" if init is not None and stage_resume is None else "",
            )
        result = build_and_fit(stage_config, init, stage_resume)
        results.append(result)
        done.append(_record(result))
        if context.is_main:
            save_checkpoint({"kind": STAGES_KIND, "config": config_dict, "done": done}, record_path)
        barrier()
    return results
