"""Memory strategies: small frozen config objects, each applied by one registered function.

>>> from vramkit.strategies import Precision, VaeTiling
>>> vramkit.optimize(pipe, strategies=[Precision("bf16"), VaeTiling(tile=512)])
"""

from __future__ import annotations

# Importing the mechanism modules registers each config's apply function.
from . import attention, checkpointing, compile, offload, precision, prompt_cache, quantize, vae  # noqa: F401
from .base import Strategy, get_apply_fn, register_strategy, strategy_from_dict, strategy_types
from .configs import (
    AttentionBackend,
    AttentionSlicing,
    Compile,
    GradientCheckpointing,
    ModelOffload,
    Precision,
    PromptCache,
    Quantize,
    Resident,
    SequentialOffload,
    StoreFP8,
    VaeSlicing,
    VaeTiling,
)

try:  # the block streaming engine registers BlockStreaming
    from .streaming import BlockStreaming
except ImportError:  # pragma: no cover - only while the engine is being written
    BlockStreaming = None  # type: ignore[assignment,misc]

__all__ = [
    "Strategy",
    "register_strategy",
    "get_apply_fn",
    "strategy_types",
    "strategy_from_dict",
    "Precision",
    "StoreFP8",
    "Quantize",
    "ModelOffload",
    "SequentialOffload",
    "AttentionSlicing",
    "AttentionBackend",
    "VaeTiling",
    "VaeSlicing",
    "PromptCache",
    "GradientCheckpointing",
    "Resident",
    "Compile",
    "BlockStreaming",
]
