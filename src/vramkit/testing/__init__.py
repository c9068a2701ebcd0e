"""Test beds for vramkit: tiny offline FLUX pipelines (and, elsewhere, full-size architectures).

Nothing here touches the network or the Hugging Face hub; everything is built in memory.
"""

from __future__ import annotations

from vramkit.testing.tiny import TINY_KINDS, tiny_call_kwargs, tiny_pipeline

__all__ = ["TINY_KINDS", "tiny_call_kwargs", "tiny_pipeline"]
