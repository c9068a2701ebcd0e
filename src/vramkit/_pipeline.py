"""Inspecting a pipeline: is it a Flux pipeline, what are its model components, does it already
carry memory hooks from somewhere else. Read-only helpers; nothing here changes the pipeline."""

from __future__ import annotations

from typing import Any

import torch

from .errors import StrategyConflictError, UnsupportedPipelineError

# Model components a Flux pipeline may have, in the pipeline's own offload order.
OFFLOAD_ORDER = ("text_encoder", "text_encoder_2", "image_encoder", "transformer", "controlnet", "vae")


def check_flux_pipeline(pipe: Any) -> None:
    """Raise :class:`UnsupportedPipelineError` unless ``pipe`` is a diffusers Flux pipeline."""
    try:
        from diffusers import DiffusionPipeline
        from diffusers.models import FluxTransformer2DModel
    except ImportError as exc:  # pragma: no cover - diffusers is a hard dependency
        raise UnsupportedPipelineError(f"diffusers could not be imported: {exc}") from exc
    if not isinstance(pipe, DiffusionPipeline):
        raise UnsupportedPipelineError(
            f"vramkit works on diffusers Flux pipelines; got {type(pipe).__name__}. "
            "Pass a FluxPipeline (or FluxImg2Img/Inpaint/Fill/Kontext/ControlNet pipeline)."
        )
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, FluxTransformer2DModel):
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} is not a Flux pipeline (its transformer is "
            f"{type(transformer).__name__}); vramkit supports the Flux family only."
        )


def model_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's ``nn.Module`` components by name (tokenizers, schedulers left out)."""
    comps = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    # Keep the pipeline's offload order first, then any extra component.
    ordered = {n: comps[n] for n in OFFLOAD_ORDER if n in comps}
    ordered.update({n: c for n, c in comps.items() if n not in ordered})
    return ordered


def module_devices(module: torch.nn.Module) -> set[torch.device]:
    devices = {p.device for p in module.parameters()}
    devices |= {b.device for b in module.buffers()}
    return devices


def foreign_hooks(pipe: Any) -> list[str]:
    """Memory hooks on the pipeline that vramkit did not install (diffusers' or accelerate's own
    offloading, group offloading, layerwise casting): each described for an error message."""
    found: list[str] = []
    if getattr(pipe, "_all_hooks", None):
        found.append("enable_model_cpu_offload()")
    for name, comp in model_components(pipe).items():
        for sub_name, sub in comp.named_modules():
            hook = getattr(sub, "_hf_hook", None)
            if hook is not None and not getattr(hook, "_vramkit", False):
                found.append(f"an accelerate hook on {name}{'.' + sub_name if sub_name else ''} "
                             "(enable_sequential_cpu_offload / enable_model_cpu_offload / device_map)")
                break
        for sub_name, sub in comp.named_modules():
            registry = getattr(sub, "_diffusers_hook", None)
            if registry is None:
                continue
            owned = getattr(registry, "_vramkit_owned", ())
            names = [n for n in registry.hooks if not n.startswith("vramkit") and n not in owned]
            if names:
                found.append(f"diffusers hooks {names} on {name}{'.' + sub_name if sub_name else ''} "
                             "(enable_group_offload / enable_layerwise_casting / a cache hook)")
                break
    return found


def check_no_foreign_hooks(pipe: Any) -> None:
    found = foreign_hooks(pipe)
    if found:
        raise StrategyConflictError(
            "This pipeline already has memory hooks vramkit did not install: "
            + "; ".join(found)
            + ". vramkit must own the pipeline's placement: call pipe.remove_all_hooks() (or rebuild "
            "the pipeline without enable_*_offload / enable_layerwise_casting) and let vramkit plan it."
        )


def check_not_meta(pipe: Any) -> None:
    for name, comp in model_components(pipe).items():
        if any(d.type == "meta" for d in module_devices(comp)):
            raise UnsupportedPipelineError(
                f"{name} has weights on the meta device (built without weights). Load real weights "
                "first (e.g. from_pretrained), or use vramkit.plan(...) which only needs sizes."
            )


def snapshot(pipe: Any) -> dict[str, Any]:
    """Identity of every parameter/buffer tensor, device and dtype: compare two snapshots to prove a
    pipeline was left exactly as it was (same tensors, not merely equal values)."""
    snap: dict[str, Any] = {}
    for name, comp in model_components(pipe).items():
        for pname, p in comp.named_parameters():
            snap[f"{name}.{pname}"] = (p.data_ptr(), p.device, p.dtype, tuple(p.shape))
        for bname, b in comp.named_buffers():
            snap[f"{name}.{bname}"] = (b.data_ptr(), b.device, b.dtype, tuple(b.shape))
        snap[f"{name}.<forward>"] = "forward" in comp.__dict__
        snap[f"{name}.<hf_hook>"] = hasattr(comp, "_hf_hook")
    snap["<class>"] = type(pipe)
    snap["<encode_prompt>"] = "encode_prompt" in pipe.__dict__
    return snap
