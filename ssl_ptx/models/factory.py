"""Build models by name from a config: ``create_model("unet_cbam", encoder_name="resnet18")``.

A config is an architecture name or a mapping (as read from YAML) with an ``arch`` key (default
``"unet_cbam"``) and that architecture's constructor arguments; keyword overrides win over the
mapping. Unknown keys are refused with the list of the allowed ones, so that a typo in a YAML
file fails loudly instead of silently training the default model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from ssl_ptx.models.unet_cbam import UNetCBAM

__all__ = ["DEFAULT_ARCH", "create_model", "list_models", "register_model", "resolve_model_config"]

DEFAULT_ARCH = "unet_cbam"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder`` (a class or function taking keyword arguments) under ``name``."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = builder


def list_models() -> list[str]:
    """Names accepted as ``arch``, sorted."""
    return sorted(_REGISTRY)


def _defaults(builder: Callable[..., nn.Module]) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(builder).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def resolve_model_config(config: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The complete config (every argument, defaults filled in) that :func:`create_model` uses.

    Save it beside a checkpoint to rebuild the same model later.

    Raises:
        ValueError: unknown ``arch``, unknown keys, or a required argument left out.
    """
    merged = {"arch": config} if isinstance(config, str) else dict(config)
    merged.update(overrides)
    arch = merged.pop("arch", DEFAULT_ARCH)
    if arch not in _REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; registered: {list_models()}")
    defaults = _defaults(_REGISTRY[arch])
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {unknown} for arch {arch!r}; "
            f"allowed: {['arch', *sorted(defaults)]}"
        )
    resolved = {**defaults, **merged}
    missing = [name for name, value in resolved.items() if value is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"model config for arch {arch!r} is missing {missing}")
    return {"arch": arch, **resolved}


def create_model(config: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a model from an arch name or a config mapping, with keyword overrides.

    Args:
        config: ``"unet_cbam"`` or a mapping such as ``{"arch": "unet_cbam",
            "encoder_name": "se_resnext50_32x4d", "cbam_kernel": 1, "in_channels": 1}``.
            Keys of ``unet_cbam``: ``encoder_name``, ``encoder_weights`` (None = random
            init), ``in_channels`` (1 or 3), ``decoder_channels``, ``decoder_interpolation``,
            ``cbam_reduction``, ``cbam_kernel``, ``presence_head``, ``hypercolumn`` — see
            :class:`~ssl_ptx.models.unet_cbam.UNetCBAM`.
        **overrides: keys that replace those of ``config``.

    Returns:
        The model, in training mode, with the resolved config (:func:`resolve_model_config`)
        stored as ``model.model_config``.
    """
    resolved = resolve_model_config(config, **overrides)
    kwargs = {k: v for k, v in resolved.items() if k != "arch"}
    model = _REGISTRY[resolved["arch"]](**kwargs)
    model.model_config = resolved
    return model


register_model("unet_cbam", UNetCBAM)
