"""Mechanisms for precision and fp8 storage: ``Precision`` and ``StoreFP8``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .base import Undo, parse_dtype, register_strategy
from .configs import Precision, StoreFP8

logger = logging.getLogger("vramkit")

# Casting from the key to any dtype in the value set keeps every value exactly.
_EXACT_CASTS: dict[torch.dtype, set[torch.dtype]] = {
    torch.bfloat16: {torch.bfloat16, torch.float32, torch.float64},
    torch.float16: {torch.float16, torch.float32, torch.float64},
    torch.float32: {torch.float32, torch.float64},
}


def _float_dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {t.dtype for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()}


def cast_is_exact(module: torch.nn.Module, dtype: torch.dtype) -> bool:
    """True when casting every floating tensor of ``module`` to ``dtype`` loses no bits."""
    return all(dtype in _EXACT_CASTS.get(d, {d}) for d in _float_dtypes(module))


@register_strategy(Precision)
def apply_precision(pipe: Any, config: Precision, component: str | None) -> Undo | None:
    module = getattr(pipe, component)
    dtype = parse_dtype(config.dtype)
    exact = cast_is_exact(module, dtype)
    # Remember each tensor's own dtype: some models keep a few fp32 tensors on purpose.
    originals = {name: t.dtype for name, t in _named_tensors(module)}
    module.to(dtype=dtype)
    if not exact:
        return None

    def undo() -> None:
        for name, t in _named_tensors(module):
            if t.dtype != originals[name]:
                t.data = t.data.to(originals[name])

    return undo


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    items = [(f"p:{n}", p) for n, p in module.named_parameters()]
    items += [(f"b:{n}", b) for n, b in module.named_buffers()]
    return [(n, t) for n, t in items if t.is_floating_point()]


@register_strategy(StoreFP8)
def apply_store_fp8(pipe: Any, config: StoreFP8, component: str | None) -> Undo | None:
    from diffusers.hooks import apply_layerwise_casting
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    module = getattr(pipe, component)
    if any(
        getattr(sub, "_diffusers_hook", None) is not None and "layerwise_casting" in sub._diffusers_hook.hooks
        for sub in module.modules()
    ):
        # Already stored in fp8 (e.g. vramkit.loading.load_transformer(storage="fp8")).
        logger.info("StoreFP8: %s already stores fp8 weights with layerwise casting; nothing to do", component)
        return None
    dtypes = _float_dtypes(module)
    compute = torch.bfloat16 if torch.bfloat16 in dtypes or not dtypes else sorted(dtypes, key=str)[0]
    if len(dtypes) == 1:
        compute = next(iter(dtypes))
    apply_layerwise_casting(
        module,
        storage_dtype=torch.float8_e4m3fn,
        compute_dtype=compute,
        # LoRA weights stay in the compute dtype: casting them to fp8 would round the adapter itself.
        skip_modules_pattern=tuple(DEFAULT_SKIP_MODULES_PATTERN) + (r"(^|\.)lora_",),
        non_blocking=True,
    )
    # Mark diffusers' hooks as ours, so later checks don't mistake them for someone else's.
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        owned = {"layerwise_casting", "peft_autocast_disable"} & set(registry.hooks) if registry is not None else set()
        if owned:
            registry._vramkit_owned = owned
    logger.info("StoreFP8: %s weights stored as float8_e4m3fn, computed in %s", component, compute)
    return None
