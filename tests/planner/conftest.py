"""Planner fixtures: full-size pipeline specs built once per session on the meta device."""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass
from typing import ClassVar

import pytest

GiB = 1024**3


def _ensure_block_streaming() -> None:
    """While ``vramkit.strategies.streaming`` is being written elsewhere, plan with a stand-in config
    (tests only; library code never does this)."""
    try:
        importlib.import_module("vramkit.strategies.streaming")
        return
    except ImportError:
        pass
    from vramkit.strategies import base

    @dataclass(frozen=True)
    class BlockStreaming(base.Strategy):
        resident: int | None = None
        prefetch: int = 1
        storage: str | None = None
        components: tuple[str, ...] | None = None
        device: str | None = None
        budget: int | None = None
        pinned_limit: int | None = None

        name: ClassVar[str] = "BlockStreaming"
        order: ClassVar[int] = 70

    module = types.ModuleType("vramkit.strategies.streaming")
    module.BlockStreaming = BlockStreaming  # type: ignore[attr-defined]
    sys.modules["vramkit.strategies.streaming"] = module
    base._BY_NAME["BlockStreaming"] = BlockStreaming


_ensure_block_streaming()


class _Specs(dict):
    def __missing__(self, model: str):
        from vramkit.planner import spec_from_model

        self[model] = spec_from_model(model)
        return self[model]


@pytest.fixture(scope="session")
def specs() -> dict:
    """``specs[model]``: the PipelineSpec of a CLI model, built on first use."""
    return _Specs()


def budget(vram_gib: float, ram_gib: float = 64, bandwidth: float = 25e9):
    from vramkit.planner import Budget

    ram = int(ram_gib * GiB)
    return Budget(vram=int(vram_gib * GiB), ram=ram, pinned=int(0.55 * ram), bandwidth=bandwidth)
