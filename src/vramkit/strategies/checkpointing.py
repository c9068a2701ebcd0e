"""Mechanism for ``GradientCheckpointing`` (training use)."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from .base import Undo, register_strategy
from .configs import GradientCheckpointing


@register_strategy(GradientCheckpointing)
def apply_gradient_checkpointing(pipe: Any, config: GradientCheckpointing, component: str | None) -> Undo | None:
    # Eval mode is refused by GradientCheckpointing.check, which runs before any step is applied.
    module = getattr(pipe, component)
    if hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()
        return module.disable_gradient_checkpointing
    if hasattr(module, "gradient_checkpointing_enable"):
        module.gradient_checkpointing_enable()
        return module.gradient_checkpointing_disable
    raise InvalidRequestError(f"GradientCheckpointing: {type(module).__name__} does not support it.")
