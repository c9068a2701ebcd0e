"""Streaming by parts (``unit="part"``): each repeated block streams as its parameter-owning
children, in the order its forward calls them. On CPU with real diffusers hooks and a checking
copier: the call order is read from a real forward, outputs are bit-identical, restore is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from streaming_models import (
    assert_no_hooks,
    assert_same_as,
    build_controlnet,
    build_flux,
    build_t5,
    flux_inputs,
    snapshot,
)
from torch import nn

from vramkit.engine import (
    BlockStreamer,
    CheckingCopier,
    compute_layout,
    enable_block_streaming,
    execution_order,
    find_block_stacks,
    max_resident_for_budget,
    streamer_of,
)
from vramkit.engine.blocks import PART_ORDER, block_parts, streaming_units
from vramkit.errors import InvalidRequestError, StrategyConflictError, UnsupportedPipelineError

DOUBLE = ("norm1", "norm1_context", "attn", "ff", "ff_context")
SINGLE = ("norm", "proj_mlp", "attn", "proj_out")


def _run(model: nn.Module, inputs: dict[str, Any], n: int = 1) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(**inputs)[0].clone() for _ in range(n)]


def _owns_tensors(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) or any(True for _ in m.buffers())


def _child_calls(model: nn.Module, inputs: dict[str, Any]) -> dict[int, list[str]]:
    """Every block's direct children that own tensors, in the order one forward calls them."""
    calls: dict[int, list[str]] = {}
    handles = []
    for _, _, block in execution_order(find_block_stacks(model)):
        log: list[str] = []
        calls[id(block)] = log
        for name, child in block.named_children():
            if _owns_tensors(child):
                handles.append(child.register_forward_pre_hook(lambda _m, _a, log=log, n=name: log.append(n)))
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_the_part_order_is_the_call_order_of_the_flux_blocks() -> None:
    """The table the engine uses, checked against a real forward: every tensor-owning child is
    called exactly once per block forward, in the listed order (the ring expects a fixed order)."""
    model = build_flux(num_layers=2, num_single_layers=2)
    assert PART_ORDER["FluxTransformerBlock"] == DOUBLE
    assert PART_ORDER["FluxSingleTransformerBlock"] == SINGLE
    calls = _child_calls(model, flux_inputs())
    for stack, _, block in execution_order(find_block_stacks(model)):
        expected = DOUBLE if stack == "transformer_blocks" else SINGLE
        assert calls[id(block)] == list(expected), (stack, calls[id(block)])
        # The tensor-owning children are exactly the parts, and they hold every tensor of the block.
        assert [n for n, c in block.named_children() if _owns_tensors(c)] != [] and sorted(
            n for n, c in block.named_children() if _owns_tensors(c)
        ) == sorted(expected)
        assert [n for n, _ in block_parts(block) or []] == list(expected)
    # Registration order is not the call order (why the order is a table, not named_children()).
    single = model.single_transformer_blocks[0]
    assert [n for n, c in single.named_children() if _owns_tensors(c)] != list(SINGLE)


def test_controlnet_blocks_are_called_in_the_same_order() -> None:
    model = build_controlnet()
    inputs = {**flux_inputs(), "controlnet_cond": torch.randn(1, 16, 16)}
    calls = _child_calls(model, inputs)
    for stack, _, block in execution_order(find_block_stacks(model)):
        assert calls[id(block)] == list(DOUBLE if stack == "transformer_blocks" else SINGLE)


def test_layout_units_are_the_parts_in_call_order_with_smaller_slots() -> None:
    model = build_flux(num_layers=2, num_single_layers=3)
    by_block = compute_layout(model, 0)
    by_part = compute_layout(model, 0, unit="part")
    assert by_block.unit == "block" and by_part.unit == "part" and by_part.summary()["unit"] == "part"
    expected = [("transformer_blocks", i, p) for i in range(2) for p in DOUBLE] + [
        ("single_transformer_blocks", i, p) for i in range(3) for p in SINGLE
    ]
    assert [(b.stack, b.index, b.part) for b in by_part.blocks] == expected
    assert [b.position for b in by_part.blocks] == list(range(len(expected)))
    assert by_part.stacks == by_block.stacks == (("transformer_blocks", 2), ("single_transformer_blocks", 3))
    # Entry names are relative to the part; the parts together hold exactly the blocks' bytes.
    assert {e.name for e in by_part.blocks[2].entries} == {
        n for n, _ in model.transformer_blocks[0].attn.named_parameters()
    }
    assert sum(b.original_nbytes for b in by_part.blocks) == sum(b.original_nbytes for b in by_block.blocks)
    assert by_part.rest_nbytes == by_block.rest_nbytes
    assert by_part.slot_nbytes == max(b.nbytes for b in by_part.blocks)
    assert by_part.slot_nbytes < by_block.slot_nbytes
    assert by_part.ring_nbytes < by_block.ring_nbytes
    # The default is exactly the whole-block layout.
    assert compute_layout(model, 3, unit="block") == compute_layout(model, 3)
    assert all(b.part == "" for b in by_block.blocks)


