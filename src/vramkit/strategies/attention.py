"""Mechanisms for ``AttentionSlicing`` (query-chunked attention for Flux) and ``AttentionBackend``."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..errors import InvalidRequestError
from .base import Undo, register_strategy
from .configs import AttentionBackend, AttentionSlicing

logger = logging.getLogger("vramkit")


class ChunkedFluxAttnProcessor:
    """Flux attention computed ``chunk`` query tokens at a time.

    Same projections, norms and rotary embedding as diffusers' ``FluxAttnProcessor``; only the
    attention call is split along the query axis, so the attention workspace scales with
    ``chunk x keys`` instead of ``queries x keys``. Every query row attends to all keys, so the
    result is the same as unchunked attention."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, chunk: int, original: Any) -> None:
        self.chunk = chunk
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ) -> Any:
        from diffusers.models.transformers import transformer_flux as tf

        query, key, value, encoder_query, encoder_key, encoder_value = tf._get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = tf.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = tf.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        outputs = []
        for start in range(0, query.shape[1], self.chunk):
            q = query[:, start : start + self.chunk]
            mask = attention_mask
            if mask is not None and mask.dim() >= 2 and mask.shape[-2] == query.shape[1]:
                mask = mask[..., start : start + self.chunk, :]
            outputs.append(
                tf.dispatch_attention_fn(
                    q,
                    key,
                    value,
                    attn_mask=mask,
                    backend=self._attention_backend,
                    parallel_config=self._parallel_config,
                )
            )
        hidden_states = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


def _flux_attention_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return [m for m in module.modules() if isinstance(getattr(m, "processor", None), FluxAttnProcessor)]


@register_strategy(AttentionSlicing)
def apply_attention_slicing(pipe: Any, config: AttentionSlicing, component: str | None) -> Undo | None:
    module = getattr(pipe, component)
    targets = _flux_attention_modules(module)
    if not targets:
        raise InvalidRequestError(
            f"AttentionSlicing: {component} has no Flux attention layers with the standard processor "
            "(a custom or IP-Adapter processor is set); remove it or leave this component out."
        )
    originals = [(m, m.processor) for m in targets]
    for m, proc in originals:
        m.processor = ChunkedFluxAttnProcessor(config.chunk, proc)
    logger.info("AttentionSlicing: %d attention layers of %s compute %d queries at a time",
                len(targets), component, config.chunk)

    def undo() -> None:
        for m, proc in originals:
            m.processor = proc

    return undo


def _processors(module: torch.nn.Module) -> list[Any]:
    procs = []
    for m in module.modules():
        proc = getattr(m, "processor", None)
        if proc is not None and hasattr(proc, "_attention_backend"):
            procs.append(proc)
    return procs


@register_strategy(AttentionBackend)
def apply_attention_backend(pipe: Any, config: AttentionBackend, component: str | None) -> Undo | None:
    # Set per processor, not through ModelMixin.set_attention_backend: that also changes diffusers'
    # process-wide active backend, which reset_attention_backend never puts back.
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    valid = [b.value for b in AttentionBackendName]
    if config.backend not in valid:
        raise InvalidRequestError(f"AttentionBackend({config.backend!r}): unknown backend; valid: {valid}.")
    if "hub" in config.backend:
        raise InvalidRequestError(
            f"AttentionBackend({config.backend!r}) downloads its kernel from the Hugging Face hub at run "
            "time; vramkit never downloads. Install the kernel package and use the non-hub name."
        )
    backend = AttentionBackendName(config.backend)
    try:
        _check_attention_backend_requirements(backend)
    except (ImportError, RuntimeError, ValueError) as exc:
        raise InvalidRequestError(
            f"AttentionBackend({config.backend!r}) is not usable here: {exc} Use 'native' (always available)."
        ) from exc
    module = getattr(pipe, component)
    procs = _processors(module)
    saved = [(p, p.__dict__.get("_attention_backend", _UNSET)) for p in procs]
    for p in procs:
        p._attention_backend = backend

    def undo() -> None:
        for p, old in saved:
            if old is _UNSET:
                p.__dict__.pop("_attention_backend", None)
            else:
                p._attention_backend = old

    return undo


_UNSET = object()
