"""Build models by name from a config: ``create_model("unet_cbam", encoder_name="resnet18")``.

A config is an architecture name or a mapping (as read from YAML) with an ``arch`` key (default
``"unet_cbam"``) and that architecture's constructor arguments; keyword overrides win over the
mapping. Unknown keys are refused with the list of the allowed ones, so that a typo in a YAML
file fails loudly instead of silently training the default model.

Two keys work for every architecture: ``freeze_bn`` ("none", "stats" or "all"; see
:mod:`ssl_ptx.models.freeze_bn`) and ``options``, a mapping of architecture-specific
arguments merged into the config (``{"arch": "fpn", "options": {"decoder_pyramid_channels":
128}}``; what ``model.options`` of a YAML file carries). A config written for the default
``unet_cbam`` (as ``ssl_ptx.config.ModelConfig`` always is) also builds another architecture:
the UNet-CBAM arguments that architecture does not take (``cbam_kernel``, ``hypercolumn`` …) are
dropped, with a warning naming those set away from UNet-CBAM's defaults.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from ssl_ptx.models import smp_archs
from ssl_ptx.models.freeze_bn import FREEZE_BN_MODES, apply_freeze_bn
from ssl_ptx.models.unet_cbam import UNetCBAM

__all__ = ["DEFAULT_ARCH", "create_model", "list_models", "register_model", "resolve_model_config"]

DEFAULT_ARCH = "unet_cbam"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
logger = logging.getLogger(__name__)


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


def _same(value: Any, default: Any) -> bool:
    """``value == default``, a list equal to a tuple included."""
    if isinstance(value, Sequence) and isinstance(default, Sequence):
        if not isinstance(value, str) and not isinstance(default, str):
            return list(value) == list(default)
    return value == default


def _drop_inapplicable(arch: str, merged: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    """Remove from ``merged`` the default arch's arguments that ``arch`` does not take; warn
    about those set away from the default arch's defaults."""
    if arch == DEFAULT_ARCH:
        return
    shared = _defaults(_REGISTRY[DEFAULT_ARCH])
    ignored = [key for key in merged if key not in defaults and key in shared]
    changed = [f"{key}={merged[key]!r}" for key in ignored if not _same(merged[key], shared[key])]
    for key in ignored:
        del merged[key]
    if changed:
        logger.warning(
            "model arch %r does not take %s (UNet-CBAM settings): ignored", arch, ", ".join(changed)
        )


def resolve_model_config(config: str | Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
    """The complete config (every argument, defaults filled in) that :func:`create_model` uses.

    Save it beside a checkpoint to rebuild the same model later. ``options`` are merged in;
    ``freeze_bn`` is kept when given.

    Raises:
        ValueError: unknown ``arch``, unknown keys, a key both direct and in ``options``, a
            bad ``freeze_bn``, or a required argument left out.
    """
    merged = {"arch": config} if isinstance(config, str) else dict(config)
    merged.update(overrides)
    arch = merged.pop("arch", DEFAULT_ARCH)
    if arch not in _REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; registered: {list_models()}")
    options = dict(merged.pop("options", None) or {})
    both = sorted(set(options) & set(merged))
    if both:
        raise ValueError(f"model config key(s) {both} given both directly and in options")
    merged.update(options)
    generic = {}
    if "freeze_bn" in merged:
        generic["freeze_bn"] = merged.pop("freeze_bn")
        if generic["freeze_bn"] not in FREEZE_BN_MODES:
            raise ValueError(
                f"model config freeze_bn must be one of {list(FREEZE_BN_MODES)}, got "
                f"{generic['freeze_bn']!r}"
            )
    defaults = _defaults(_REGISTRY[arch])
    _drop_inapplicable(arch, merged, defaults)
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown model config key(s) {unknown} for arch {arch!r}; "
            f"allowed: {['arch', 'freeze_bn', 'options', *sorted(defaults)]}"
        )
    resolved = {**defaults, **merged}
    missing = [name for name, value in resolved.items() if value is inspect.Parameter.empty]
    if missing:
        raise ValueError(f"model config for arch {arch!r} is missing {missing}")
    return {"arch": arch, **resolved, **generic}


def create_model(config: str | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a model from an arch name or a config mapping, with keyword overrides.

    Args:
        config: ``"unet_cbam"`` or a mapping such as ``{"arch": "unet_cbam",
            "encoder_name": "se_resnext50_32x4d", "cbam_kernel": 1, "in_channels": 1}``.
            Keys of ``unet_cbam``: ``encoder_name``, ``encoder_weights`` (None = random
            init), ``in_channels`` (1 or 3), ``decoder_channels``, ``decoder_interpolation``,
            ``cbam_reduction``, ``cbam_kernel``, ``presence_head``, ``hypercolumn`` — see
            :class:`~ssl_ptx.models.unet_cbam.UNetCBAM`. Other archs: ``"fpn"``,
            ``"deeplabv3plus"``, ``"unetplusplus"``, ``"unet"`` (:mod:`ssl_ptx.models.smp_archs`).
            Every arch: ``freeze_bn`` and ``options`` (see the module docstring).
        **overrides: keys that replace those of ``config``.

    Returns:
        The model, in training mode (frozen BatchNorm layers excepted), with the resolved
        config (:func:`resolve_model_config`) stored as ``model.model_config``.
    """
    resolved = resolve_model_config(config, **overrides)
    kwargs = {k: v for k, v in resolved.items() if k not in ("arch", "freeze_bn")}
    model = _REGISTRY[resolved["arch"]](**kwargs)
    model.model_config = resolved
    return apply_freeze_bn(model, resolved.get("freeze_bn", "none"))


register_model("unet_cbam", UNetCBAM)
register_model("fpn", smp_archs.fpn)
register_model("deeplabv3plus", smp_archs.deeplabv3plus)
register_model("unetplusplus", smp_archs.unetplusplus)
register_model("unet", smp_archs.unet)
