"""LoRA on pipelines vramkit optimized: load, weight, fuse and unfuse adapters whatever the plan.

diffusers' LoRA methods assume a pipeline without vramkit's steps, and some combinations break:

- **Offloading** (``ModelOffload``, ``SequentialOffload``, ``BlockStreaming``): ``load_lora_weights``
  finds accelerate hooks, removes them and calls ``enable_model_cpu_offload`` /
  ``enable_sequential_cpu_offload`` itself, which fails without an accelerator and otherwise leaves
  diffusers' hooks in place of vramkit's. Fusing under ``SequentialOffload`` merges into the empty
  (meta) placeholders and silently drops the LoRA; streamed blocks hold another block's bytes
  between calls. The helpers here take those reversible steps off, run diffusers' method, and put
  the same steps back (exactly as planned).
- **fp8 storage** (``StoreFP8``, :func:`vramkit.loading.load_transformer` with ``storage="fp8"``):
  peft creates the LoRA weights in the base layer's dtype, float8, where they cannot run (CPU) or
  lose their precision; fusing adds in float8. The helpers keep LoRA weights in the compute dtype
  and fuse each layer in its compute dtype (the fused weight is rounded to float8 again: lossy).
- **Quantization** (``Quantize``): torchao layers accept LoRA, but peft can only fuse into them
  when it knows how to re-quantize (the helpers tell it); diffusers cannot load a LoRA onto quanto
  layers at all (the helpers route around the failing shape check); nothing can fuse into quanto
  weights (a clear :class:`~vramkit.errors.StrategyConflictError` instead of a silently wrong
  result).
- **PromptCache**: cached prompt embeddings go stale when a LoRA changes the text encoders; the
  helpers drop them.

Each helper takes the pipeline first and otherwise the arguments of the diffusers method of the
same name::

    vramkit.optimize(pipe, strategies=[StoreFP8(), ModelOffload()])
    vramkit.lora.load_lora_weights(pipe, "style.safetensors", adapter_name="style")
    vramkit.lora.set_adapters(pipe, ["style"], adapter_weights=[0.8])
    vramkit.lora.fuse_lora(pipe)

On a pipeline vramkit never touched they just call diffusers. :func:`lora_weight_bytes` gives the
memory the planner must count for loaded adapters.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ._pipeline import model_components
from ._state import get_state
from .errors import StrategyConflictError, VramkitError
from .strategies.base import get_apply_fn

logger = logging.getLogger("vramkit")

__all__ = [
    "SUSPENDED_STRATEGIES",
    "load_lora_weights",
    "set_adapters",
    "fuse_lora",
    "unfuse_lora",
    "delete_adapters",
    "unload_lora_weights",
    "enable_lora",
    "disable_lora",
    "lora_weight_bytes",
    "has_lora",
    "pipeline_method_overrides",
]

#: Steps (by strategy name) taken off while diffusers changes LoRA layers, then put back: they move
#: weights out of their modules (accelerate hooks, meta placeholders, packed block buffers).
SUSPENDED_STRATEGIES: frozenset[str] = frozenset({"ModelOffload", "SequentialOffload", "BlockStreaming"})

_LAYERWISE = "layerwise_casting"
_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# peft's warning for torchao layers without a re-quantization recipe: the helpers give it one.
_TORCHAO_WARNING = r".*instantiated without `get_apply_tensor_subclass`.*"


# --------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------


def _is_tuner_layer(module: torch.nn.Module) -> bool:
    """A peft adapter layer (``BaseTunerLayer``), recognised without importing peft."""
    return type(module).__module__.startswith("peft.") and hasattr(module, "adapter_layer_names")


def _tuner_layers(module: torch.nn.Module) -> list[Any]:
    """peft's adapter layers in ``module`` (typed loosely: peft is imported only where present)."""
    return [m for m in module.modules() if _is_tuner_layer(m)]


def _tensor_bytes(t: torch.Tensor) -> int:
    return int(t.numel()) * int(t.element_size())


