"""``vramkit.load``: load a Flux pipeline from a local diffusers folder straight into a plan, without
first holding all its weights in host RAM (the 8 GB VRAM + 8-16 GB RAM case).

``pipe.from_pretrained(folder)`` reads every weight into RAM before anything can be offloaded; on a
machine with 16 GB of RAM and a 33 GB FLUX.1-dev that fails before vramkit gets a chance. Here:

1. ``model_index.json`` names the pipeline class (a diffusers Flux pipeline, else
   :class:`~vramkit.errors.UnsupportedPipelineError`);
2. the big components the engine can stream (``transformer``, ``controlnet``, ``text_encoder_2``)
   are built from their ``config.json`` on the meta device (no memory); the small ones (CLIP, VAE),
   tokenizers and the scheduler load normally from the folder, offline;
3. the planner plans for that pipeline from shapes alone, within ``vram``/``ram`` (as
   :func:`vramkit.optimize`);
4. each meta component is then filled from its safetensors file(s), one tensor at a time: streamed
   blocks go straight into the engine's host storage (with ``host="disk"``: packed block by block
   into a memory-mapped offload file, so RAM never holds the component), resident tensors straight
   to the GPU, and a component the plan does not stream is read onto the device its plan step puts
   it on (the GPU for ``Resident``, else the CPU).

``vramkit.restore(pipe)`` then undoes the plan like for any pipeline: streamed weights are copied
into CPU RAM (real tensors, the offload files deleted), components the plan kept whole on the GPU
stay there. That needs the RAM for the streamed weights: on a low-RAM machine, delete the pipeline
instead of restoring it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidRequestError, UnsupportedPipelineError
from .loading import _open as _open_safetensors
from .plan import Plan

__all__ = ["load", "SafetensorsSource", "STREAMABLE_AT_LOAD"]

logger = logging.getLogger("vramkit")

#: Components :func:`load` builds on the meta device and fills from disk per the plan.
STREAMABLE_AT_LOAD = ("transformer", "controlnet", "text_encoder_2")


def _safe_open(path: Path) -> Any:
    # The single-file loader's reader: pread, one tensor at a time, the file never mapped.
    return _open_safetensors(str(path))


class SafetensorsSource:
    """The tensors of one component folder's ``*.safetensors`` files (sharded or not), read one at
    a time by their name in ``module`` (a :class:`~vramkit.engine.streamer.TensorSource`).

    Tied parameters (T5's ``shared.weight`` is also ``encoder.embed_tokens.weight``) are found under
    whichever of their names the file has. ``dtype`` converts floating tensors as they are read.
    """

    def __init__(self, folder: Path, module: nn.Module, dtype: torch.dtype | None = None) -> None:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
            found = f" (found {others})" if others else ""
            raise InvalidRequestError(
                f"{folder} has no .safetensors weights{found}; vramkit.load reads safetensors only. Convert it "
                "with pipe.save_pretrained(folder, safe_serialization=True) on a machine with enough RAM."
            )
        self.folder = folder
        self.dtype = dtype
        self._handles = [_safe_open(f) for f in files]
        where: dict[str, int] = {}
        for i, handle in enumerate(self._handles):
            for key in handle.keys():
                where[key] = i
        # Every registered name of every tensor -> the name it has in the file.
        names: dict[int, list[str]] = {}
        for name, t in _named_tensors(module):
            names.setdefault(id(t), []).append(name)
        self._key: dict[str, tuple[int, str]] = {}
        missing = []
        for group in names.values():
            stored = next((n for n in group if n in where), None)
            if stored is None:
                missing.append(group[0])
                continue
            for n in group:
                self._key[n] = (where[stored], stored)
        self.missing = missing

    def file_dtype(self, name: str) -> torch.dtype | None:
        from .loading import _SAFETENSORS_DTYPES

        i, key = self._key[name]
        return _SAFETENSORS_DTYPES.get(str(self._handles[i].get_slice(key).get_dtype()))

    def __contains__(self, name: str) -> bool:
        return name in self._key

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        found = self._key.get(name)
        if found is None:
            raise InvalidRequestError(
                f"{name} is not in the safetensors files of {self.folder}; the folder does not match its "
                "config.json. Save it again with pipe.save_pretrained(folder)."
            )
        i, key = found
        t = self._handles[i].get_tensor(key)
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        if device.type == "cpu" and dtype == t.dtype and t.data_ptr() % 64 == 0:
            return t
        # A fresh allocation otherwise: a tensor read from the file may sit at any byte offset, and CPU
        # matmul kernels round differently on unaligned data (outputs would differ in the last bit).
        out = torch.empty(t.shape, dtype=dtype, device=device)
        out.copy_(t)
        return out


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))


def _index(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise InvalidRequestError(
            f"vramkit.load: {folder} is not a folder. Give the local folder written by pipe.save_pretrained(...) "
            "(it holds model_index.json); vramkit.load never downloads."
        )
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise InvalidRequestError(
            f"vramkit.load: {folder} has no model_index.json, so it is not a diffusers pipeline folder. Give the "
            "folder written by pipe.save_pretrained(...) (or a downloaded diffusers repository snapshot)."
        )
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequestError(f"vramkit.load: cannot read {index_path} ({exc}); save the pipeline again.") from None
    if not isinstance(index, dict):
        raise InvalidRequestError(f"vramkit.load: {index_path} is not a JSON object; save the pipeline again.")
    return index


def _pipeline_class(index: dict[str, Any], folder: Path) -> type:
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not name.startswith("Flux") or not isinstance(cls, type) or not name.endswith("Pipeline"):
        raise UnsupportedPipelineError(
            f"vramkit.load: {folder} holds a {name!r} pipeline; vramkit supports the diffusers Flux pipelines "
            "(FluxPipeline, FluxImg2ImgPipeline, FluxFillPipeline, FluxKontextPipeline, FluxControlNetPipeline, ...)."
        )
    return cls


def _meta_component(folder: Path, library: str, class_name: str, dtype: torch.dtype | None) -> nn.Module:
    """Build one component from its config on the meta device, in the dtypes it will be loaded in."""
    from accelerate import init_empty_weights

    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        with init_empty_weights():
            module = cls.from_config(cls.load_config(str(folder)))
    elif library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        config = cls.config_class.from_pretrained(str(folder))
        with init_empty_weights():
            module = cls(config)
        # from_pretrained ties shared weights (T5's embeddings) after building; do the same (outside
        # init_empty_weights, whose patched register_parameter would make a new tensor).
        tie = getattr(module, "tie_weights", None)
        if callable(tie):
            tie()
    else:
        raise UnsupportedPipelineError(f"vramkit.load: cannot build {class_name} from library {library!r}.")
    source = SafetensorsSource(folder, module, dtype)
    if source.missing:
        raise InvalidRequestError(
            f"vramkit.load: {folder} lacks {len(source.missing)} weight(s) of {class_name} (e.g. "
            f"{source.missing[:3]}); the safetensors files do not match config.json. Save the pipeline again."
        )
    _set_meta_dtypes(module, source, dtype)
    module.eval()
    module.__dict__["_vramkit_load_source"] = source
    return module


def _set_meta_dtypes(module: nn.Module, source: SafetensorsSource, dtype: torch.dtype | None) -> None:
    """Give each meta tensor the dtype it will have once read (the file's, or ``dtype`` for floats),
    so the plan is computed for the right sizes. Tied parameters stay one object."""
    done: dict[int, nn.Parameter] = {}
    for owner_name, owner in module.named_modules():
        for attr, p in list(owner._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            if id(p) in done:
                owner._parameters[attr] = done[id(p)]
                continue
            name = f"{owner_name}.{attr}" if owner_name else attr
            file_dtype = source.file_dtype(name) or p.dtype
            target = dtype if (dtype is not None and file_dtype.is_floating_point) else file_dtype
            new = nn.Parameter(torch.empty(p.shape, dtype=target, device="meta"), requires_grad=p.requires_grad)
            done[id(p)] = new
            owner._parameters[attr] = new


def _materialize(module: nn.Module, source: SafetensorsSource, device: torch.device) -> None:
    """Read every meta tensor of ``module`` from ``source`` onto ``device``, one at a time."""
    done: dict[int, torch.Tensor] = {}
    for owner_name, owner in module.named_modules():
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for attr, t in list(table.items()):
                if t is None or t.device.type != "meta":
                    continue
                if id(t) not in done:
                    name = f"{owner_name}.{attr}" if owner_name else attr
                    # The meta tensor's dtype is the one planned (a Precision step may have cast it).
                    value = source.get(name, device).to(t.dtype)
                    done[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
                table[attr] = done[id(t)]  # type: ignore[assignment]


def _step_device(step: Any) -> torch.device:
    from .strategies.offload import resolve_device

    return resolve_device(getattr(step.strategy, "device", None))


def load(
    folder: str | os.PathLike[str],
    *,
    vram: int | str | None = None,
    ram: int | str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    quality: str = "auto",
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    strategies: Sequence[Any] | None = None,
    **planner_kwargs: Any,
) -> Any:
    """Load the Flux pipeline saved in ``folder`` directly into the fastest plan that fits.

    Like ``FluxPipeline.from_pretrained(folder)`` followed by :func:`vramkit.optimize`, but the big
    components (transformer, ControlNet, T5) are never whole in host RAM: they are built on the meta
    device, planned for, then read from their safetensors files one tensor at a time straight into
    where the plan puts them. When the weights do not fit the RAM budget, the plan streams blocks
    from a memory-mapped offload file (``BlockStreaming(host="disk")``), so host RAM holds only
    reclaimable page cache. Everything is read from ``folder``; nothing is downloaded.

    - ``vram``, ``ram``, ``height``, ``width``, ``batch_size``, ``max_sequence_length``,
      ``quality``, ``device`` and other planner keywords (``bandwidth=``, ``disk_bandwidth=``,
      ``calibration=``): as :func:`vramkit.optimize`. With ``device="cpu"``, streaming steps run on
      the CPU (blocks from disk into CPU slots); without a GPU and without ``vram`` the plan is empty
      and the pipeline is simply loaded onto the CPU.
    - ``torch_dtype``: convert floating weights as they are read (default: as stored).
    - ``offload_folder``: where disk-streamed blocks (and the originals of fp8/int8 weights the plan
      keeps on disk) are written (default ``$VRAMKIT_OFFLOAD_DIR``, else ``offload/`` in vramkit's
      cache directory; a fast local SSD, not a tmpfs).
    - ``strategies``: apply exactly these instead of planning (as :func:`vramkit.optimize`).

    Returns the pipeline with the plan applied (``pipe.vramkit_plan``). :func:`vramkit.restore`
    undoes it: streamed weights come back as real tensors in CPU RAM (the offload files are deleted)
    and components the plan kept whole on the GPU stay there. OOM recovery is not installed (it
    would reload streamed weights into RAM).

    Raises :class:`~vramkit.errors.InvalidRequestError` for a missing folder, a folder without
    ``model_index.json`` or without safetensors weights, and
    :class:`~vramkit.errors.UnsupportedPipelineError` for a pipeline that is not a Flux pipeline.

    >>> import vramkit
    >>> pipe = vramkit.load("/models/FLUX.1-dev", vram="8GiB", ram="16GiB", torch_dtype=torch.bfloat16)
    >>> print(pipe.vramkit_plan.explain())
    >>> image = pipe("a cat", num_inference_steps=28).images[0]
    """
    from . import api

    folder = Path(folder)
    index = _index(folder)
    cls = _pipeline_class(index, folder)
    meta: dict[str, nn.Module] = {}
    for name in STREAMABLE_AT_LOAD:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            continue
        sub = folder / name
        if not sub.is_dir():
            raise InvalidRequestError(
                f"vramkit.load: model_index.json lists {name} but {sub} is missing; save the pipeline again."
            )
        meta[name] = _meta_component(sub, entry[0], entry[1], torch_dtype)
    extra: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        extra["torch_dtype"] = torch_dtype
    pipe = cls.from_pretrained(str(folder), **meta, **extra)
    try:
        plan = _choose_plan(
            pipe,
            strategies,
            device,
            offload_folder,
            dict(
                vram=vram,
                ram=ram,
                height=height,
                width=width,
                batch_size=batch_size,
                max_sequence_length=max_sequence_length,
                quality=quality,
                device=device,
                **planner_kwargs,
            ),
        )
        _fill(pipe, plan, meta)
        applied = api._apply(pipe, plan)
    except BaseException:
        for module in meta.values():
            _detach(module)
        raise
    for module in meta.values():
        _detach(module)
    logger.info("vramkit.load: %s from %s with %d step(s)", cls.__name__, folder, len(applied.steps))
    return pipe


def _choose_plan(
    pipe: Any,
    strategies: Sequence[Any] | None,
    device: str | None,
    offload_folder: str | os.PathLike[str] | None,
    request: dict[str, Any],
) -> Plan:
    from . import api
    from .planner import plan_pipeline

    if strategies is not None:
        the_plan = api.plan_from_strategies(pipe, strategies)
    else:
        # The plan's offload files go to offload_folder: its disk's free space is what bounds them.
        the_plan = api._per_component(pipe, plan_pipeline(pipe, offload_folder=offload_folder, **request))
    steps = []
    for step in the_plan.steps:
        strategy = step.strategy
        if strategy.name == "BlockStreaming":
            changes: dict[str, Any] = {}
            if device is not None and strategy.device is None:
                changes["device"] = device
            writes = strategy.host == "disk" or strategy.originals == "disk"
            if offload_folder is not None and writes and strategy.offload_folder is None:
                changes["offload_folder"] = os.fspath(offload_folder)
            if changes:
                strategy = dataclasses.replace(strategy, **changes)
                step = dataclasses.replace(step, strategy=strategy, reason=step.reason)
        steps.append(step)
    the_plan.steps = steps
    return the_plan


def _fill(pipe: Any, plan: Plan, meta: dict[str, nn.Module]) -> None:
    """Give every meta component its weights, or a source the streaming step reads them from."""
    from .strategies.streaming import attach_weight_source

    streamed = {s.component for s in plan.steps if s.strategy.name == "BlockStreaming" and s.strategy._effective()}
    resident = {s.component: s for s in plan.steps if s.strategy.name == "Resident" and s.component is not None}
    for name, module in meta.items():
        source: SafetensorsSource = module.__dict__["_vramkit_load_source"]
        if name in streamed:
            # BlockStreaming reads each block from the file into its host storage, and the rest of
            # the component straight onto the device.
            attach_weight_source(module, source)
            continue
        target = _step_device(resident[name]) if name in resident else torch.device("cpu")
        logger.info("vramkit.load: reading %s onto %s", name, target)
        _materialize(module, source, target)


def _detach(module: nn.Module) -> None:
    """Drop the load-time attributes (the streamer keeps its own reference to the source)."""
    from .strategies.streaming import attach_weight_source

    attach_weight_source(module, None)
    module.__dict__.pop("_vramkit_load_source", None)
