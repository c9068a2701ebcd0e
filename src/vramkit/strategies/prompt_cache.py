"""Mechanism for ``PromptCache``: encode each prompt once, then free the text encoders.

The pipeline's ``encode_prompt`` is wrapped on the instance (every Flux pipeline calls
``self.encode_prompt``), so cached embeddings are used transparently, including for the negative
prompt of true CFG. The key is every argument that changes the embeddings."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any

import torch

from .._state import get_state
from ..errors import VramkitError
from .base import Undo, register_strategy
from .configs import PromptCache

logger = logging.getLogger("vramkit")

ENCODERS = ("text_encoder", "text_encoder_2")
_KEY_ARGS = ("prompt", "prompt_2", "num_images_per_prompt", "max_sequence_length", "lora_scale")


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor")
    return value


def _clone(value: Any, device: Any = None) -> Any:
    """A copy of the encode_prompt result, on ``device`` (the cache keeps its entries in host RAM,
    where they cost no VRAM, and copies them to the execution device on a hit)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=True) if device is not None else value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v, device) for v in value)
    return value


def _result_device(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.device
    if isinstance(value, tuple):
        for v in value:
            d = _result_device(v)
            if d is not None:
                return d
    return None


class PromptEmbeddingCache:
    """Holds embeddings by key and encodes on a miss; ``hits`` and ``misses`` count calls."""

    def __init__(self, pipe: Any, config: PromptCache, original: Any, managed: list[str]) -> None:
        self.pipe = pipe
        self.config = config
        self.original = original
        self.signature = inspect.signature(original)
        self.entries: OrderedDict[Any, Any] = OrderedDict()
        self.managed = managed  # encoders whose placement this cache controls
        self.hits = 0
        self.misses = 0
        self.deleted = False

    def key(self, bound: inspect.BoundArguments) -> Any | None:
        args = bound.arguments
        if args.get("prompt_embeds") is not None or args.get("pooled_prompt_embeds") is not None:
            return None  # the caller passed embeddings: nothing to cache
        try:
            parts = tuple(_freeze(args.get(k)) for k in _KEY_ARGS)
        except TypeError:
            return None
        device = args.get("device")
        return parts + (str(device),)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        key = self.key(bound)
        if key is not None and key in self.entries:
            self.hits += 1
            self.entries.move_to_end(key)
            device, value = self.entries[key]
            return _clone(value, device)
        if bound.arguments.get("prompt_embeds") is not None:
            return self.original(*args, **kwargs)  # nothing to encode: leave the encoders where they are
        if self.deleted:
            raise VramkitError(
                "PromptCache(release='delete') dropped the text encoders and this prompt is not cached. "
                "Pass prompt_embeds/pooled_prompt_embeds, use one of the cached prompts, or use "
                "PromptCache(release='cpu'), which brings the encoders back for new prompts."
            )
        self.misses += 1
        device = bound.arguments.get("device") or self.pipe._execution_device
        self._bring_encoders(device)
        try:
            result = self.original(*args, **kwargs)
        finally:
            self._release_encoders()
        if key is not None:
            self.entries[key] = (_result_device(result), _clone(result, "cpu"))
            while len(self.entries) > self.config.max_entries:
                self.entries.popitem(last=False)
        return result

    def _bring_encoders(self, device: Any) -> None:
        for name in self.managed:
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.to(device)

    def _release_encoders(self) -> None:
        if self.config.release == "cpu":
            for name in self.managed:
                module = getattr(self.pipe, name, None)
                if module is not None:
                    module.to("cpu")
        else:
            # Off the GPU now; dropped at the end of the pipeline call (a true-CFG call encodes twice).
            for name in self.managed:
                module = getattr(self.pipe, name, None)
                if module is not None:
                    module.to("cpu")
            self.pending_delete = True

    # Call hook protocol (vramkit._state)
    def before_call(self, pipe: Any, args: Any, kwargs: Any) -> None:
        return None

    def after_call(self, pipe: Any) -> None:
        if self.config.release == "delete" and getattr(self, "pending_delete", False) and not self.deleted:
            for name in self.managed:
                if getattr(self.pipe, name, None) is not None:
                    self.pipe.register_modules(**{name: None})
            self.deleted = True
            logger.info("PromptCache: text encoders deleted after the first pipeline call")


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@register_strategy(PromptCache)
def apply_prompt_cache(pipe: Any, config: PromptCache, component: str | None) -> Undo | None:
    state = get_state(pipe)
    placed = state.placed if state is not None else {}
    present = [n for n in ENCODERS if isinstance(getattr(pipe, n, None), torch.nn.Module)]
    managed = [n for n in present if n not in placed]
    original_devices = {n: _device_of(getattr(pipe, n)) for n in managed}
    original = pipe.encode_prompt
    cache = PromptEmbeddingCache(pipe, config, original, managed)
    if config.release == "cpu":
        for n in managed:
            getattr(pipe, n).to("cpu")
    pipe.encode_prompt = cache
    if state is not None:
        if config.release == "delete":
            state.call_hooks["PromptCache"] = cache
        for n in managed:
            state.placed[n] = "PromptCache"
    logger.info("PromptCache: prompts encoded once; %s released to host RAM between encodings", managed)
    if config.release == "delete":
        return None

    def undo() -> None:
        pipe.__dict__.pop("encode_prompt", None)
        for n, dev in original_devices.items():
            module = getattr(pipe, n, None)
            if module is not None:
                module.to(dev)
            if state is not None:
                state.placed.pop(n, None)

    return undo
