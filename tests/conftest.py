"""Shared fixtures: offline everywhere, tiny pipelines, and helpers that prove a pipeline is clean."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vramkit.testing import tiny_pipeline  # noqa: E402
from vramkit.testing.checks import run_tiny as run  # noqa: E402


@pytest.fixture(scope="session")
def reference_outputs() -> dict[str, torch.Tensor]:
    """Output of each unoptimized tiny pipeline kind, computed once (after a warm-up call)."""
    cache: dict[str, torch.Tensor] = {}

    class _Lazy(dict):
        def __missing__(self, kind: str) -> torch.Tensor:
            pipe = tiny_pipeline(kind)
            run(pipe, kind)
            cache[kind] = run(pipe, kind)
            self[kind] = cache[kind]
            return cache[kind]

    return _Lazy()
