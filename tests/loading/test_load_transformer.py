"""``vramkit.loading.load_transformer``: single-file FLUX checkpoints (fp8 or bf16, diffusers or BFL
layout) loaded one tensor at a time, with the same output as loading them the ordinary way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vramkit
from vramkit import lora
from vramkit._pipeline import foreign_hooks
from vramkit.errors import InvalidRequestError
from vramkit.loading import convert_bfl_key, infer_flux_config, is_bfl_layout, load_transformer
from vramkit.strategies import ModelOffload, StoreFP8
from vramkit.testing import tiny_pipeline
from vramkit.testing._components import tiny_transformer
from vramkit.testing.checks import run_tiny

FP8 = torch.float8_e4m3fn


def _fp8able(name: str, tensor: torch.Tensor) -> bool:
    """Weights a majicflus-style checkpoint stores in fp8: matrices, not norms or embedders."""
    return tensor.ndim == 2 and not any(s in name for s in ("norm", "embed"))


def _finetune_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.to(FP8) if _fp8able(k, v) else v.to(torch.bfloat16)) for k, v in model.state_dict().items()}


def _config(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_fp8_file(tmp_path_factory) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """The tiny pipeline's transformer saved as an fp8 finetune (diffusers layout)."""
    model = tiny_transformer(0)
    state = _finetune_state_dict(model)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-fp8.safetensors"
    save_file(state, str(path))
    return path, _config(model), state


