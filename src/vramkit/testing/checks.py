"""Assertions for tests of code that uses vramkit: run a tiny pipeline, prove no hook is left."""

from __future__ import annotations

from typing import Any

import torch

from .._pipeline import model_components
from .tiny import tiny_call_kwargs

__all__ = ["run_tiny", "assert_no_hooks"]


def run_tiny(pipe: Any, kind: str, **overrides: Any) -> torch.Tensor:
    """One deterministic call of a tiny pipeline with :func:`tiny_call_kwargs`; the image tensor."""
    kwargs = tiny_call_kwargs(kind)
    kwargs.update(overrides)
    out = pipe(**kwargs).images
    return out if isinstance(out, torch.Tensor) else torch.as_tensor(out)


def assert_no_hooks(pipe: Any, original_class: type) -> None:
    """No vramkit, accelerate or diffusers hook is left anywhere; class and methods as built."""
    assert type(pipe) is original_class, f"pipeline class is {type(pipe)}, expected {original_class}"
    assert "_vramkit_state" not in pipe.__dict__, "vramkit state left on the pipeline"
    assert "encode_prompt" not in pipe.__dict__, "encode_prompt still wrapped"
    assert not getattr(pipe, "_all_hooks", None), "diffusers model-offload hooks left"
    for name, comp in model_components(pipe).items():
        for method in ("encode", "decode"):
            assert method not in comp.__dict__, f"{name}.{method} still wrapped"
        for sub_name, sub in comp.named_modules():
            where = f"{name}.{sub_name}" if sub_name else name
            assert not hasattr(sub, "_hf_hook"), f"accelerate hook left on {where}"
            assert "forward" not in sub.__dict__, f"forward still wrapped on {where}"
            registry = getattr(sub, "_diffusers_hook", None)
            assert registry is None or not registry.hooks, f"diffusers hooks left on {where}: {list(registry.hooks)}"
