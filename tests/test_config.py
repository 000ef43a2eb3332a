"""Config: presets, YAML files and --set overrides are type-checked with errors that say where."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssl_ptx.config import (
    PRESETS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
    preset,
    save_config,
)


def test_overrides_convert_by_annotation() -> None:
    config = apply_overrides(
        preset("demo"),
        [
            "trainer.lr=3e-4",  # YAML would read this as text; the float field converts it
            "data.fold=2",
            "trainer.clip_grad_norm=none",
            "model.decoder_channels=[64, 32, 16, 8, 8]",
            "data.siim_dir=2024",  # a text field keeps the digits as text
            "trainer.tensorboard=false",
            "loss.terms={symmetric_lovasz: 1, presence_bce: 0.1}",
        ],
    )
    assert config.trainer.lr == pytest.approx(3e-4)
    assert config.data.fold == 2
    assert config.trainer.clip_grad_norm is None
    assert config.model.decoder_channels == [64, 32, 16, 8, 8]
    assert config.data.siim_dir == "2024"
    assert config.trainer.tensorboard is False
    assert config.loss.build_argument() == {"symmetric_lovasz": 1, "presence_bce": 0.1}


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("trainer.lr=abc", "trainer.lr: expected float, got 'abc'"),
        ("trainer.lrr=1", "unknown key 'trainer.lrr'"),
        ("trainer.epochs=1.5", "trainer.epochs: expected int"),
        ("trainer.top_k=true", "trainer.top_k: expected int"),
        ("trainer.optimizer=rmsprop", "expected one of ['adam', 'adamw', 'sgd']"),
        ("data.fold=7", "data.fold: must be in [0, 5)"),
        ("nosection.key=1", "'nosection' is not a config section"),
        ("trainer.lr", "expected KEY=VALUE"),
        ("model.decoder_channels=[1, x]", "model.decoder_channels[1]: expected int"),
    ],
)
def test_bad_override_names_option_and_key(option: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        apply_overrides(TrainConfig(), [option])
    assert message in str(caught.value)
    assert option.split("=")[0] in str(caught.value)


def test_yaml_round_trip_and_file_errors(tmp_path: Path) -> None:
    config = apply_overrides(preset("full"), ["data.fold=3", "trainer.epochs=2"])
    path = save_config(config, tmp_path / "config.yaml")
    assert load_config(path) == config

    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 1e-4\n  warmup: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'trainer\.warmup'"):
        load_config(bad)
    bad.write_text("data:\n  size: big\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: data\.size: expected int, got 'big'"):
        load_config(bad)
    bad.write_text("trainer: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: trainer: expected a mapping"):
        load_config(bad)
    bad.write_text("trainer: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_over_preset_keeps_unset_values(tmp_path: Path) -> None:
    path = tmp_path / "small.yaml"
    path.write_text("trainer:\n  epochs: 1\ndata:\n  size: 64\n")
    config = load_config(path, base=preset("full"))
    assert (config.trainer.epochs, config.data.size) == (1, 64)
    assert config.model.encoder_name == "se_resnext50_32x4d"  # from the preset
    assert config.trainer.clip_grad_norm == 1.0


def test_presets_are_fresh_and_plain() -> None:
    assert sorted(PRESETS) == ["demo", "full"]
    first = preset("demo")
    first.model.decoder_channels.append(1)
    assert preset("demo").model.decoder_channels != first.model.decoder_channels
    full = config_to_dict(preset("full"))
    assert full["trainer"]["lr"] == 1e-4 and full["data"]["batch_size"] == 9
    assert config_from_dict(full, TrainConfig()) == preset("full")
    with pytest.raises(ConfigError, match="unknown preset 'tiny'"):
        preset("tiny")