def _ordinary(config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, fp8: bool = False):
    """The ordinary way: build the model, load_state_dict of the upcast tensors (+ fp8 storage)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.hooks import apply_layerwise_casting

    model = FluxTransformer2DModel(**config).eval()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    model.to(dtype)
    if fp8:
        apply_layerwise_casting(model, storage_dtype=FP8, compute_dtype=dtype, skip_modules_pattern="auto")
    return model


def _forward(model, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
    )
    inputs = {k: v.to(dtype) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**inputs, img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3)).sample


# --- fp8 and bf16 storage --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_storage_keeps_fp8_and_equals_ordinary_loading_plus_fp8_casting(tiny_fp8_file, dtype):
    path, config, state = tiny_fp8_file
    model = load_transformer(path, storage="fp8", config=config, dtype=dtype)
    q = model.transformer_blocks[0].attn.to_q
    assert q.weight.dtype == FP8 and q.bias.dtype == FP8  # cast layers are stored whole in fp8
    assert torch.equal(q.weight.view(torch.uint8), state["transformer_blocks.0.attn.to_q.weight"].view(torch.uint8))
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == dtype
    assert model.proj_out.weight.dtype == dtype  # skipped by fp8 storage, as StoreFP8 does
    assert model.dtype == dtype and not model.training
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    registry = q._diffusers_hook
    assert registry._vramkit_owned == {"layerwise_casting"}
    reference = _ordinary(config, state, dtype, fp8=True)
    assert torch.equal(_forward(model, dtype), _forward(reference, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_bf16_storage_equals_load_state_dict_of_upcast_tensors(tiny_fp8_file, dtype):
    path, config, state = tiny_fp8_file
    model = load_transformer(path, storage="bf16", config=config, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert not hasattr(model.transformer_blocks[0].attn.to_q, "_diffusers_hook")
    reference = _ordinary(config, state, dtype)
    for (name, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(p, r), name
    assert torch.equal(_forward(model, dtype), _forward(reference, dtype))


def test_a_bf16_file_can_be_stored_in_fp8(tmp_path):
    model = tiny_transformer(0)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / "bf16.safetensors"
    save_file(state, str(path))
    loaded = load_transformer(path, storage="fp8", config=_config(model))
    assert loaded.transformer_blocks[0].ff.net[2].weight.dtype == FP8
    reference = _ordinary(_config(model), state, torch.bfloat16, fp8=True)
    assert torch.equal(_forward(loaded, torch.bfloat16), _forward(reference, torch.bfloat16))


# --- the original BFL layout ---------------------------------------------------------------------


def _to_bfl(state: dict[str, torch.Tensor], num_layers: int, num_single: int) -> dict[str, torch.Tensor]:
    """diffusers -> BFL layout, written independently of vramkit.loading (its inverse)."""
    s = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(src: str, dst: str) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in s:
                out[f"{dst}.{kind}"] = s.pop(f"{src}.{kind}")

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.view(torch.uint8) for p in parts]).view(parts[0].dtype)

    for src, dst in (
        ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
        ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
        ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
        ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
        ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
        ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
        ("context_embedder", "txt_in"),
        ("x_embedder", "img_in"),
        ("proj_out", "final_layer.linear"),
    ):
        take(src, dst)
    for kind in ("weight", "bias"):
        scale, shift = s.pop(f"norm_out.linear.{kind}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{kind}"] = cat([shift, scale])
    for i in range(num_layers):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.img_attn.qkv.{kind}"] = cat([s.pop(f"{d}.attn.to_{x}.{kind}") for x in "qkv"])
            out[f"{b}.txt_attn.qkv.{kind}"] = cat([s.pop(f"{d}.attn.add_{x}_proj.{kind}") for x in "qkv"])
        for src, dst in (
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ):
            out[f"{b}.{dst}.scale"] = s.pop(f"{d}.attn.{src}.weight")
        for src, dst in (
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
        ):
            take(f"{d}.{src}", f"{b}.{dst}")
    for i in range(num_single):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for kind in ("weight", "bias"):
            parts = [s.pop(f"{d}.attn.to_{x}.{kind}") for x in "qkv"] + [s.pop(f"{d}.proj_mlp.{kind}")]
            out[f"{b}.linear1.{kind}"] = cat(parts)
        out[f"{b}.norm.query_norm.scale"] = s.pop(f"{d}.attn.norm_q.weight")
        out[f"{b}.norm.key_norm.scale"] = s.pop(f"{d}.attn.norm_k.weight")
        take(f"{d}.norm.linear", f"{b}.modulation.lin")
        take(f"{d}.proj_out", f"{b}.linear2")
    assert not s, f"unmapped: {sorted(s)}"
    return out


def test_bfl_layout_all_in_one_checkpoint_loads_like_the_diffusers_layout(tiny_fp8_file, tmp_path):
    path, config, state = tiny_fp8_file
    bfl = _to_bfl(state, config["num_layers"], config["num_single_layers"])
    assert is_bfl_layout(bfl) and not is_bfl_layout(state)
    # An all-in-one file: the transformer under model.diffusion_model., plus VAE and text encoder entries.
    allinone = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    allinone["vae.decoder.conv_in.weight"] = torch.zeros(2, 2)
    allinone["text_encoders.clip_l.transformer.dummy"] = torch.zeros(3)
    bfl_path = tmp_path / "bfl.safetensors"
    save_file(allinone, str(bfl_path))
    for storage in ("fp8", "bf16"):
        from_bfl = load_transformer(bfl_path, storage=storage, config=config)
        from_diffusers = load_transformer(path, storage=storage, config=config)
        for (name, a), (_, b) in zip(from_bfl.named_parameters(), from_diffusers.named_parameters()):
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name
        assert torch.equal(_forward(from_bfl, torch.bfloat16), _forward(from_diffusers, torch.bfloat16))


def test_bfl_key_conversion_equals_diffusers_converter():
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hardcodes FLUX.1's width (3072);
    give both converters a checkpoint with FLUX.1's row counts and tiny input widths."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    inner, mlp = 3072, 12288
    model = tiny_transformer(0)
    bfl = _to_bfl(model.state_dict(), 2, 4)
    g = torch.Generator().manual_seed(0)
    fake = {}
    for key, value in bfl.items():
        if ".linear1." in key:
            shape = (3 * inner + mlp,) + ((2,) if value.ndim == 2 else ())
        else:
            shape = tuple(value.shape)
        fake[key] = torch.randn(shape, generator=g)
    expected = convert_flux_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in fake.items()}
    )
    ours = {}
    for key, value in fake.items():
        for name, tensor in convert_bfl_key(f"model.diffusion_model.{key}", value, inner):
            assert name not in ours
            ours[name] = tensor
    assert sorted(ours) == sorted(expected)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name
    # Split parts are copies, never views sharing one storage.
    q = ours["single_transformer_blocks.0.attn.to_q.weight"]
    k = ours["single_transformer_blocks.0.attn.to_k.weight"]
    assert q.untyped_storage().data_ptr() != k.untyped_storage().data_ptr()


# --- config ---------------------------------------------------------------------------------------


def test_config_is_read_from_the_file_when_not_given(tmp_path):
    """With config=None the FLUX.1-dev config is used with every shape the file determines."""
    from diffusers import FluxTransformer2DModel

    config = dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=1,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=False,
        axes_dims_rope=(16, 56, 56),
    )
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**config)
    path = tmp_path / "small.safetensors"
    save_file(_finetune_state_dict(model), str(path))
    loaded = load_transformer(path, storage="fp8")
    for key, value in config.items():
        assert tuple(loaded.config[key]) == value if isinstance(value, tuple) else loaded.config[key] == value, key
    # Same answer from the BFL layout's shapes.
    bfl_path = tmp_path / "small-bfl.safetensors"
    save_file(_to_bfl(_finetune_state_dict(model), 1, 2), str(bfl_path))
    assert load_transformer(bfl_path, storage="bf16").config == loaded.config


def test_infer_flux_config_refuses_heads_the_rotary_axes_do_not_fit():
    shapes = {"x_embedder.weight": (32, 64), "transformer_blocks.0.attn.norm_q.weight": (16,)}
    with pytest.raises(InvalidRequestError, match="axes_dims_rope"):
        infer_flux_config(shapes, {"axes_dims_rope": (16, 56, 56), "patch_size": 1})


# --- errors ----------------------------------------------------------------------------------------


def test_a_file_that_does_not_fit_the_config_is_refused_naming_the_tensors(tiny_fp8_file, tmp_path):
    path, config, state = tiny_fp8_file
    with pytest.raises(InvalidRequestError, match=r"missing .*single_transformer_blocks\.4"):
        load_transformer(path, config={**config, "num_single_layers": 5})
    with pytest.raises(InvalidRequestError, match=r"unexpected .*single_transformer_blocks\.3"):
        load_transformer(path, config={**config, "num_single_layers": 3})
    with pytest.raises(InvalidRequestError, match="another shape"):
        load_transformer(path, config={**config, "joint_attention_dim": 48})
    partial = {k: v for k, v in state.items() if k != "proj_out.bias"}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(InvalidRequestError, match=r"1 missing \(e\.g\. proj_out\.bias\)"):
        load_transformer(tmp_path / "partial.safetensors", config=config)


def test_bad_arguments_are_refused(tiny_fp8_file, tmp_path):
    path, config, _ = tiny_fp8_file
    with pytest.raises(InvalidRequestError, match="storage"):
        load_transformer(path, storage="int8", config=config)
    with pytest.raises(InvalidRequestError, match="dtype"):
        load_transformer(path, config=config, dtype=torch.int8)
    with pytest.raises(InvalidRequestError, match="no such file"):
        load_transformer(tmp_path / "nope.safetensors", config=config)
    with pytest.raises(InvalidRequestError, match="config must be"):
        load_transformer(path, config=[1, 2])


# --- in a pipeline ---------------------------------------------------------------------------------


def test_pipeline_with_the_loaded_fp8_transformer_equals_store_fp8(tiny_fp8_file, reference_outputs):
    """A pipeline whose transformer was loaded fp8 gives exactly what loading it in full precision
    and applying vramkit's StoreFP8 gives; vramkit sees the fp8 hooks as its own; LoRA works."""
    path, config, _ = tiny_fp8_file
    pipe = tiny_pipeline("flux")
    pipe.transformer = load_transformer(path, storage="fp8", config=config, dtype=torch.float32)
    other = tiny_pipeline("flux")
    other.transformer = load_transformer(path, storage="bf16", config=config, dtype=torch.float32)
    vramkit.optimize(other, strategies=[StoreFP8(components=("transformer",))])
    out = run_tiny(pipe, "flux")
    assert torch.equal(out, run_tiny(other, "flux"))
    diff = (out - reference_outputs["flux"]).abs().max().item()
    assert 0 < diff <= 0.06  # the finetune file itself is fp8: StoreFP8's tolerance

    assert foreign_hooks(pipe) == []
    vramkit.optimize(pipe, strategies=[ModelOffload(device="cpu")])
    assert torch.equal(run_tiny(pipe, "flux"), out)
    vramkit.restore(pipe)
    assert torch.equal(run_tiny(pipe, "flux"), out)

    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    donor = tiny_transformer(0)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]), donor, adapter_name="x")
    g = torch.Generator().manual_seed(5)
    sd = {
        f"transformer.{k}": (torch.randn(v.shape, generator=g) if "lora_B" in k else v.detach().clone())
        for k, v in get_peft_model_state_dict(donor, adapter_name="x").items()
    }
    lora.load_lora_weights(pipe, sd, adapter_name="a")
    lora.load_lora_weights(other, sd, adapter_name="a")
    assert pipe.transformer.transformer_blocks[0].attn.to_q.lora_A["a"].weight.dtype == torch.float32
    with_lora = run_tiny(pipe, "flux")
    assert torch.equal(with_lora, run_tiny(other, "flux"))
    assert not torch.equal(with_lora, out)
    lora.fuse_lora(pipe)
    lora.fuse_lora(other)
    assert torch.equal(run_tiny(pipe, "flux"), run_tiny(other, "flux"))


