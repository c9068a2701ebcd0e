"""Exceptions raised by vramkit.

Every error says what went wrong and what to do about it. All derive from :class:`VramkitError`,
so ``except vramkit.errors.VramkitError`` catches everything vramkit raises on purpose.
"""

from __future__ import annotations

__all__ = [
    "VramkitError",
    "UnsupportedPipelineError",
    "StrategyConflictError",
    "IrreversibleError",
    "PlanInfeasibleError",
    "InvalidBudgetError",
    "InvalidRequestError",
    "MissingDependencyError",
    "OutOfMemoryError",
]


class VramkitError(Exception):
    """Base class of every error vramkit raises on purpose."""


class UnsupportedPipelineError(VramkitError, TypeError):
    """The object given is not a diffusers Flux pipeline, or is in a state vramkit cannot work with."""


class StrategyConflictError(VramkitError, ValueError):
    """Two strategies cannot be combined, a strategy is applied twice, or the pipeline already has
    memory hooks from somewhere else."""


class IrreversibleError(VramkitError):
    """``restore`` met a step that cannot be undone (the pipeline still works, in its optimized form)."""

    def __init__(self, message: str, steps: list[str] | None = None) -> None:
        super().__init__(message)
        self.steps = list(steps or [])


class PlanInfeasibleError(VramkitError):
    """No plan fits the budget. ``minimum_vram`` (bytes), when known, is the smallest budget that fits."""

    def __init__(self, message: str, minimum_vram: int | None = None, minimum_ram: int | None = None) -> None:
        super().__init__(message)
        self.minimum_vram = minimum_vram
        self.minimum_ram = minimum_ram


class InvalidBudgetError(VramkitError, ValueError):
    """A memory budget could not be parsed or makes no sense (zero, negative, not a size)."""


class InvalidRequestError(VramkitError, ValueError):
    """A request (height, width, batch, component name, strategy argument) is not valid."""


class MissingDependencyError(VramkitError, ImportError):
    """An optional package a strategy needs is not installed; the message says how to install it."""


class OutOfMemoryError(VramkitError, MemoryError):
    """The GPU ran out of memory and recovery could not find a plan that fits what is free.
    ``minimum_vram`` (bytes), when known, is the budget that would have worked."""

    def __init__(self, message: str, minimum_vram: int | None = None, stage: str | None = None) -> None:
        super().__init__(message)
        self.minimum_vram = minimum_vram
        self.stage = stage
