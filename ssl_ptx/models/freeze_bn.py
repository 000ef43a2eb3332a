"""Frozen BatchNorm (the 4th place's ``norm_eval``): normalise with the running statistics
during training too, and optionally stop training the affine parameters.

A frozen layer gets a forward pre-hook that puts it in eval mode before every call, so the
freeze holds whatever switches the model to training mode (``model.train()`` in any trainer,
a Mean Teacher's student update, a callback) and survives ``copy.deepcopy`` (EMA copies). The
state dict is unchanged: checkpoints of frozen and unfrozen models load into each other.

Example:
    >>> model = freeze_batchnorm(create_model("fpn", encoder_name="resnet18"))
    >>> model.train()  # the BatchNorm layers still use (and keep) their running statistics
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["FREEZE_BN_MODES", "apply_freeze_bn", "freeze_batchnorm", "is_frozen"]

#: ``model.freeze_bn`` values: nothing frozen, running statistics only, statistics and affine
FREEZE_BN_MODES: tuple[str, ...] = ("none", "stats", "all")


def _keep_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: the layer normalises with (and keeps) its running statistics."""
    module.training = False


def is_frozen(module: nn.Module) -> bool:
    """True for a BatchNorm layer frozen by :func:`freeze_batchnorm`."""
    return isinstance(module, _BatchNorm) and _keep_eval in module._forward_pre_hooks.values()


def freeze_batchnorm(model: nn.Module, *, affine: bool = True) -> nn.Module:
    """Freeze every BatchNorm layer of ``model`` (1d/2d/3d, SyncBatchNorm and subclasses such
    as timm's ``BatchNormAct2d``), in place; freezing twice is harmless.

    Args:
        model: any module.
        affine: also set ``requires_grad=False`` on the layers' weight and bias (the 4th
            place); False keeps training them while the statistics stay fixed. Build the
            optimiser after freezing: ``ssl_ptx`` optimisers take trainable parameters only.

    Returns:
        ``model``. Its frozen layers are in eval mode now and before each of their calls:
        ``running_mean``, ``running_var`` and ``num_batches_tracked`` never change. Converting
        the model to SyncBatchNorm afterwards builds new, unfrozen layers.
    """
    for module in model.modules():
        if not isinstance(module, _BatchNorm):
            continue
        if not is_frozen(module):
            module.register_forward_pre_hook(_keep_eval)
        module.eval()
        if affine:
            for parameter in module.parameters(recurse=False):
                parameter.requires_grad_(False)
    return model


def apply_freeze_bn(model: nn.Module, mode: str) -> nn.Module:
    """:func:`freeze_batchnorm` by a ``model.freeze_bn`` value: "none" (nothing), "stats"
    (running statistics) or "all" (statistics and affine parameters).

    Raises:
        ValueError: another value.
    """
    if mode not in FREEZE_BN_MODES:
        raise ValueError(f"freeze_bn must be one of {list(FREEZE_BN_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    return freeze_batchnorm(model, affine=mode == "all")
