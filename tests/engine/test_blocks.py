"""Finding block stacks and spreading resident blocks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from streaming_models import build_controlnet, build_flux, build_t5

from vramkit.engine import choose_resident, execution_order, find_block_stacks


def test_flux_stacks_in_execution_order() -> None:
    model = build_flux(num_layers=2, num_single_layers=3)
    stacks = find_block_stacks(model)
    assert [(n, len(s)) for n, s in stacks] == [("transformer_blocks", 2), ("single_transformer_blocks", 3)]
    order = execution_order(stacks)
    assert [(n, i) for n, i, _ in order] == [
        ("transformer_blocks", 0),
        ("transformer_blocks", 1),
        ("single_transformer_blocks", 0),
        ("single_transformer_blocks", 1),
        ("single_transformer_blocks", 2),
    ]
    assert order[0][2] is model.transformer_blocks[0]


def test_controlnet_and_t5_stacks() -> None:
    cn = find_block_stacks(build_controlnet())
    assert [(n, len(s)) for n, s in cn] == [("transformer_blocks", 2), ("single_transformer_blocks", 2)]
    t5 = build_t5(num_layers=3)
    stacks = find_block_stacks(t5)
    assert [(n, len(s)) for n, s in stacks] == [("encoder.block", 3)]
    assert stacks[0][1] is t5.encoder.block


def test_unknown_module_has_no_stack() -> None:
    assert find_block_stacks(torch.nn.Linear(2, 2)) == []


def test_choose_resident_edges() -> None:
    assert choose_resident(10, 0) == set()
    assert choose_resident(10, 10) == set(range(10))
    assert choose_resident(10, 99) == set(range(10))
    assert choose_resident(10, -3) == set()
    assert choose_resident(0, 5) == set()
    assert choose_resident(list("abcde"), 1) == {2}
    assert choose_resident(57, 3) == {9, 28, 47}
    with pytest.raises(TypeError):
        choose_resident(10, True)  # type: ignore[arg-type]


@given(n=st.integers(1, 200), r=st.integers(0, 200))
def test_choose_resident_spread(n: int, r: int) -> None:
    chosen = choose_resident(n, r)
    k = min(r, n)
    assert len(chosen) == k
    assert all(0 <= p < n for p in chosen)
    assert chosen == choose_resident(n, r)  # deterministic
    if 0 < k < n:
        # Evenly spread: the streamed runs between resident blocks differ by at most one block
        # (the runs at both ends, which meet across the wrap-around, count as one).
        pos = sorted(chosen)
        gaps = [b - a - 1 for a, b in zip(pos, pos[1:])] + [pos[0] + n - 1 - pos[-1]]
        assert max(gaps) - min(gaps) <= 1
