"""Mechanism for ``GradientCheckpointing`` (training use)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from .base import Undo, register_strategy
from .configs import GradientCheckpointing


@register_strategy(GradientCheckpointing)
def apply_gradient_checkpointing(pipe: Any, config: GradientCheckpointing, component: str | None) -> Undo | None:
    module = getattr(pipe, component)
    if not module.training:
        raise InvalidRequestError(
            f"GradientCheckpointing on {component}: the module is in eval mode, where checkpointing "
            "saves nothing (no backward pass). Call .train() first when fine-tuning."
        )
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return module.disable_gradient_checkpointing
    if hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
        return module.gradient_checkpointing_disable
    raise InvalidRequestError(f"GradientCheckpointing: {type(module).__name__} does not support it.")
