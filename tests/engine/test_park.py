"""Parking: a streamed module frees its resident blocks, ring and scratch while the VAE decodes and
brings them back at its next forward, with bit-identical results and an exact restore."""

from __future__ import annotations

import pytest
import torch

from vramkit.engine import enable_block_streaming
from vramkit.strategies import BlockStreaming
from vramkit.strategies.streaming import _park_around_vae_decode
from vramkit.testing import tiny_call_kwargs, tiny_pipeline


@pytest.mark.parametrize("storage", [None, "fp8"])
def test_parked_during_decode_then_back_bit_identical(storage: str | None) -> None:
    pipe = tiny_pipeline("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    streamer = enable_block_streaming(pipe.transformer, resident=2, storage=storage, device="cpu")
    ref = [pipe(**tiny_call_kwargs("flux")).images for _ in range(2)]
    streamer.restore()

    streamer = enable_block_streaming(pipe.transformer, resident=2, storage=storage, device="cpu", park=True)
    unhook = _park_around_vae_decode(pipe, [streamer])
    assert unhook is not None and "decode" in pipe.vae.__dict__
    first = pipe(**tiny_call_kwargs("flux")).images
    # Parked by the decode: nothing of the blocks is held, their host copies are.
    assert streamer.parked and streamer.park_count == 1
    assert not streamer._dev_bufs and not streamer._slots and streamer.scheduler is None
    assert len(streamer._park_host) == len(streamer.layout.resident_positions)
    second = pipe(**tiny_call_kwargs("flux")).images
    assert streamer.park_count == 2
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[1])

    unhook()
    assert "decode" not in pipe.vae.__dict__
    streamer.restore()  # while parked: restored from the host copies
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not streamer._park_host


def test_restore_after_unpark_is_exact() -> None:
    pipe = tiny_pipeline("flux")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    streamer = enable_block_streaming(pipe.transformer, resident=1, device="cpu", park=True)
    streamer.park()
    streamer.unpark()
    assert not streamer.parked and streamer._dev_bufs
    pipe(**tiny_call_kwargs("flux"))
    streamer.restore()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_wrappers_chain_and_undo_in_reverse() -> None:
    pipe = tiny_pipeline("controlnet")
    a = enable_block_streaming(pipe.transformer, resident=1, device="cpu", park=True)
    b = enable_block_streaming(pipe.controlnet, resident=1, device="cpu", park=True)
    undo_a = _park_around_vae_decode(pipe, [a])
    undo_b = _park_around_vae_decode(pipe, [b])
    pipe(**tiny_call_kwargs("controlnet"))
    assert a.parked and b.parked
    assert undo_a is not None and undo_b is not None
    undo_b()
    assert "decode" in pipe.vae.__dict__  # a's wrapper is back in place
    undo_a()
    assert "decode" not in pipe.vae.__dict__
    a.restore()
    b.restore()


def test_park_flag_is_validated_and_planned_lossless_plans_use_it() -> None:
    from vramkit.errors import InvalidRequestError
    from vramkit.testing.full_size import full_size_flux_pipeline

    with pytest.raises(InvalidRequestError, match="park_during_decode"):
        BlockStreaming(park_during_decode="yes")  # type: ignore[arg-type]
    import vramkit

    pipe = full_size_flux_pipeline("flux-dev", device="meta")
    plan = vramkit.plan(pipe, vram="8GiB", ram="128GiB", height=1024, width=1024, quality="lossless",
                        bandwidth="55GB/s")
    step = next(s for s in plan.steps if s.component == "transformer")
    assert step.strategy.park_during_decode and "parked" in step.reason
    # The decode no longer sits beside the resident blocks: more of them fit than without parking
    # (5 at 8 GiB before parking existed, with the decode's 7.22 GiB peak the binding stage).
    assert step.strategy.resident > 5
    assert plan.predicted.peak_vram <= 8 * 2**30


