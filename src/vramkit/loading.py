"""Loading single-file FLUX finetunes without materializing full-precision weights first.

Community finetunes often ship as one ``.safetensors`` file whose weights are float8_e4m3fn
(majicflus-style) or bf16, in diffusers' key layout or the original BFL layout
(``double_blocks.0.img_attn.qkv.weight``, ...). :func:`load_transformer` builds the model on the
meta device (no memory), then reads the file one tensor at a time (``safetensors.safe_open`` with
``pread``, so the file is not mapped into the process) and puts each tensor into the model:

- ``storage="fp8"``: weights of the layers diffusers' layerwise casting stores in float8 stay
  float8 (converted one tensor at a time if the file is bf16); the rest (norms, ``proj_out``, ...)
  is converted to ``dtype``; then layerwise casting computes in ``dtype``. Peak memory is the fp8
  model plus one tensor. The result equals a model loaded in ``dtype`` and given vramkit's
  ``StoreFP8`` (same layers, same casts).
- ``storage="bf16"``: every tensor is converted to ``dtype`` (bf16 by default) on its own: the
  peak is the final model plus one tensor, never a second copy.

>>> transformer = vramkit.loading.load_transformer("majicflus.safetensors", storage="fp8")
>>> pipe = FluxPipeline.from_pretrained(..., transformer=transformer)  # or pipe.transformer = ...

No config is ever downloaded: the default is FLUX.1-dev's (``vramkit.memory.architectures``) with
depth, widths, input channels and the guidance embedding read from the file's shapes.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import InvalidRequestError, MissingDependencyError

logger = logging.getLogger("vramkit")

__all__ = ["STORAGES", "load_transformer", "convert_bfl_key", "is_bfl_layout", "infer_flux_config"]

#: The ``storage`` values :func:`load_transformer` accepts.
STORAGES = ("bf16", "fp8")

_BFL_PREFIX = "model.diffusion_model."
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# --------------------------------------------------------------------------------------------------
# The original BFL layout -> diffusers (the mapping of diffusers'
# ``convert_flux_transformer_checkpoint_to_diffusers``, one key at a time and for any width)
# --------------------------------------------------------------------------------------------------

_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
    (r"^time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
    (r"^vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
    (r"^vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
    (r"^guidance_in\.in_layer\.", "time_text_embed.guidance_embedder.linear_1."),
    (r"^guidance_in\.out_layer\.", "time_text_embed.guidance_embedder.linear_2."),
    (r"^txt_in\.", "context_embedder."),
    (r"^img_in\.", "x_embedder."),
    (r"^double_blocks\.(\d+)\.img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
    (r"^double_blocks\.(\d+)\.txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_q.weight"),
    (r"^double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_k.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_q.weight"),
    (r"^double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale$", r"transformer_blocks.\1.attn.norm_added_k.weight"),
    (r"^double_blocks\.(\d+)\.img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
    (r"^double_blocks\.(\d+)\.img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
    (r"^double_blocks\.(\d+)\.txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
    (r"^double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
    (r"^double_blocks\.(\d+)\.txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
    (r"^single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
    (r"^single_blocks\.(\d+)\.norm\.query_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_q.weight"),
    (r"^single_blocks\.(\d+)\.norm\.key_norm\.scale$", r"single_transformer_blocks.\1.attn.norm_k.weight"),
    (r"^single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
    (r"^final_layer\.linear\.", "proj_out."),
)
_DOUBLE_QKV = re.compile(r"^double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)$")
_SINGLE_LINEAR1 = re.compile(r"^single_blocks\.(\d+)\.linear1\.(weight|bias)$")
_FINAL_ADALN = re.compile(r"^final_layer\.adaLN_modulation\.1\.(weight|bias)$")
_BLOCK_INDEX = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def is_bfl_layout(keys: list[str] | set[str] | Any) -> bool:
    """True when the keys are in the original BFL layout (``double_blocks.*``, ``img_in.*``, ...),
    with or without the ``model.diffusion_model.`` prefix of all-in-one checkpoints."""
    for key in keys:
        key = key[len(_BFL_PREFIX) :] if key.startswith(_BFL_PREFIX) else key
        if key.startswith(("double_blocks.", "single_blocks.", "img_in.", "final_layer.")):
            return True
    return False


def _cat0(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(dim=0)`` that also works for float8 (concatenated as bytes)."""
    if tensors[0].dtype in _FP8_DTYPES:
        dtype = tensors[0].dtype
        return torch.cat([t.view(torch.uint8) for t in tensors], dim=0).view(dtype)
    return torch.cat(tensors, dim=0)