# --- memory ----------------------------------------------------------------------------------------

# Synthetic FLUX-shaped transformer of about 71M parameters: 136 MiB in bf16, 88 MiB as an fp8 file.
_BIG_CONFIG = dict(
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
import torch
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out
import accelerate, diffusers, safetensors.torch  # noqa: F401  (imports are not what is measured)
from diffusers import FluxTransformer2DModel
import diffusers.hooks
from vramkit.loading import load_transformer
mode, path, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current resident size
before = status()["VmRSS"]
if mode == "ordinary":
    model = FluxTransformer2DModel(**config).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in safetensors.torch.load_file(path).items()})
else:
    model = load_transformer(path, storage=mode, config=config)
print(json.dumps({"growth": status()["VmHWM"] - before, "params": sum(p.numel() for p in model.parameters())}))
"""


def _peak_growth(mode: str, path: Path) -> dict:
    env = dict(os.environ)
    src = str(Path(vramkit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path), json.dumps(_BIG_CONFIG)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's resettable peak RSS")
def test_fp8_loading_peak_memory_stays_below_the_bf16_size(tmp_path, record_property):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        meta = FluxTransformer2DModel(**_BIG_CONFIG)
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, p in meta.named_parameters():
        value = torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.02
        state[name] = value.to(FP8) if _fp8able(name, value) else value
    path = tmp_path / "big-fp8.safetensors"
    save_file(state, str(path))
    params = sum(v.numel() for v in state.values())
    bf16_bytes = 2 * params
    file_bytes = path.stat().st_size
    del state

    fp8 = _peak_growth("fp8", path)
    assert fp8["params"] == params
    mib = 2**20
    record_property(
        "rss", {"bf16_MiB": bf16_bytes / mib, "file_MiB": file_bytes / mib, "fp8_growth_MiB": fp8["growth"] / mib}
    )
    print(
        f"bf16 size {bf16_bytes / mib:.0f} MiB, fp8 file {file_bytes / mib:.0f} MiB, "
        f"peak RSS growth loading fp8: {fp8['growth'] / mib:.0f} MiB"
    )
    assert fp8["growth"] < bf16_bytes, (
        f"loading the fp8 file grew the peak RSS by {fp8['growth'] / mib:.0f} MiB, not below the "
        f"bf16 size {bf16_bytes / mib:.0f} MiB"
    )
    # Not a second copy either: the file's bytes plus allocator slack.
    assert fp8["growth"] < file_bytes * 1.3
