"""Components on different devices (several GPUs), tested with what a CPU offers.

- the vramkit_device hook routes a call: inputs to the component's device, outputs back to where
  the inputs were (a fake device mapping records the moves);
- the whole pipeline with every component bound through the same code path (both "devices" are the
  CPU here) gives bit-identical output, resolves _execution_device to the transformer's device, and
  restore removes every hook and leaves the pipeline exactly as it was.
"""

from __future__ import annotations

import types

import pytest
import torch

import vramkit
from vramkit._pipeline import snapshot
from vramkit.errors import InvalidBudgetError, InvalidRequestError
from vramkit.strategies import Resident, placement
from vramkit.testing import tiny_pipeline
from vramkit.testing.checks import assert_no_hooks, run_tiny


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, *, scale=None):
        return {"y": self.lin(x) * (1 if scale is None else scale), "aux": (x.sum(), 3)}


def test_hook_moves_inputs_to_its_device_and_outputs_back(monkeypatch):
    moves: list[tuple[str, str]] = []

    def fake_send(obj, device):
        moves.append((str(placement.first_device(obj)), str(device)))
        return obj  # the data stays on the CPU; the test checks where the hook sends it

    monkeypatch.setattr(placement, "_send", fake_send)
    net = _Net()
    ref = net(torch.ones(2, 4), scale=torch.tensor(2.0))
    undo = placement.bind_device(types.SimpleNamespace(), "net", net, torch.device("cuda", 1))
    out = net(torch.ones(2, 4), scale=torch.tensor(2.0))
    assert torch.equal(out["y"], ref["y"])
    # args, kwargs to cuda:1; the output back to the inputs' device (cpu).
    assert moves == [("cpu", "cuda:1"), ("cpu", "cuda:1"), ("cpu", "cpu")]
    undo()
    assert "forward" not in net.__dict__ and not hasattr(net, "_diffusers_hook")
    moves.clear()
    net(torch.ones(2, 4))
    assert moves == []


def test_hook_leaves_outputs_alone_when_inputs_are_already_there(monkeypatch):
    moves: list[str] = []
    monkeypatch.setattr(placement, "_send", lambda obj, device: moves.append(str(device)) or obj)
    net = _Net()
    placement.bind_device(types.SimpleNamespace(), "net", net, torch.device("cpu"))
    net(torch.ones(1, 4))
    assert moves == ["cpu", "cpu"]  # args and kwargs; no move back


def test_send_keeps_model_output_types():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = BaseModelOutputWithPooling(last_hidden_state=torch.ones(1, 2), pooler_output=torch.zeros(1))
    moved = placement._send(out, torch.device("cpu"))
    assert type(moved) is BaseModelOutputWithPooling
    assert moved.pooler_output is out.pooler_output  # already there: no copy


def test_autoencoder_is_hooked_where_encode_and_decode_call():
    pipe = tiny_pipeline("flux")
    parts = placement.entry_modules(pipe.vae)
    assert pipe.vae.decoder in parts and pipe.vae.encoder in parts and pipe.vae not in parts
    assert placement.entry_modules(pipe.transformer) == [pipe.transformer]


@pytest.mark.parametrize("kind", ["flux", "fill", "controlnet"])
def test_split_pipeline_is_bit_identical_and_restores(kind):
    pipe = tiny_pipeline(kind)
    ref = run_tiny(pipe, kind)
    before = snapshot(pipe)
    cls = type(pipe)
    main = ("transformer",) + (("controlnet",) if kind == "controlnet" else ())
    vramkit.optimize(
        pipe,
        strategies=[
            Resident(components=main, device="cpu"),
            Resident(components=("text_encoder", "text_encoder_2", "vae"), device=torch.device("cpu")),
        ],
    )
    state = pipe._vramkit_state
    assert set(state.devices) >= {"transformer", "text_encoder", "text_encoder_2", "vae"}
    assert pipe._execution_device == torch.device("cpu")
    assert "vramkit_device" in pipe.vae.decoder._diffusers_hook.hooks
    assert "vramkit_device" in pipe.text_encoder_2._diffusers_hook.hooks
    out = run_tiny(pipe, kind)
    assert torch.equal(out, ref)
    plan = vramkit.applied_plan(pipe)
    assert plan is not None and all(s.strategy.device == "cpu" for s in plan.steps)
    vramkit.restore(pipe)
    assert_no_hooks(pipe, cls)
    assert snapshot(pipe) == before
    assert torch.equal(run_tiny(pipe, kind), ref)


def test_execution_device_follows_the_transformer(monkeypatch):
    """The wrapped class answers _execution_device with the transformer's bound device, not
    diffusers' first component (the VAE)."""
    pipe = tiny_pipeline("flux")
    vramkit.optimize(pipe, strategies=[Resident(components=("transformer",), device="cpu")])
    state = pipe._vramkit_state
    monkeypatch.setitem(state.devices, "transformer", torch.device("cuda", 1))
    assert pipe._execution_device == torch.device("cuda", 1)
    monkeypatch.delitem(state.devices, "transformer")
    assert pipe._execution_device == torch.device("cpu")  # diffusers' own answer
    vramkit.restore(pipe)


def test_resident_device_is_checked_and_stored_as_text():
    assert Resident(device=1).device == "cuda:1"
    assert Resident(device=torch.device("cuda", 0)).device == "cuda:0"
    with pytest.raises(InvalidRequestError, match="not a device"):
        Resident(device="gpu7")


def test_optimize_refuses_devices_this_machine_lacks():
    pipe = tiny_pipeline("flux")
    before = snapshot(pipe)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InvalidBudgetError, match="CUDA device"):
        vramkit.optimize(pipe, vram={f"cuda:{visible}": "1GiB", f"cuda:{visible + 1}": "1GiB"})
    assert snapshot(pipe) == before