def convert_bfl_key(key: str, tensor: torch.Tensor, inner_dim: int) -> list[tuple[str, torch.Tensor]]:
    """The diffusers ``(name, tensor)`` pairs of one BFL checkpoint entry.

    ``inner_dim`` is the model width (``img_in.weight.shape[0]``); it splits the single blocks'
    fused ``linear1`` into ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. Split tensors are copies
    (no storage is shared between parameters). Unknown keys come back unchanged, so the caller's
    unexpected-key check names them.
    """
    if key.startswith(_BFL_PREFIX):
        key = key[len(_BFL_PREFIX) :]
    m = _DOUBLE_QKV.match(key)
    if m:
        index, stream, kind = m.groups()
        names = ("to_q", "to_k", "to_v") if stream == "img" else ("add_q_proj", "add_k_proj", "add_v_proj")
        parts = torch.chunk(tensor, 3, dim=0)
        return [(f"transformer_blocks.{index}.attn.{n}.{kind}", p.clone()) for n, p in zip(names, parts)]
    m = _SINGLE_LINEAR1.match(key)
    if m:
        index, kind = m.groups()
        mlp = tensor.shape[0] - 3 * inner_dim
        if mlp <= 0:
            raise InvalidRequestError(
                f"{key} has {tensor.shape[0]} rows, too few for three {inner_dim}-wide projections plus an MLP: "
                "the checkpoint does not match the model width."
            )
        pieces = torch.split(tensor, [inner_dim, inner_dim, inner_dim, mlp], dim=0)
        targets = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")
        return [(f"single_transformer_blocks.{index}.{n}.{kind}", p.clone()) for n, p in zip(targets, pieces)]
    m = _FINAL_ADALN.match(key)
    if m:
        # BFL's final norm modulation is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift).
        shift, scale = tensor.chunk(2, dim=0)
        return [(f"norm_out.linear.{m.group(1)}", _cat0([scale, shift]))]
    for pattern, replacement in _RENAMES:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return [(new, tensor)]
    return [(key, tensor)]


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def infer_flux_config(shapes: Mapping[str, tuple[int, ...]], base: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with every field the diffusers-layout ``shapes`` determine replaced by the file's
    values: depth, width, head size and count, input/output channels, text widths, guidance."""
    config = dict(base)

    def shape(name: str) -> tuple[int, ...] | None:
        return tuple(shapes[name]) if name in shapes else None

    x_embedder = shape("x_embedder.weight")
    if x_embedder is not None:
        config["in_channels"] = x_embedder[1] // (config.get("patch_size", 1) ** 2)
        inner = x_embedder[0]
        head = shape("transformer_blocks.0.attn.norm_q.weight") or shape(
            "single_transformer_blocks.0.attn.norm_q.weight"
        )
        if head is not None and head[0] and inner % head[0] == 0:
            config["attention_head_dim"] = head[0]
            config["num_attention_heads"] = inner // head[0]
    context = shape("context_embedder.weight")
    if context is not None:
        config["joint_attention_dim"] = context[1]
    pooled = shape("time_text_embed.text_embedder.linear_1.weight")
    if pooled is not None:
        config["pooled_projection_dim"] = pooled[1]
    proj_out = shape("proj_out.weight")
    if proj_out is not None:
        out = proj_out[0] // (config.get("patch_size", 1) ** 2)
        config["out_channels"] = None if out == config.get("in_channels") else out
    config["guidance_embeds"] = any(k.startswith("time_text_embed.guidance_embedder.") for k in shapes)
    counts = {"transformer_blocks": 0, "single_transformer_blocks": 0}
    for key in shapes:
        m = _BLOCK_INDEX.match(key)
        if m:
            counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
    config["num_layers"] = counts["transformer_blocks"]
    config["num_single_layers"] = counts["single_transformer_blocks"]
    axes = tuple(config.get("axes_dims_rope", ()))
    if axes and sum(axes) != config.get("attention_head_dim"):
        raise InvalidRequestError(
            f"The checkpoint's attention heads are {config.get('attention_head_dim')} wide but FLUX's rotary axes "
            f"{axes} sum to {sum(axes)}: pass config= with this model's axes_dims_rope."
        )
    return config


def _default_config() -> dict[str, Any]:
    try:
        from .memory.architectures import architecture_config
    except ImportError as exc:
        raise InvalidRequestError(
            "load_transformer needs config= (a dict, or a FluxTransformer2DModel's .config): "
            f"the built-in FLUX.1-dev config is not available here ({exc})."
        ) from exc
    _, config = architecture_config("flux-dev")
    return config


def _config_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "config") and isinstance(config.config, Mapping):
        config = config.config
    if not isinstance(config, Mapping):
        raise InvalidRequestError(
            f"config must be a dict or a FluxTransformer2DModel config, got {type(config).__name__}."
        )
    return {k: v for k, v in config.items() if not str(k).startswith("_")}


# --------------------------------------------------------------------------------------------------
# Which parameters layerwise casting stores in float8
# --------------------------------------------------------------------------------------------------


def _layerwise_cast_modules(model: torch.nn.Module) -> set[str]:
    """Names of the modules ``apply_layerwise_casting(model, skip_modules_pattern="auto")`` hooks
    (the walk of diffusers' ``_apply_layerwise_casting``), i.e. whose weights StoreFP8 keeps in fp8."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    found: set[str] = set()

    def walk(module: torch.nn.Module, prefix: str) -> None:
        if any(re.search(p, prefix) for p in DEFAULT_SKIP_MODULES_PATTERN):
            return
        if isinstance(module, _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            found.add(prefix)
            return
        for name, child in module.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(model, "")
    return found


def _apply_fp8_casting(model: torch.nn.Module, storage: torch.dtype, compute: torch.dtype) -> None:
    """diffusers' layerwise casting exactly as ``StoreFP8`` applies it, hooks marked vramkit's; then
    any float8 tensor outside a cast layer (it could not run) is converted to ``compute``."""
    from diffusers.hooks import apply_layerwise_casting

    apply_layerwise_casting(model, storage_dtype=storage, compute_dtype=compute, skip_modules_pattern="auto")
    for sub in model.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and "layerwise_casting" in registry.hooks:
            registry._vramkit_owned = {"layerwise_casting"}
    for sub in model.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and "layerwise_casting" in registry.hooks:
            continue
        for name, p in list(sub._parameters.items()):
            if p is not None and p.dtype in _FP8_DTYPES:
                sub._parameters[name] = torch.nn.Parameter(p.data.to(compute), requires_grad=p.requires_grad)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _open(path: str) -> Any:
    from safetensors import safe_open

    try:
        # pread: each tensor is read into its own memory; the file is never mapped into the process,
        # so its pages do not count towards (or linger in) the process's resident memory.
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8 has no backend argument
        return safe_open(path, framework="pt")


def _header(handle: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    out: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for key in handle.keys():
        sl = handle.get_slice(key)
        out[key] = (tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(str(sl.get_dtype())))
    return out


def _diffusers_shapes(
    header: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]], bfl: bool, inner_dim: int
) -> dict[str, tuple[int, ...]]:
    """Shapes of the diffusers parameters the file provides (BFL entries converted on meta tensors)."""
    if not bfl:
        return {k: shape for k, (shape, _) in header.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (shape, _) in header.items():
        for name, t in convert_bfl_key(key, torch.empty(shape, device="meta"), inner_dim):
            shapes[name] = tuple(t.shape)
    return shapes


def _iter_tensors(handle: Any, keys: list[str], bfl: bool, inner_dim: int) -> Iterator[tuple[str, torch.Tensor]]:
    for key in keys:
        tensor = handle.get_tensor(key)
        if bfl:
            yield from convert_bfl_key(key, tensor, inner_dim)
        else:
            yield key, tensor
        del tensor


def load_transformer(
    path: str | os.PathLike[str],
    *,
    storage: str = "bf16",
    config: Mapping[str, Any] | Any | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
) -> Any:
    """Load a FLUX transformer from one safetensors file, one tensor at a time.

    Args:
        path: the ``.safetensors`` file: diffusers key layout, or the original BFL layout (also
            with the ``model.diffusion_model.`` prefix of all-in-one checkpoints, whose other
            entries, VAE and text encoders, are ignored). Weights may be float8 or any float dtype.
        storage: ``"fp8"`` keeps the weights of the layers fp8 storage covers in float8 (the file's
            fp8 dtype, else float8_e4m3fn) and computes in ``dtype`` through diffusers' layerwise
            casting (hooks marked as vramkit's, as ``StoreFP8`` does); ``"bf16"`` converts every
            tensor to ``dtype``.
        config: the model config (a dict, or a FluxTransformer2DModel's ``config``). Default:
            FLUX.1-dev's, with depth, widths, channels and guidance read from the file's shapes.
        dtype: the compute dtype (``"fp8"``) or storage dtype (``"bf16"``): bf16, fp16 or fp32.
        device: where the tensors go, each as it is read (a CUDA device loads straight to the GPU).

    Returns:
        The ``FluxTransformer2DModel`` in eval mode.

    Raises:
        InvalidRequestError: bad arguments, or the file does not match the config (missing,
            unexpected or differently shaped tensors; the message names them).
        MissingDependencyError: safetensors is not installed.
    """
    if storage not in STORAGES:
        raise InvalidRequestError(f"load_transformer(storage={storage!r}): use one of {STORAGES}.")
    if dtype not in _COMPUTE_DTYPES:
        raise InvalidRequestError(
            f"load_transformer(dtype={dtype}): use torch.bfloat16, torch.float16 or torch.float32."
        )
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidRequestError(f"load_transformer: no such file {path!r}.")
    try:
        import safetensors  # noqa: F401
    except ImportError as exc:  # pragma: no cover - diffusers depends on safetensors
        raise MissingDependencyError("load_transformer needs safetensors: pip install safetensors") from exc
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    device = torch.device(device)
    with _open(path) as handle:
        header = _header(handle)
        keys = list(header)
        bfl = is_bfl_layout(keys)
        if bfl and any(k.startswith(_BFL_PREFIX) for k in keys):
            keys = [k for k in keys if k.startswith(_BFL_PREFIX)]
            header = {k: header[k] for k in keys}
        inner_dim = 0
        if bfl:
            img_in = header.get(_BFL_PREFIX + "img_in.weight") or header.get("img_in.weight")
            if img_in is None:
                raise InvalidRequestError(
                    f"{path}: BFL-layout checkpoint without img_in.weight; cannot tell its width."
                )
            inner_dim = img_in[0][0]
        shapes = _diffusers_shapes(header, bfl, inner_dim)
        if config is None:
            model_config = infer_flux_config(shapes, _default_config())
        else:
            model_config = _config_dict(config)
        fp8_types = {d for _, d in header.values() if d in _FP8_DTYPES}
        storage_dtype = fp8_types.pop() if len(fp8_types) == 1 else torch.float8_e4m3fn

        with init_empty_weights():
            model = FluxTransformer2DModel.from_config(model_config)
        expected = dict(model.named_parameters())
        expected_buffers = dict(model.named_buffers())
        cast_modules = _layerwise_cast_modules(model) if storage == "fp8" else set()
        _check_keys(path, shapes, expected, expected_buffers)

        nbytes = 0
        for name, tensor in _iter_tensors(handle, keys, bfl, inner_dim):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if tensor.is_floating_point():
                target = storage_dtype if module_name in cast_modules else dtype
                tensor = tensor.to(device).to(target) if tensor.dtype in _FP8_DTYPES else tensor.to(device, target)
            else:
                tensor = tensor.to(device)
            if attr in module._parameters:
                old = module._parameters[attr]
                module._parameters[attr] = torch.nn.Parameter(
                    tensor, requires_grad=bool(old is not None and old.requires_grad)
                )
            else:
                module._buffers[attr] = tensor
            nbytes += tensor.numel() * tensor.element_size()
            del tensor
    model.eval()
    if storage == "fp8":
        _apply_fp8_casting(model, storage_dtype, dtype)
    logger.info(
        "load_transformer: %s (%s layout) loaded as %s storage (%.1f MiB), computing in %s on %s",
        path,
        "BFL" if bfl else "diffusers",
        storage,
        nbytes / 2**20,
        dtype,
        device,
    )
    return model


def _check_keys(
    path: str,
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, torch.Tensor],
    buffers: Mapping[str, torch.Tensor],
) -> None:
    """Refuse a file that does not fit the model before anything is read: every parameter must be
    provided with its shape, and nothing else."""
    wanted = {**{k: tuple(t.shape) for k, t in buffers.items()}, **{k: tuple(t.shape) for k, t in expected.items()}}
    missing = sorted(k for k in expected if k not in shapes)
    unexpected = sorted(k for k in shapes if k not in wanted)
    mismatched = sorted(
        f"{k}: file {shapes[k]}, model {wanted[k]}" for k in shapes if k in wanted and tuple(shapes[k]) != wanted[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape (e.g. {'; '.join(mismatched[:3])})")
    if problems:
        raise InvalidRequestError(
            f"{path} does not fit this FluxTransformer2DModel config: tensors "
            + ", ".join(problems)
            + ". Pass config= of the model this file was saved from (or leave config out to read it from the file)."
        )