def test_unparked_inside_inference_mode_then_called_outside_it() -> None:
    """Buffers made while unparking under torch.inference_mode must not be inference tensors, or
    every later call outside it fails (found in review)."""
    pipe = tiny_pipeline("flux")
    ref = pipe(**tiny_call_kwargs("flux")).images
    streamer = enable_block_streaming(pipe.transformer, resident=2, device="cpu", park=True)
    unhook = _park_around_vae_decode(pipe, [streamer])
    pipe(**tiny_call_kwargs("flux"))  # parks at the decode
    with torch.inference_mode():
        kwargs = tiny_call_kwargs("flux")
        kwargs["output_type"] = "latent"
        pipe(**kwargs)  # unparks inside inference mode; no decode, so it stays unparked
    assert not streamer.parked
    assert torch.equal(pipe(**tiny_call_kwargs("flux")).images, ref)
    assert unhook is not None
    unhook()
    streamer.restore()


def test_an_undone_wrapper_kept_by_someone_else_only_passes_calls_through() -> None:
    pipe = tiny_pipeline("flux")
    streamer = enable_block_streaming(pipe.transformer, resident=1, device="cpu", park=True)
    unhook = _park_around_vae_decode(pipe, [streamer])
    assert unhook is not None
    kept = pipe.vae.__dict__["decode"]  # e.g. the profiler's saved value
    unhook()
    pipe.vae.__dict__["decode"] = kept  # ... put back after the undo
    streamer.restore()
    pipe(**tiny_call_kwargs("flux"))  # must neither park a restored streamer nor fail
    assert streamer.park_count == 0
    del pipe.vae.__dict__["decode"]


def test_text_encoder_parks_after_every_forward_bit_identical() -> None:
    """BlockStreaming(park_after_forward=True) on T5: the ring is freed once the prompt is encoded
    and comes back for the next prompt; the images equal the unparked streamer's; restore is exact."""
    pipe = tiny_pipeline("flux")
    before = {k: v.clone() for k, v in pipe.text_encoder_2.state_dict().items()}
    plain = enable_block_streaming(pipe.text_encoder_2, resident=0, device="cpu")
    ref = [pipe(**tiny_call_kwargs("flux")).images for _ in range(2)]
    plain.restore()

    streamer = enable_block_streaming(pipe.text_encoder_2, resident=0, device="cpu", park_after_forward=True)
    assert streamer.parkable and not streamer.parked
    first = pipe(**tiny_call_kwargs("flux")).images
    assert streamer.parked and streamer.park_count == 1
    assert not streamer._slots and streamer.scheduler is None  # the ring is gone until the next prompt
    second = pipe(**tiny_call_kwargs("flux")).images
    assert streamer.park_count == 2
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[1])
    streamer.restore()
    after = pipe.text_encoder_2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_park_after_forward_flag_is_validated() -> None:
    from vramkit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="park_after_forward"):
        BlockStreaming(park_after_forward=1)  # type: ignore[arg-type]
    assert BlockStreaming(park_after_forward=True).to_dict()["park_after_forward"] is True


def test_planned_text_encoding_runs_beside_the_parked_transformer() -> None:
    """Lossless 8 GiB plan: T5 streamed with park_after_forward, the transformer parked from the
    decode (and from the start) until its first step, so the text encoding stage holds neither the
    transformer's resident blocks nor its ring, and the denoising step holds no T5 ring."""
    import vramkit
    from vramkit.testing.full_size import full_size_flux_pipeline

    pipe = full_size_flux_pipeline("flux-dev", device="meta")
    plan = vramkit.plan(pipe, vram="8GiB", ram="128GiB", height=1024, width=1024, quality="lossless",
                        bandwidth="55GB/s")
    t5 = next(s for s in plan.steps if s.component == "text_encoder_2")
    assert t5.strategy.name == "BlockStreaming" and t5.strategy.park_after_forward
    assert "ring is freed" in t5.reason
    t = next(s for s in plan.steps if s.component == "transformer")
    assert t.strategy.park_during_decode
    stages = plan.predicted.stages
    assert stages["text_encoding"].vram < stages["denoising_step"].vram / 2
    # One more double-stream block than before T5's ring left the denoising step (5 at 7.5 GiB).
    assert t.strategy.resident >= 6


