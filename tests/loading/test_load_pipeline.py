"""``vramkit.load``: a saved pipeline folder loaded straight into a plan, bit-identical to
``FluxPipeline.from_pretrained``, streamed blocks file-backed, bounded peak RSS, clean restore and
clear errors for bad folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline

import vramkit
from vramkit.engine import streamer_of
from vramkit.errors import InvalidRequestError, UnsupportedPipelineError
from vramkit.strategies.streaming import BlockStreaming
from vramkit.testing import tiny_call_kwargs, tiny_pipeline

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-flux")
    tiny_pipeline("flux").save_pretrained(folder)
    return folder


def _run(pipe) -> torch.Tensor:
    kwargs = tiny_call_kwargs("flux")
    kwargs["output_type"] = "pt"
    return pipe(**kwargs).images


@pytest.fixture(scope="module")
def reference(saved) -> torch.Tensor:
    ref = FluxPipeline.from_pretrained(saved, local_files_only=True)
    # from_pretrained leaves diffusers weights as views into the file at arbitrary byte offsets, and
    # CPU matmul kernels round unaligned data differently in the last bit. The same values in fresh
    # (aligned) allocations, which is what vramkit.load and every GPU copy give, are the reference.
    for module in (ref.transformer, ref.vae, ref.text_encoder, ref.text_encoder_2):
        for p in module.parameters():
            p.data = p.data.clone()
    return _run(ref)


def _mapped(path: str) -> list[tuple[int, int]]:
    out = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            if line.rstrip().endswith(path):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _devices(pipe) -> dict[str, set[str]]:
    return {
        n: {t.device.type for t in list(m.parameters()) + list(m.buffers())}
        for n, m in pipe.components.items()
        if isinstance(m, torch.nn.Module)
    }


@linux_only
def test_load_streaming_from_disk_is_bit_identical_file_backed_and_restores(saved, reference, tmp_path) -> None:
    offload = tmp_path / "offload"
    pipe = vramkit.load(
        saved,
        device="cpu",
        offload_folder=offload,
        strategies=[
            BlockStreaming(resident=1, host="disk", device="cpu", components=("transformer", "text_encoder_2"))
        ],
    )
    assert pipe.vramkit_plan is not None and len(pipe.vramkit_plan.steps) == 2
    assert len(os.listdir(offload)) == 2
    for name in ("transformer", "text_encoder_2"):
        streamer = streamer_of(getattr(pipe, name))
        assert streamer is not None and streamer.host == "disk"
        path = streamer.summary()["offload_file"]
        ranges = _mapped(path)
        assert ranges, f"{name}'s offload file is not mapped"
        for host in streamer._host.values():
            start = host.tensor.data_ptr()
            end = start + host.tensor.numel()
            assert any(lo <= start and end <= hi for lo, hi in ranges), "host storage is not the mapped file"
    assert torch.equal(_run(pipe), reference)
    assert torch.equal(_run(pipe), reference)
    vramkit.restore(pipe)
    assert not offload.exists(), "restore leaves the offload files behind"
    for name in ("transformer", "text_encoder_2"):
        module = getattr(pipe, name)
        assert streamer_of(module) is None
        for sub in module.modules():
            registry = getattr(sub, "_diffusers_hook", None)
            assert registry is None or not registry.hooks
    # Restored: real tensors on the CPU, like from_pretrained.
    assert all(devs == {"cpu"} for devs in _devices(pipe).values()), _devices(pipe)
    assert torch.equal(_run(pipe), reference)


def test_planned_load_on_cpu_is_bit_identical(saved, reference, tmp_path) -> None:
    pipe = vramkit.load(saved, vram="8GiB", ram="64GiB", quality="lossless", device="cpu", height=32, width=32)
    plan = pipe.vramkit_plan
    assert plan is not None and plan.steps and plan.lossless
    assert all(devs == {"cpu"} for devs in _devices(pipe).values())
    assert torch.equal(_run(pipe), reference)
    vramkit.restore(pipe)
    assert torch.equal(_run(pipe), reference)


def test_load_plans_with_the_free_disk_of_its_offload_folder(saved, tmp_path, monkeypatch) -> None:
    import vramkit.planner as planner

    seen = {}
    real = planner.plan_pipeline

    def recording(pipe, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return real(pipe, **kwargs)

    monkeypatch.setattr(planner, "plan_pipeline", recording)
    offload = tmp_path / "off"
    pipe = vramkit.load(saved, vram="8GiB", ram="64GiB", quality="lossless", device="cpu", height=32, width=32,
                        offload_folder=offload)
    assert seen["offload_folder"] == offload
    vramkit.restore(pipe)


def test_load_without_a_plan_equals_from_pretrained(saved, reference) -> None:
    pipe = vramkit.load(saved, strategies=[])
    assert isinstance(pipe, FluxPipeline)
    assert pipe.text_encoder_2.shared.weight is pipe.text_encoder_2.encoder.embed_tokens.weight
    assert torch.equal(_run(pipe), reference)


def test_torch_dtype_converts_as_it_reads(saved) -> None:
    pipe = vramkit.load(saved, strategies=[], torch_dtype=torch.bfloat16)
    for name in ("transformer", "text_encoder_2", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.bfloat16}, name


def test_mmap_streaming_via_optimize_with_a_tiny_ram_budget_is_bit_identical(saved, reference, tmp_path) -> None:
    """The planner picks disk streaming when the RAM budget cannot hold the weights; applied on the
    CPU (no GPU here) through the same strategies, the output does not change."""
    from vramkit.planner import Request, plan_for, spec_from_model

    spec = spec_from_model("flux-dev")
    GiB = 1024**3
    from vramkit.planner import Budget

    planned = plan_for(spec, Request(max_sequence_length=512), Budget(8 * GiB, 8 * GiB, 4 * GiB, 25e9), "lossless")
    disk_steps = [s for s in planned.steps if s.strategy.name == "BlockStreaming" and s.strategy.host == "disk"]
    assert {s.component for s in disk_steps} == {"transformer", "text_encoder_2"}
    pipe = FluxPipeline.from_pretrained(saved, local_files_only=True)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        for p in module.parameters():
            p.data = p.data.clone()
    from dataclasses import replace

    strategies = [
        replace(s.strategy, resident=1, device="cpu", offload_folder=str(tmp_path / "off")) for s in disk_steps
    ]
    vramkit.optimize(pipe, strategies=strategies)
    assert len(os.listdir(tmp_path / "off")) == 2
    assert torch.equal(_run(pipe), reference)
    vramkit.restore(pipe)
    assert not (tmp_path / "off").exists()
    assert torch.equal(_run(pipe), reference)


# --- bad input ---------------------------------------------------------------------------------


def test_missing_folder_is_refused(tmp_path) -> None:
    with pytest.raises(InvalidRequestError, match="not a folder"):
        vramkit.load(tmp_path / "nope")


def test_folder_without_model_index_is_refused(tmp_path) -> None:
    with pytest.raises(InvalidRequestError, match="model_index.json"):
        vramkit.load(tmp_path)


def test_non_flux_pipeline_is_refused(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(UnsupportedPipelineError, match="Flux"):
        vramkit.load(tmp_path)


def test_non_safetensors_weights_are_refused(saved, tmp_path) -> None:
    copy = tmp_path / "pickled"
    shutil.copytree(saved, copy)
    st = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    with pytest.raises(InvalidRequestError, match="safetensors"):
        vramkit.load(copy, strategies=[])


def test_weights_that_do_not_match_the_config_are_refused(saved, tmp_path) -> None:
    copy = tmp_path / "deeper"
    shutil.copytree(saved, copy)
    config_path = copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidRequestError, match="do not match"):
        vramkit.load(copy, strategies=[])


# --- memory --------------------------------------------------------------------------------------

# FLUX-shaped transformer of about 71M parameters (136 MiB in bf16): big enough that a full copy
# in RAM stands out from the interpreter's own growth.
_BIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=4,
    num_single_layers=8,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=512,
    pooled_projection_dim=256,
    guidance_embeds=True,
    axes_dims_rope=[8, 28, 28],
)

_CHILD = r"""
import json, sys
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "RssAnon")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
import torch, diffusers, transformers, accelerate, safetensors  # noqa: F401  (imports are not measured)
import vramkit
from vramkit.strategies.streaming import BlockStreaming
folder, offload = sys.argv[1], sys.argv[2]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status()
pipe = vramkit.load(folder, device="cpu", offload_folder=offload,
                    strategies=[BlockStreaming(resident=0, host="disk", device="cpu")])