def lora_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of every LoRA weight peft added to ``module`` (``lora_A``, ``lora_B``, embedding and
    DoRA magnitude parameters of every adapter, fused or not), in their stored dtype.

    Adapters stay in memory next to the base weights (also after ``fuse_lora``, until
    ``unload_lora_weights``), in full precision whatever the plan stores the base weights in: the
    planner counts these bytes as they are and leaves them out of what fp8/int8 storage shrinks.
    Works on meta tensors.
    """
    total = 0
    seen: set[int] = set()
    for layer in _tuner_layers(module):
        names = tuple(getattr(layer, "adapter_layer_names", ())) + ("lora_magnitude_vector",)
        for name in names:
            container = getattr(layer, name, None)
            if not isinstance(container, torch.nn.Module):
                continue
            for p in container.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    total += _tensor_bytes(p)
    return total


def has_lora(pipe_or_module: Any) -> bool:
    """True when any model component (or the module given) carries peft LoRA layers."""
    if isinstance(pipe_or_module, torch.nn.Module):
        return bool(_tuner_layers(pipe_or_module))
    return any(_tuner_layers(m) for m in model_components(pipe_or_module).values())


def _layerwise_hook(module: torch.nn.Module) -> Any | None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return None
    return registry.hooks.get(_LAYERWISE)


def _is_quanto_module(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("optimum.quanto")


def _is_torchao_tensor(t: Any) -> bool:
    return type(t).__module__.startswith("torchao")


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    return _is_quanto_module(module) or _is_torchao_tensor(getattr(module, "weight", None))


def _original_method(pipe: Any, name: str) -> Callable[..., Any]:
    """``pipe.<name>`` as diffusers defines it, past vramkit's class wrapper (see
    :func:`pipeline_method_overrides`) and any instance attribute."""
    for cls in type(pipe).__mro__:
        if "_vramkit_wrapped" in cls.__dict__:
            continue
        if name in cls.__dict__:
            return cls.__dict__[name].__get__(pipe, type(pipe))  # type: ignore[no-any-return]
    raise VramkitError(f"{type(pipe).__name__} has no {name}(): it does not support LoRA.")


def _requested_components(pipe: Any, method: str, kwargs: dict[str, Any]) -> list[str]:
    """The components a diffusers fuse/unfuse call works on (its ``components`` or its default)."""
    components = kwargs.get("components")
    if components is None:
        param = inspect.signature(_original_method(pipe, method)).parameters.get("components")
        default = param.default if param is not None else inspect.Parameter.empty
        components = list(default) if isinstance(default, (list, tuple)) else list(model_components(pipe))
    return [c for c in components if isinstance(getattr(pipe, c, None), torch.nn.Module)]


# --------------------------------------------------------------------------------------------------
# Suspending vramkit's placement steps
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _suspended(pipe: Any) -> Iterator[None]:
    """Undo the applied reversible steps of :data:`SUSPENDED_STRATEGIES` (newest first), run the
    body, and apply the same steps again in their order, each under its own undo slot."""
    state = get_state(pipe)
    if state is None:
        yield
        return
    indices = [
        i
        for i, (step, undo) in enumerate(state.applied)
        if undo is not None and step.strategy.name in SUSPENDED_STRATEGIES
    ]
    if not indices:
        yield
        return
    for i in reversed(indices):
        step, undo = state.applied[i]
        undo()
        state.applied[i] = (step, None)
        logger.debug("LoRA: took %s off %s", step.strategy.describe(), step.component or "the pipeline")
    try:
        yield
    finally:
        _reapply(pipe, state, indices)


def _reapply(pipe: Any, state: Any, indices: list[int]) -> None:
    for n, i in enumerate(indices):
        step, _ = state.applied[i]
        try:
            undo = get_apply_fn(step.strategy)(pipe, step.strategy, step.component)
        except Exception as exc:
            dropped = {indices[k] for k in range(n, len(indices))}
            names = [state.applied[k][0].strategy.describe() for k in sorted(dropped)]
            state.applied = [entry for k, entry in enumerate(state.applied) if k not in dropped]
            _sync_plan(pipe, state)
            raise VramkitError(
                f"The LoRA change was made, but re-applying {', '.join(names)} afterwards failed: {exc}. "
                "The pipeline works without those steps; call vramkit.restore(pipe) and optimize again."
            ) from exc
        state.applied[i] = (step, undo)
        logger.debug("LoRA: put %s back on %s", step.strategy.describe(), step.component or "the pipeline")


def _sync_plan(pipe: Any, state: Any) -> None:
    """Make the recorded plan list exactly the steps still applied (after a failed re-apply)."""
    from .plan import Plan

    old = state.plan
    plan = Plan(
        steps=[s for s, _ in state.applied],
        predicted=getattr(old, "predicted", None),
        rejected=list(getattr(old, "rejected", [])),
        request=dict(getattr(old, "request", None) or {}),
        notes=list(getattr(old, "notes", [])),
    )
    state.plan = plan
    if "vramkit_plan" in pipe.__dict__:
        pipe.__dict__["vramkit_plan"] = plan


# --------------------------------------------------------------------------------------------------
# fp8 storage (layerwise casting)
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _lora_in_compute_dtype(pipe: Any) -> Iterator[None]:
    """While LoRA layers are created, make peft see the compute dtype of layers stored in float8.

    peft gives new LoRA weights the dtype of the base layer's weight unless the base layer has a
    ``compute_dtype`` (as bitsandbytes layers do); set it on every layerwise-cast module for the
    duration, so the adapters come out in the dtype the layer computes in."""
    marked: list[torch.nn.Module] = []
    try:
        for component in model_components(pipe).values():
            for module in component.modules():
                hook = _layerwise_hook(module)
                if hook is not None and not hasattr(module, "compute_dtype"):
                    module.compute_dtype = hook.compute_dtype
                    marked.append(module)
        yield
    finally:
        for module in marked:
            module.__dict__.pop("compute_dtype", None)


def _cast_modules(layer: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.dtype, torch.dtype]]:
    """(module, storage dtype, compute dtype) of every layerwise-cast module inside a LoRA layer."""
    found = []
    for module in layer.modules():
        hook = _layerwise_hook(module)
        if hook is not None:
            found.append((module, hook.storage_dtype, hook.compute_dtype))
    return found


def _merge_in_compute_dtype(
    method: Callable[..., Any], casts: list[tuple[torch.nn.Module, torch.dtype, torch.dtype]]
) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for module, _, compute in casts:
            module.to(dtype=compute)
        try:
            return method(*args, **kwargs)
        finally:
            for module, storage, _ in casts:
                module.to(dtype=storage)

    return wrapper


@contextlib.contextmanager
def _merges_in_compute_dtype(pipe: Any, components: list[str]) -> Iterator[None]:
    """Make each fp8-stored LoRA layer merge/unmerge in its compute dtype, one layer at a time
    (only that layer is ever upcast), then store the result in float8 again."""
    patched: list[torch.nn.Module] = []
    try:
        for name in components:
            for layer in _tuner_layers(getattr(pipe, name)):
                casts = _cast_modules(layer)
                if not casts:
                    continue
                layer.merge = _merge_in_compute_dtype(layer.merge, casts)
                layer.unmerge = _merge_in_compute_dtype(layer.unmerge, casts)
                patched.append(layer)
        yield
    finally:
        for layer in patched:
            layer.__dict__.pop("merge", None)
            layer.__dict__.pop("unmerge", None)


# --------------------------------------------------------------------------------------------------
# Quantized layers
# --------------------------------------------------------------------------------------------------


def _quantize_steps(pipe: Any) -> dict[str, Any]:
    """Component -> the ``Quantize`` config vramkit applied to it."""
    state = get_state(pipe)
    found: dict[str, Any] = {}
    if state is not None:
        for step, _ in state.applied:
            if step.strategy.name == "Quantize" and step.component is not None:
                found[step.component] = step.strategy
    return found


def _torchao_recipe(weight: Any, config: Any | None) -> Callable[[], Any] | None:
    """A factory of the torchao config that re-quantizes ``weight`` (from vramkit's step, else
    from the weight's type), or None when unknown."""
    kind = None
    if config is not None and config.backend == "torchao":
        kind = config.weights
    else:
        type_name = type(weight).__name__.lower()
        if "int8" in type_name:
            kind = "int8"
        elif "float8" in type_name:
            kind = "fp8"
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return Int8WeightOnlyConfig
    if kind == "fp8":
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig
    return None


def _give_torchao_recipes(pipe: Any) -> None:
    """Tell peft's torchao LoRA layers how to re-quantize after a merge (diffusers only knows when
    the model was loaded with a TorchAoConfig, never for a model quantized in place)."""
    steps = _quantize_steps(pipe)
    for name, component in model_components(pipe).items():
        for layer in _tuner_layers(component):
            if type(layer).__name__ != "TorchaoLoraLinear" or getattr(layer, "get_apply_tensor_subclass", None):
                continue
            recipe = _torchao_recipe(layer.get_base_layer().weight, steps.get(name))
            if recipe is not None:
                layer.get_apply_tensor_subclass = recipe


def _fuse_advice(component: str, pipe: Any) -> str:
    step = _quantize_steps(pipe).get(component)
    how = step.describe() if step is not None else "quantization"
    return (
        f"{component} was quantized ({how}) and peft cannot merge a LoRA into these quantized weights. "
        "Fuse before quantizing (Quantize cannot be undone: reload the pipeline), then "
        "pipe.load_lora_weights(...), pipe.fuse_lora(), pipe.unload_lora_weights(), then vramkit.optimize(...). "
        "Or keep the LoRA unfused (it runs "
        "unfused on this pipeline), or store the weights with StoreFP8 or BlockStreaming(storage='fp8') "
        "instead of Quantize: those fuse."
    )


def _check_mergeable(pipe: Any, components: list[str]) -> None:
    """Raise StrategyConflictError before peft would merge into weights it cannot change (quanto
    layers: silently no LoRA; torchao layers that are not peft's torchao layers: an error halfway)."""
    for name in components:
        for layer in _tuner_layers(getattr(pipe, name)):
            base = layer.get_base_layer()
            quantized_lora = any(
                _is_quantized_linear(m) for attr in ("lora_A", "lora_B") for m in getattr(layer, attr, {}).values()
            )
            if _is_quanto_module(base) or quantized_lora:
                raise StrategyConflictError(_fuse_advice(name, pipe))
            if _is_torchao_tensor(getattr(base, "weight", None)):
                if type(layer).__name__ != "TorchaoLoraLinear":
                    raise StrategyConflictError(_fuse_advice(name, pipe))
                if not getattr(layer, "get_apply_tensor_subclass", None):
                    raise StrategyConflictError(
                        f"{name}: peft needs to know how to re-quantize these torchao weights after merging "
                        "and vramkit could not tell from the weights. " + _fuse_advice(name, pipe)
                    )


def _lora_targets(transformer: Any, lora_state_dict: Any) -> Iterator[tuple[str, str, torch.Tensor, torch.nn.Module]]:
    """(key, module name, lora_A weight, base layer) of each transformer LoRA entry whose module exists."""
    prefix = "transformer."
    for key, value in (lora_state_dict or {}).items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")]
        name = name[len(prefix) :] if name.startswith(prefix) else name
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            continue
        if _is_tuner_layer(module):
            module = module.get_base_layer()
        yield key, name, value, module


def _refuse_widening(original: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap diffusers' ``_maybe_expand_transformer_param_shape_or_error_``: it widens layers for
    Flux Control LoRAs by rebuilding them as float ``nn.Linear`` from their weights, which breaks
    quantized layers. Refuse that before anything changes; otherwise call diffusers."""

    def check(transformer: Any, lora_state_dict: Any = None, *args: Any, **kwargs: Any) -> Any:
        for _, name, value, module in _lora_targets(transformer, lora_state_dict):
            in_features = getattr(module, "in_features", None)
            if _is_quantized_linear(module) and in_features is not None and value.shape[1] > in_features:
                raise StrategyConflictError(
                    f"This LoRA widens {name} ({value.shape[1]} inputs instead of {in_features}), as Flux Control "
                    "LoRAs do; a quantized layer cannot be widened. Load it before quantizing (vramkit.restore "
                    "cannot undo Quantize: reload the pipeline), or use StoreFP8 instead of Quantize."
                )
        return original(transformer, lora_state_dict, *args, **kwargs)

    return check


def _pad_narrow_loras(transformer: Any = None, lora_state_dict: Any = None) -> Any:
    """Stands in for diffusers' ``_maybe_expand_lora_state_dict`` on quanto-quantized transformers,
    whose state dicts have no ``.weight`` entries for it to read: the same zero-padding of a LoRA
    narrower than its (earlier widened) layer, reading the width from the module instead."""
    for key, _, value, module in _lora_targets(transformer, lora_state_dict):
        in_features = getattr(module, "in_features", None)
        if in_features is not None and in_features > value.shape[1]:
            padded = torch.zeros((value.shape[0], in_features), dtype=value.dtype, device=value.device)
            padded[:, : value.shape[1]].copy_(value)
            lora_state_dict[key] = padded
    return lora_state_dict


@contextlib.contextmanager
def _quantized_loading(pipe: Any) -> Iterator[None]:
    """Route diffusers' LoRA shape steps around quantized layers, on this pipeline instance only."""
    transformer = getattr(pipe, "transformer", None)
    modules = list(transformer.modules()) if isinstance(transformer, torch.nn.Module) else []
    overrides: dict[str, Any] = {}
    widen = "_maybe_expand_transformer_param_shape_or_error_"
    if hasattr(type(pipe), widen) and any(_is_quantized_linear(m) for m in modules):
        overrides[widen] = _refuse_widening(_original_method(pipe, widen))
    if hasattr(type(pipe), "_maybe_expand_lora_state_dict") and any(_is_quanto_module(m) for m in modules):
        overrides["_maybe_expand_lora_state_dict"] = _pad_narrow_loras
    overrides = {k: v for k, v in overrides.items() if k not in pipe.__dict__}
    pipe.__dict__.update(overrides)
    try:
        yield
    finally:
        for name in overrides:
            pipe.__dict__.pop(name, None)


# --------------------------------------------------------------------------------------------------
# PromptCache
# --------------------------------------------------------------------------------------------------


def _text_encoder_lora_signature(pipe: Any) -> tuple[Any, ...]:
    """What of the text encoders' LoRA state changes their output: layers, active adapters,
    scalings, merged adapters, disabled flags."""
    parts: list[Any] = []
    for name in _TEXT_ENCODERS:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        for layer in _tuner_layers(module):
            parts.append(
                (
                    name,
                    id(layer),
                    tuple(getattr(layer, "active_adapters", ()) or ()),
                    tuple(sorted((k, float(v)) for k, v in getattr(layer, "scaling", {}).items())),
                    tuple(getattr(layer, "merged_adapters", ()) or ()),
                    bool(getattr(layer, "disable_adapters", False)),
                )
            )
    return tuple(parts)


def _drop_stale_prompts(pipe: Any, before: tuple[Any, ...]) -> None:
    """Empty PromptCache's embeddings when the text encoders' LoRA state changed."""
    from .strategies.prompt_cache import PromptEmbeddingCache

    cache = pipe.__dict__.get("encode_prompt")
    if not isinstance(cache, PromptEmbeddingCache) or not cache.entries:
        return
    if _text_encoder_lora_signature(pipe) == before:
        return
    if cache.deleted:
        logger.warning(
            "LoRA: the text encoders' adapters changed, but PromptCache(release='delete') dropped the text "
            "encoders: the cached prompt embeddings are kept and do not reflect the change."
        )
        return
    cache.entries.clear()
    logger.info("LoRA: the text encoders' adapters changed; PromptCache's embeddings were dropped")


# --------------------------------------------------------------------------------------------------
# Public helpers
# --------------------------------------------------------------------------------------------------


def load_lora_weights(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.load_lora_weights(*args, **kwargs)`` that works under any vramkit plan.

    Takes vramkit's offloading steps off while diffusers adds the LoRA layers and puts them back
    afterwards (so the LoRA is offloaded with its layer), keeps the new LoRA weights in the compute
    dtype of fp8-stored layers, loads onto quanto layers, teaches peft to re-quantize torchao
    layers, and drops stale PromptCache embeddings. Same arguments as diffusers' method.
    """
    before = _text_encoder_lora_signature(pipe)
    with _suspended(pipe), _lora_in_compute_dtype(pipe), _quantized_loading(pipe), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TORCHAO_WARNING)
        _original_method(pipe, "load_lora_weights")(*args, **kwargs)
        _give_torchao_recipes(pipe)
    _drop_stale_prompts(pipe, before)


def set_adapters(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.set_adapters(adapter_names, adapter_weights=...)``; drops stale PromptCache embeddings
    when the text encoders carry the adapters. Needs no other care under any plan."""
    before = _text_encoder_lora_signature(pipe)
    _original_method(pipe, "set_adapters")(*args, **kwargs)
    _drop_stale_prompts(pipe, before)


def _merge_call(pipe: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    components = _requested_components(pipe, method, kwargs)
    _give_torchao_recipes(pipe)
    _check_mergeable(pipe, components)
    before = _text_encoder_lora_signature(pipe)
    with _suspended(pipe), _merges_in_compute_dtype(pipe, components):
        _original_method(pipe, method)(*args, **kwargs)
    _drop_stale_prompts(pipe, before)


def fuse_lora(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.fuse_lora(...)`` that works under any vramkit plan.

    Offloaded weights are brought back for the merge and offloaded again; fp8-stored layers merge
    in their compute dtype and are stored in float8 again (lossy, like fp8 storage itself); torchao
    layers are re-quantized. Raises :class:`~vramkit.errors.StrategyConflictError` for quanto
    layers and layers quantized after the LoRA was loaded (peft cannot merge into those): the
    message says what works instead.
    """
    _merge_call(pipe, "fuse_lora", args, kwargs)


def unfuse_lora(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.unfuse_lora(...)`` under any vramkit plan (see :func:`fuse_lora`). On fp8-stored or
    quantized layers the base weights come back only up to that storage's rounding."""
    _merge_call(pipe, "unfuse_lora", args, kwargs)


def _structural_call(pipe: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    before = _text_encoder_lora_signature(pipe)
    with _suspended(pipe):
        _original_method(pipe, method)(*args, **kwargs)
    _drop_stale_prompts(pipe, before)


def delete_adapters(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.delete_adapters(adapter_names)`` under any vramkit plan."""
    _structural_call(pipe, "delete_adapters", args, kwargs)


def unload_lora_weights(pipe: Any, *args: Any, **kwargs: Any) -> None:
    """``pipe.unload_lora_weights()`` under any vramkit plan (fused weights stay fused)."""
    _structural_call(pipe, "unload_lora_weights", args, kwargs)


def enable_lora(pipe: Any) -> None:
    """``pipe.enable_lora()``; drops stale PromptCache embeddings."""
    before = _text_encoder_lora_signature(pipe)
    _original_method(pipe, "enable_lora")()
    _drop_stale_prompts(pipe, before)


def disable_lora(pipe: Any) -> None:
    """``pipe.disable_lora()``; drops stale PromptCache embeddings."""
    before = _text_encoder_lora_signature(pipe)
    _original_method(pipe, "disable_lora")()
    _drop_stale_prompts(pipe, before)


_HELPERS: dict[str, Callable[..., None]] = {
    "load_lora_weights": load_lora_weights,
    "set_adapters": set_adapters,
    "fuse_lora": fuse_lora,
    "unfuse_lora": unfuse_lora,
    "delete_adapters": delete_adapters,
    "unload_lora_weights": unload_lora_weights,
    "enable_lora": enable_lora,
    "disable_lora": disable_lora,
}


def _routed(name: str, helper: Callable[..., None], doc: str | None) -> Callable[..., None]:
    def method(self: Any, *args: Any, **kwargs: Any) -> None:
        helper(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = doc
    return method


def pipeline_method_overrides(cls: type) -> dict[str, Callable[..., None]]:
    """Methods for vramkit's per-pipeline wrapper class (``vramkit._state``) that route the LoRA
    methods ``cls`` has through these helpers, so plain ``pipe.load_lora_weights(...)`` etc. work
    while the pipeline is optimized. Each keeps diffusers' docstring."""
    overrides: dict[str, Callable[..., None]] = {}
    for name, helper in _HELPERS.items():
        original = getattr(cls, name, None)
        if original is not None:
            overrides[name] = _routed(name, helper, original.__doc__)
    return overrides