def test_parked_streamer_starts_parked_when_applied_through_the_strategy(monkeypatch) -> None:
    """The strategy parks right after applying (so the first call's text encoding has the memory);
    the first forward brings the blocks back, bit-identical."""
    import vramkit.strategies.streaming as streaming
    from vramkit.engine import BlockStreamer

    started: list[BlockStreamer] = []
    real_start = BlockStreamer.start

    def start(self: BlockStreamer) -> BlockStreamer:
        started.append(self)
        return real_start(self)

    monkeypatch.setattr(BlockStreamer, "start", start)
    monkeypatch.setattr(BlockStreaming, "_effective", lambda self: True)
    monkeypatch.setattr(streaming, "_device", lambda config: torch.device("cpu"))
    pipe = tiny_pipeline("flux")
    ref = pipe(**tiny_call_kwargs("flux")).images
    undo = streaming.apply_block_streaming(
        pipe, BlockStreaming(resident=2, park_during_decode=True), "transformer"
    )
    (streamer,) = started
    assert streamer.parked and streamer.park_count == 1
    out = pipe(**tiny_call_kwargs("flux")).images
    assert torch.equal(out, ref)
    undo()


def _parked_away(module: torch.nn.Module) -> bool:
    """Every floating tensor of ``module`` is a parked placeholder (an expanded zero: no storage)."""
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
    return bool(tensors) and all(t.numel() <= 1 or 0 in t.stride() for t in tensors)


@pytest.mark.parametrize("component,resident", [("text_encoder_2", 0), ("text_encoder", None)])
def test_text_encoder_parks_its_rest_too_bit_identical(component: str, resident: int | None) -> None:
    """BlockStreaming(park_after_forward=True, park_rest=True): between prompts nothing of T5 (its
    embedding included) or of a CLIP with every layer resident stays on the device; the images equal
    the unoptimized pipeline's; restore gives back the same tensors."""
    from vramkit.engine import find_block_stacks

    pipe = tiny_pipeline("flux")
    module = getattr(pipe, component)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    params = dict(module.named_parameters(remove_duplicate=False))
    ref = [pipe(**tiny_call_kwargs("flux")).images for _ in range(2)]
    n_blocks = sum(len(s) for _, s in find_block_stacks(module))
    assert n_blocks > 0
    streamer = enable_block_streaming(
        module, resident=n_blocks if resident is None else resident, device="cpu",
        park_after_forward=True, park_rest=True,
    )
    assert streamer.rest_host_nbytes > 0
    streamer.park()
    assert _parked_away(module)
    first = pipe(**tiny_call_kwargs("flux")).images
    assert streamer.parked and _parked_away(module)
    second = pipe(**tiny_call_kwargs("flux")).images
    assert torch.equal(first, ref[0]) and torch.equal(second, ref[1])
    streamer.restore()  # while parked
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert not _parked_away(module) and streamer.rest_host_nbytes == 0 and not streamer._rest_host
    # The same Parameter objects come back, ties included (T5's shared / encoder.embed_tokens).
    now = dict(module.named_parameters(remove_duplicate=False))
    assert now.keys() == params.keys() and all(now[k] is params[k] for k in params)
    if component == "text_encoder_2":
        assert module.encoder.embed_tokens.weight is module.shared.weight


def test_park_rest_restore_while_unparked_is_exact() -> None:
    pipe = tiny_pipeline("flux")
    module = pipe.text_encoder_2
    before = {k: v.clone() for k, v in module.state_dict().items()}
    streamer = enable_block_streaming(module, resident=1, device="cpu", park_after_forward=True, park_rest=True)
    streamer.park()
    streamer.unpark()
    assert not streamer.parked and not _parked_away(module)
    streamer.restore()
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert module.encoder.embed_tokens.weight is module.shared.weight


def test_park_rest_needs_a_park_mode() -> None:
    from vramkit.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="park_rest"):
        BlockStreaming(park_rest=True)
    with pytest.raises(InvalidRequestError, match="park_rest"):
        BlockStreaming(park_after_forward=True, park_rest="yes")  # type: ignore[arg-type]
    pipe = tiny_pipeline("flux")
    with pytest.raises(InvalidRequestError, match="park_rest"):
        enable_block_streaming(pipe.text_encoder_2, resident=0, device="cpu", park_rest=True)
    assert "park_rest" not in BlockStreaming(park_after_forward=True).describe()
    assert "park_rest=True" in BlockStreaming(park_after_forward=True, park_rest=True).describe()