def test_resident_parts_are_balanced_per_stack() -> None:
    """Each unit keeps its block's stack name, so COMPUTE_PER_BYTE still weighs the stacks."""
    model = build_flux(num_layers=4, num_single_layers=4)
    lay = compute_layout(model, 20, unit="part")
    resident = [b for b in lay.blocks if b.resident]
    assert len(resident) == 20
    double = sum(1 for b in resident if b.stack == "transformer_blocks")
    single = sum(1 for b in resident if b.stack == "single_transformer_blocks")
    # 20 double-stream parts and 16 single-stream parts, 16 streamed: the double-stream stack
    # (half the compute per byte) streams fewer of its parts.
    assert double + single == 20 and 20 - double < 16 - single


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("resident", [0, 7, 31])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_part_streaming_is_bit_identical_and_restores_exactly(resident: int, prefetch: int, mode: str) -> None:
    model = build_flux(num_layers=3, num_single_layers=4)  # 3 * 5 + 4 * 4 = 31 parts
    inputs = flux_inputs()
    (ref,) = _run(model, inputs)
    snap = snapshot(model)
    copier = CheckingCopier(mode)
    streamer = enable_block_streaming(
        model, resident=resident, prefetch=prefetch, device="cpu", copier=copier, unit="part"
    )
    assert streamer_of(model) is streamer and streamer.layout.unit == "part"
    assert len(streamer.layout.blocks) == 31
    for out in _run(model, inputs, 3):
        assert torch.equal(out, ref)
    streamed = 31 - resident
    assert streamer.stats.forwards == 3
    assert streamer.stats.fallbacks == 0, "the parts ran in another order than the ring expected"
    assert streamer.stats.prefetch_hits == 3 * streamed
    if streamed > prefetch + 1:
        assert copier.copies == 3 * streamed + prefetch + 1
    streamer.restore()
    assert streamer_of(model) is None
    assert_same_as(model, snap)
    assert_no_hooks(model)
    (after,) = _run(model, inputs)
    assert torch.equal(after, ref)


def test_parts_are_hooked_and_point_into_slots_not_the_blocks() -> None:
    model = build_flux()
    streamer = enable_block_streaming(model, resident=3, device="cpu", copier=CheckingCopier(), unit="part")
    spans = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer._slots]
    for _, _, block in execution_order(find_block_stacks(model)):
        registry = getattr(block, "_diffusers_hook", None)
        assert registry is None or not registry.hooks, "a block streamed by parts must not be hooked itself"
    for b in streamer.layout.blocks:
        part = getattr(getattr(model, b.stack)[b.index], b.part)
        in_slot = [any(lo <= p.data_ptr() < hi for lo, hi in spans) for p in part.parameters()]
        assert all(in_slot) if not b.resident else not any(in_slot)
        registry = getattr(part, "_diffusers_hook", None)
        assert (registry is not None and "vramkit_stream_block" in registry.hooks) == (not b.resident)
    streamer.restore()
    assert_no_hooks(model)


def test_lossy_storage_by_parts_matches_by_blocks() -> None:
    """fp8 storage quantizes per output row, so the parts decode to what the whole blocks do."""
    model = build_flux()
    inputs = flux_inputs()
    snap = snapshot(model)
    s = enable_block_streaming(model, resident=0, storage="fp8", device="cpu", copier=CheckingCopier())
    (by_block,) = _run(model, inputs)
    s.restore()
    s = enable_block_streaming(model, resident=4, storage="fp8", device="cpu", copier=CheckingCopier(), unit="part")
    (by_part,) = _run(model, inputs, 1)
    assert torch.equal(by_part, by_block)
    assert s.stats.fallbacks == 0
    s.restore()
    assert_same_as(model, snap)
    assert_no_hooks(model)


def test_t5_blocks_have_no_known_parts_and_stream_whole() -> None:
    """T5Block keeps its sub-layers in a ModuleList that is never called: it streams whole."""
    model = build_t5()
    ids = torch.tensor([[3, 5, 7, 9, 11, 1]])
    with torch.inference_mode():
        ref = model(input_ids=ids).last_hidden_state.clone()
    assert all(part == "" for _, _, part, _ in streaming_units(find_block_stacks(model), "part"))
    lay = compute_layout(model, 1, unit="part")
    assert lay.unit == "part" and all(b.part == "" for b in lay.blocks)
    assert lay.slot_nbytes == compute_layout(model, 1).slot_nbytes
    s = enable_block_streaming(model, resident=1, device="cpu", copier=CheckingCopier(), unit="part")
    with torch.inference_mode():
        assert torch.equal(model(input_ids=ids).last_hidden_state, ref)
    s.restore()
    assert_no_hooks(model)


def test_a_known_block_with_tensors_outside_its_parts_is_refused() -> None:
    model = build_flux()
    model.single_transformer_blocks[1].register_parameter("extra", nn.Parameter(torch.zeros(4)))
    with pytest.raises(UnsupportedPipelineError, match="outside its parts"):
        compute_layout(model, 0, unit="part")
    compute_layout(model, 0)  # whole blocks are fine


