"""Streaming a FluxMultiControlNetModel: several ControlNets, or several modes of one union ControlNet."""

from __future__ import annotations

import torch
from diffusers import FluxMultiControlNetModel

import vramkit
from vramkit.engine import enable_block_streaming, streamer_of
from vramkit.engine.blocks import find_block_stacks
from vramkit.testing import tiny_call_kwargs, tiny_pipeline


def _two_mode_union() -> tuple[object, dict[str, object]]:
    pipe = tiny_pipeline("controlnet-union")
    pipe.controlnet = FluxMultiControlNetModel([pipe.controlnet])
    kwargs = tiny_call_kwargs("controlnet-union")
    second = tiny_call_kwargs("controlnet-union", seed=1)["control_image"]
    kwargs.update(
        control_image=[kwargs["control_image"], second],
        control_mode=[0, 2],
        controlnet_conditioning_scale=[0.4, 0.3],
        # diffusers sizes the per-control schedule by the number of nets (one here): without
        # one entry per image, zip() silently drops the second control.
        control_guidance_start=[0.0, 0.0],
        control_guidance_end=[1.0, 1.0],
    )
    return pipe, kwargs


def test_stacks_of_a_multi_controlnet_are_its_nets_stacks_each_net_once() -> None:
    pipe = tiny_pipeline("multi-controlnet")
    names = [name for name, _ in find_block_stacks(pipe.controlnet)]
    assert names == [
        "nets.0.transformer_blocks",
        "nets.0.single_transformer_blocks",
        "nets.1.transformer_blocks",
        "nets.1.single_transformer_blocks",
    ]
    union, _ = _two_mode_union()
    # The same union net listed once runs once per control image: its blocks are listed once.
    assert [n for n, _ in find_block_stacks(union.controlnet)] == [
        "nets.0.transformer_blocks",
        "nets.0.single_transformer_blocks",
    ]


def test_streamed_multi_controlnet_is_bit_identical_and_restores() -> None:
    pipe = tiny_pipeline("multi-controlnet")
    ref = pipe(**tiny_call_kwargs("multi-controlnet")).images
    before = {k: v.clone() for k, v in pipe.controlnet.state_dict().items()}
    streamer = enable_block_streaming(pipe.controlnet, resident=1, device="cpu")
    assert len(streamer.layout.streamed_positions) > 0
    assert torch.equal(pipe(**tiny_call_kwargs("multi-controlnet")).images, ref)
    streamer.restore()
    assert streamer_of(pipe.controlnet) is None
    after = pipe.controlnet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(pipe(**tiny_call_kwargs("multi-controlnet")).images, ref)


def test_two_modes_of_one_streamed_union_controlnet_are_bit_identical() -> None:
    pipe, kwargs = _two_mode_union()
    ref = pipe(**kwargs).images
    _, kwargs = _two_mode_union()  # fresh generator
    streamer = enable_block_streaming(pipe.controlnet, resident=0, device="cpu")
    out = pipe(**kwargs).images
    assert torch.equal(out, ref)
    # One forward of the multi-ControlNet per step runs the union net's blocks twice: both passes
    # streamed, nothing fetched on demand.
    assert streamer.stats.forwards > 0 and streamer.stats.fallbacks == 0
    assert streamer.stats.copies >= 2 * len(streamer.layout.streamed_positions) * streamer.stats.forwards - 2
    streamer.restore()
    _, kwargs = _two_mode_union()
    assert torch.equal(pipe(**kwargs).images, ref)


def test_planner_streams_a_two_mode_union_controlnet() -> None:
    from vramkit.testing.full_size import full_size_flux_pipeline

    pipe = full_size_flux_pipeline("flux-dev+controlnet-union", device="meta")
    pipe.controlnet = FluxMultiControlNetModel([pipe.controlnet])
    plan = vramkit.plan(pipe, vram="12GiB", ram="64GiB", height=1024, width=1024)
    kinds = {(type(s.strategy).__name__, s.component) for s in plan.steps}
    assert ("BlockStreaming", "controlnet") in kinds
    assert plan.predicted.peak_vram <= 12 * 2**30


def test_planner_counts_passes_per_distinct_net() -> None:
    from vramkit.planner import spec_from_pipeline
    from vramkit.testing.full_size import full_size_flux_pipeline

    pipe = full_size_flux_pipeline("flux-dev+controlnet-union", device="meta")
    net = pipe.controlnet
    pipe.controlnet = FluxMultiControlNetModel([net])
    one_union = spec_from_pipeline(pipe)
    pipe.controlnet = FluxMultiControlNetModel([net, net])
    listed_twice = spec_from_pipeline(pipe)
    # Two modes of one union net, however they are listed: two passes of one set of weights.
    assert one_union.controls == listed_twice.controls == 2
    assert one_union.multi_control and listed_twice.multi_control
    assert one_union.get("controlnet").sizes.weight_bytes() == listed_twice.get("controlnet").sizes.weight_bytes()
    other = full_size_flux_pipeline("flux-dev+controlnet-union", device="meta").controlnet
    pipe.controlnet = FluxMultiControlNetModel([net, other])
    two_nets = spec_from_pipeline(pipe)
    # Two distinct nets run once each; their sizes already cover both.
    assert two_nets.controls == 1 and two_nets.multi_control
    assert two_nets.get("controlnet").sizes.weight_bytes() == 2 * one_union.get("controlnet").sizes.weight_bytes()