after = status()
streamer = vramkit.engine.streamer_of(pipe.transformer)
print(json.dumps({"growth": after["VmHWM"] - before["VmRSS"], "anon": after["RssAnon"] - before["RssAnon"],
                  "file_nbytes": streamer.file_nbytes}))
"""


@linux_only
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_loading_into_disk_streaming_never_holds_the_transformer_in_ram(tmp_path, record_property) -> None:
    from diffusers import FluxTransformer2DModel

    pipe = tiny_pipeline("flux")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer = FluxTransformer2DModel(**_BIG).to(torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
    folder = tmp_path / "big"
    pipe.save_pretrained(folder)
    del pipe
    env = dict(os.environ)
    src = str(Path(vramkit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), str(tmp_path / "offload")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    mib = 2**20
    record_property("rss", {"weights_MiB": weights / mib, "peak_growth_MiB": got["growth"] / mib})
    assert got["file_nbytes"] >= 0.9 * weights, "the transformer was not streamed from the offload file"
    # Never the transformer: the peak is the ring (2 slots of the largest block, which on device="cpu"
    # is RAM too), one staging block, the tensors being read and the small components. Loading it
    # into RAM first (from_pretrained) would add at least the whole weights.
    assert got["growth"] < 0.75 * weights, f"peak RSS grew {got['growth'] / mib:.0f} MiB for {weights / mib:.0f} MiB"
    assert got["anon"] < 0.6 * weights