def test_unit_is_validated() -> None:
    model = build_flux()
    for bad in ("layer", "Part", None, 1):
        with pytest.raises(InvalidRequestError, match="unit"):
            compute_layout(model, 0, unit=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="unit"):
        enable_block_streaming(model, device="cpu", unit="layer")
    assert streamer_of(model) is None


def test_a_layout_of_another_unit_is_refused() -> None:
    model = build_flux()
    other = build_flux(num_layers=1)
    with pytest.raises(InvalidRequestError):
        BlockStreamer(model, compute_layout(other, 0, unit="part"), device="cpu")
    layout = compute_layout(model, 0, unit="part")
    blocks = tuple(b.__class__(**{**b.__dict__, "part": ""}) if b.position == 0 else b for b in layout.blocks)
    with pytest.raises(InvalidRequestError):
        BlockStreamer(model, layout.__class__(**{**layout.__dict__, "blocks": blocks}), device="cpu")


def test_budget_by_parts_keeps_more_resident() -> None:
    """The ring shrinks to the largest part: the same budget holds more weights resident."""
    model = build_flux(num_layers=3, num_single_layers=4)
    whole = compute_layout(model, 0)
    budget = whole.device_nbytes + whole.slot_nbytes // 2  # no resident block, two block slots
    by_block = max_resident_for_budget(model, budget)
    by_part = max_resident_for_budget(model, budget, unit="part")
    assert by_part.unit == "part" and by_part.device_nbytes <= budget
    assert by_part.resident_nbytes > by_block.resident_nbytes
    assert by_part.streamed_nbytes < by_block.streamed_nbytes


# --- through the strategy --------------------------------------------------------------------


def test_strategy_unit_field_validation_round_trip_and_description() -> None:
    from vramkit.strategies.base import strategy_from_dict
    from vramkit.strategies.streaming import BlockStreaming

    assert BlockStreaming().unit == "block"
    s = BlockStreaming(resident=3, unit="PART")
    assert s.unit == "part" and s.to_dict()["unit"] == "part"
    assert strategy_from_dict(s.to_dict()) == s
    assert strategy_from_dict(BlockStreaming().to_dict()) == BlockStreaming()
    assert "unit='part'" in s.describe()
    # The default reads as it did before the field existed.
    assert "unit" not in BlockStreaming(resident=3).describe()
    for bad in ("layer", None, 3):
        with pytest.raises(InvalidRequestError, match="unit"):
            BlockStreaming(unit=bad)  # type: ignore[arg-type]


def test_pipeline_streamed_by_parts_is_bit_identical_and_restored(tmp_path, reference_outputs) -> None:
    """Through vramkit.optimize on CPU (``host="disk"`` with ``device="cpu"`` is the CPU path)."""
    import vramkit
    from vramkit.strategies.streaming import BlockStreaming
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import assert_no_hooks as assert_pipeline_clean
    from vramkit.testing.checks import run_tiny

    ref = reference_outputs["flux"]
    for resident in (0, 4, None):
        pipe = tiny_pipeline("flux")
        built = type(pipe)
        snap = snapshot(pipe.transformer)
        n_parts = len(compute_layout(pipe.transformer, 0, unit="part").blocks)
        strategy = BlockStreaming(
            resident=n_parts if resident is None else resident,
            host="disk",
            offload_folder=str(tmp_path / "off"),
            device="cpu",
            unit="part",
        )
        vramkit.optimize(pipe, strategies=[strategy])
        streamer = streamer_of(pipe.transformer)
        assert streamer is not None and streamer.layout.unit == "part"
        for _ in range(2):
            assert torch.equal(run_tiny(pipe, "flux"), ref)
        assert streamer.stats.fallbacks == 0
        vramkit.restore(pipe)
        assert_pipeline_clean(pipe, built)
        assert_same_as(pipe.transformer, snap)
        assert torch.equal(run_tiny(pipe, "flux"), ref)


def test_compile_refuses_a_component_streamed_by_parts(tmp_path) -> None:
    import vramkit
    from vramkit.strategies import Compile
    from vramkit.strategies.compile import apply_compile
    from vramkit.strategies.streaming import BlockStreaming
    from vramkit.testing import tiny_pipeline
    from vramkit.testing.checks import assert_no_hooks as assert_pipeline_clean

    pipe = tiny_pipeline("flux")
    built = type(pipe)
    strategies = [
        BlockStreaming(resident=2, host="disk", offload_folder=str(tmp_path), device="cpu", unit="part"),
        Compile(backend="aot_eager"),
    ]
    with pytest.raises(StrategyConflictError, match="unit='part'"):
        vramkit.optimize(pipe, strategies=strategies)
    assert "_vramkit_state" not in pipe.__dict__
    assert streamer_of(pipe.transformer) is None
    assert_pipeline_clean(pipe, built)
    # Directly on the engine too; whole-block streaming still compiles beneath its hooks.
    streamer = enable_block_streaming(pipe.transformer, resident=2, device="cpu", unit="part")
    with pytest.raises(StrategyConflictError):
        apply_compile(pipe, Compile(backend="aot_eager"), "transformer")
    streamer.restore()
