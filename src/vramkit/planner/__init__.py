"""The planner: the fastest plan that fits a memory budget, as a pure function of sizes, request and
budget (:func:`plan_for`), and for a loaded pipeline without changing it (:func:`plan_pipeline`).

>>> from vramkit.planner import plan_for, spec_from_model, Request, Budget
>>> plan = plan_for(spec_from_model("flux-dev"), Request(1024, 1024), Budget(8 << 30, 64 << 30, 32 << 30, 25e9))

The cost model (see :mod:`vramkit.planner.search`): every stage's peak VRAM is what stays on the GPU
plus that stage's weights in flight plus its activations, padded for the allocator; a step takes
``smooth_max(compute, streamed bytes / bandwidth)``; one-off moves run at pageable speed. Constants
come from :class:`~vramkit.memory.calibration.Calibration`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from ..errors import InvalidBudgetError, InvalidRequestError
from ..memory.budget import device_key, format_bytes, parse_bandwidth, parse_budget, parse_device_budgets
from ..memory.calibration import Calibration
from ..memory.probe import PINNED_FRACTION, DeviceProbe, offload_free_bytes, probe
from ..plan import Plan
from .search import QUALITIES, search
from .spec import Budget, ComponentSpec, PipelineSpec, Request, spec_from_model, spec_from_modules, validate_size

__all__ = [
    "plan_for",
    "plan_pipeline",
    "budget_for",
    "budget_for_devices",
    "probe_devices",
    "default_vram_margin",
    "spec_from_model",
    "spec_from_modules",
    "spec_from_pipeline",
    "PipelineSpec",
    "ComponentSpec",
    "Request",
    "Budget",
    "QUALITIES",
]

logger = logging.getLogger("vramkit")

_MiB = 1024**2


def default_vram_margin(free_vram: int) -> int:
    """VRAM left unplanned when the budget is what the probe finds free: 512 MiB or 3% of what is
    free, whichever is larger (other processes, the CUDA context growing, fragmentation). A share of
    the free memory, not of the device: on a large card with 8 GiB free, 3% of the card (4 GiB on
    an H200) would throw away half of the budget (measured: it pushed an 8 GiB plan to sequential
    offload)."""
    return max(512 * _MiB, int(0.03 * free_vram))


def budget_for(
    found: DeviceProbe,
    *,
    vram: int | str | None = None,
    ram: int | str | None = None,
    bandwidth: float | str | None = None,
    extra_ram: int = 0,
    extra_vram: int = 0,
    disk_bandwidth: float | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    extra_disk: int = 0,
) -> tuple[Budget, list[str]]:
    """The :class:`Budget` for a probe and optional explicit ``vram``/``ram``/``bandwidth``.

    Defaults: VRAM = free on the device plus ``extra_vram`` (what the pipeline to plan already holds
    there: the plan places it anew) minus :func:`default_vram_margin`; RAM = available host RAM plus
    ``extra_ram`` (memory this process already holds that the plan accounts for, such as the
    pipeline's weights in host RAM); pinnable = 55% of the RAM budget; bandwidth = the probe's;
    ``disk_bandwidth`` (read + copy rate of blocks streamed from an offload file) = the calibration's
    assumed default unless given; free disk space in the offload folder (``offload_folder``, default
    the probe's default folder) when the probe has a GPU (a probe without one stands for this machine
    while the plan is for another), plus ``extra_disk`` (offload files the pipeline to plan already
    holds on that disk: they are deleted before the new plan writes its own).
    """
    notes: list[str] = []
    if vram is None:
        usable = found.free_vram + max(0, int(extra_vram))
        margin = default_vram_margin(usable)
        vram_b = usable - margin
        held = f" + {format_bytes(extra_vram)} the pipeline holds there" if extra_vram > 0 else ""
        notes.append(
            f"VRAM budget: {format_bytes(found.free_vram)} free on {found.name}{held} minus a "
            f"{format_bytes(margin)} margin = {format_bytes(vram_b)}"
        )
        if vram_b <= 0:
            raise InvalidBudgetError(
                f"only {format_bytes(found.free_vram)} is free on {found.name}, less than the "
                f"{format_bytes(margin)} margin; free memory or pass vram= explicitly."
            )
    else:
        vram_b = parse_budget(vram, total=found.total_vram or None, what="vram")
        if found.total_vram and vram_b > found.total_vram:
            raise InvalidBudgetError(
                f"vram={vram!r} is more than the {format_bytes(found.total_vram)} of {found.name}; a plan for "
                "it would run out of memory. Give at most the device's size (or a share like '90%'), or plan "
                "for another card without a GPU in this process (vramkit plan --vram ...)."
            )
        notes.append(f"VRAM budget: {format_bytes(vram_b)} (given)")
    if ram is None:
        ram_b = found.ram_available + max(0, int(extra_ram))
        notes.append(
            f"RAM budget: {format_bytes(found.ram_available)} available"
            + (f" + {format_bytes(extra_ram)} this process holds" if extra_ram else "")
            + f" = {format_bytes(ram_b)}"
        )
    else:
        ram_b = parse_budget(ram, total=found.ram_total or None, what="ram")
        notes.append(f"RAM budget: {format_bytes(ram_b)} (given)")
    pinned = int(ram_b * PINNED_FRACTION)
    if bandwidth is None:
        bw, source = found.h2d_bandwidth, found.bandwidth_source
    else:
        bw, source = parse_bandwidth(bandwidth), "given"
    notes.append(
        f"pinnable host RAM {format_bytes(pinned)} ({PINNED_FRACTION:.0%} of the RAM budget); "
        f"host-to-device bandwidth {bw / 1e9:.1f} GB/s ({source})"
    )
    disk_bw = None if disk_bandwidth is None else parse_bandwidth(disk_bandwidth)
    if disk_bw is not None:
        notes.append(f"disk read + copy bandwidth {disk_bw / 1e9:.1f} GB/s (given)")
    device = found.device.split(":")[0] if found.is_gpu else "cuda"
    disk_free = None
    if found.is_gpu:
        disk_free = found.offload_free if offload_folder is None else offload_free_bytes(offload_folder)
    if disk_free is not None:
        where = f" ({os.fspath(offload_folder)})" if offload_folder is not None else ""
        note = f"offload folder{where}: {format_bytes(disk_free)} free on its disk"
        if extra_disk > 0:
            note += f" + {format_bytes(extra_disk)} in the pipeline's own offload files (replaced by the plan)"
            disk_free += int(extra_disk)
        notes.append(note)
    budget = Budget(
        vram=vram_b,
        ram=ram_b,
        pinned=pinned,
        bandwidth=bw,
        device=device,
        bandwidth_source=source,
        disk_bandwidth=disk_bw,
        disk_free=disk_free,
    )
    return budget, notes


def probe_devices(*, measure_bandwidth: bool = True) -> list[DeviceProbe]:
    """A :func:`~vramkit.memory.probe.probe` of every visible CUDA device (empty without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [probe(f"cuda:{i}", measure_bandwidth=measure_bandwidth) for i in range(torch.cuda.device_count())]


def budget_for_devices(
    probes: list[DeviceProbe],
    *,
    vram: Mapping[Any, int | str] | None = None,
    ram: int | str | None = None,
    bandwidth: float | str | None = None,
    extra_ram: int = 0,
    extra_vram: Mapping[str, int] | None = None,
    visible: int | None = None,
    host: DeviceProbe | None = None,
    disk_bandwidth: float | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    extra_disk: int = 0,
) -> tuple[Budget, list[str]]:
    """The :class:`Budget` for several devices: ``vram`` maps devices to budgets (``{"cuda:0":
    "12GiB", 1: "80%"}``); without it, every probed device gives what is free on it (plus what the
    pipeline holds there, ``extra_vram``) minus :func:`default_vram_margin`. ``probes`` are the
    devices of this machine (empty when planning for another one, then ``visible`` is ``None`` and
    any ``cuda:N`` is accepted). RAM and pinned memory are the host's (``host``: the probe to read
    them from when ``probes`` has none of the named devices); the bandwidth is the slowest link."""
    by_name = {p.device: p for p in probes}
    notes: list[str] = []
    if vram is None:
        if not probes:
            raise InvalidBudgetError("no CUDA device here to plan across; pass vram={'cuda:0': '12GiB', ...}.")
        per: dict[str, int] = {}
        for p in probes:
            held = int((extra_vram or {}).get(p.device, 0))
            usable = p.free_vram + max(0, held)
            margin = default_vram_margin(usable)
            per[p.device] = usable - margin
            notes.append(
                f"VRAM budget on {p.device}: {format_bytes(p.free_vram)} free on {p.name}"
                + (f" + {format_bytes(held)} the pipeline holds there" if held > 0 else "")
                + f" minus a {format_bytes(margin)} margin = {format_bytes(per[p.device])}"
            )
        per = {d: v for d, v in per.items() if v > 0}
        if not per:
            raise InvalidBudgetError("no CUDA device has memory free beyond the margin; free memory or pass vram=.")
    else:
        totals = {p.device: p.total_vram for p in probes if p.total_vram}
        per = parse_device_budgets(vram, totals=totals, visible=visible)
        notes.append("VRAM budgets: " + ", ".join(f"{d} {format_bytes(v)}" for d, v in per.items()) + " (given)")
    first = by_name.get(next(iter(per)))
    reference = first or host or (probes[0] if probes else None)
    if reference is None:
        raise InvalidBudgetError("budget_for_devices needs a probe of this machine (host=) for its RAM.")
    budget, rest = budget_for(
        reference,
        vram=next(iter(per.values())),
        ram=ram,
        bandwidth=bandwidth,
        extra_ram=extra_ram,
        disk_bandwidth=disk_bandwidth,
        offload_folder=offload_folder,
        extra_disk=extra_disk,
    )
    linked = [by_name[d].h2d_bandwidth for d in per if d in by_name and by_name[d].is_gpu]
    if bandwidth is None and len(linked) > 1 and min(linked) < budget.bandwidth:
        budget = replace(budget, bandwidth=min(linked))
    notes += [n for n in rest if not n.startswith("VRAM budget")]
    return replace(budget, device="cuda", devices=tuple(per.items())), notes


def _request_record(spec: PipelineSpec, req: Request, budget: Budget, quality: str) -> dict[str, Any]:
    extra: dict[str, Any] = {"vram_budgets": dict(budget.devices)} if budget.devices else {}
    return {
        "model": spec.name,
        "kind": spec.kind,
        "height": req.height,
        "width": req.width,
        "batch_size": req.batch_size,
        "max_sequence_length": req.max_sequence_length,
        "num_inference_steps": req.num_inference_steps,
        "true_cfg": req.true_cfg,
        "quality": quality,
        "device": budget.device,
        "vram_budget": int(budget.vram),
        "ram_budget": int(budget.ram),
        "pinned_budget": int(budget.pinned),
        "bandwidth": float(budget.bandwidth),
        "bandwidth_source": budget.bandwidth_source,
        "disk_bandwidth": None if budget.disk_bandwidth is None else float(budget.disk_bandwidth),
        "disk_free": None if budget.disk_free is None else int(budget.disk_free),
        **extra,
    }


def plan_for(
    components_spec: PipelineSpec | Mapping[str, torch.nn.Module],
    request: Request | Mapping[str, Any],
    probe_or_budget: DeviceProbe | Budget,
    quality: str = "auto",
    *,
    calibration: Calibration | None = None,
    compile: bool = False,
) -> Plan:
    """The fastest plan for ``request`` on the pipeline described by ``components_spec`` within
    ``probe_or_budget``: a pure function of its arguments (nothing is probed, moved or loaded).

    ``components_spec`` is a :class:`PipelineSpec` (or modules by attribute, meta tensors fine);
    ``request`` a :class:`Request` or its fields; ``probe_or_budget`` a :class:`Budget`, or a
    :class:`~vramkit.memory.probe.DeviceProbe` whose free memory (minus a margin) is the budget.
    ``quality``: ``"lossless"`` (bit-identical output) or ``"auto"`` (also fp8/int8 storage and VAE
    tiling when they are faster or needed). ``compile=True`` adds regional ``torch.compile`` of the
    transformer (and ControlNet) in the mode that fits the placement (:mod:`vramkit.planner.compiling`).

    Raises :class:`~vramkit.errors.PlanInfeasibleError` (with ``minimum_vram``, the smallest budget
    that plans) when nothing fits, :class:`~vramkit.errors.InvalidRequestError` for a bad request.
    """
    if quality not in QUALITIES:
        raise InvalidRequestError(f"quality={quality!r}: use one of {QUALITIES}.")
    _check_compile(quality, compile)
    spec = components_spec if isinstance(components_spec, PipelineSpec) else spec_from_modules(dict(components_spec))
    if isinstance(request, Request):
        req = request
    else:
        fields = dict(request)
        fields.setdefault("max_sequence_length", spec.default_max_sequence_length)
        fields.setdefault("num_inference_steps", spec.default_steps)
        req = Request(**fields)
    notes: list[str] = []
    if isinstance(probe_or_budget, DeviceProbe):
        if not probe_or_budget.is_gpu:
            return _finish(_no_gpu_plan(spec, req, quality, probe_or_budget), quality, compile, spec)
        budget, notes = budget_for(probe_or_budget)
    elif isinstance(probe_or_budget, Budget):
        budget = probe_or_budget
        for label, v in (("vram", budget.vram), ("ram", budget.ram)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidBudgetError(f"Budget.{label}={v!r} must be a positive number of bytes.")
        if budget.bandwidth <= 0:
            raise InvalidBudgetError(f"Budget.bandwidth={budget.bandwidth!r} must be positive (bytes/s).")
        if budget.disk_bandwidth is not None and budget.disk_bandwidth <= 0:
            raise InvalidBudgetError(
                f"Budget.disk_bandwidth={budget.disk_bandwidth!r} must be positive (bytes/s), or None for the "
                "assumed default."
            )
        if budget.disk_free is not None and (
            isinstance(budget.disk_free, bool) or not isinstance(budget.disk_free, int) or budget.disk_free < 0
        ):
            raise InvalidBudgetError(
                f"Budget.disk_free={budget.disk_free!r} must be a number of bytes >= 0, or None when unknown."
            )
        names = [device_key(d) for d, _ in budget.devices]
        if len(set(names)) != len(names):
            raise InvalidBudgetError(f"Budget.devices names a device twice: {names}.")
        for d, v in budget.devices:
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise InvalidBudgetError(f"Budget.devices: {d}={v!r} must be a positive number of bytes.")
        notes = list(budget.notes)
    else:
        raise InvalidBudgetError(
            f"probe_or_budget must be a DeviceProbe or a Budget, got {type(probe_or_budget).__name__}."
        )
    record = _request_record(spec, req, budget, quality)
    plan = search(spec, req, budget, quality, calibration, request_record=record, notes=notes, parts=not compile)
    return _finish(plan, quality, compile, spec)


def _finish(plan: Plan, quality: str, compile: bool, spec: PipelineSpec) -> Plan:
    """The searched plan, with a ``Compile`` step when asked for."""
    if not compile:
        return plan
    from .compiling import with_compile

    present = tuple(c for c in ("transformer", "controlnet") if spec.get(c) is not None)
    plan = with_compile(plan, quality, present)
    plan.request = {**plan.request, "compile": True}
    return plan


def _check_compile(quality: str, compile: bool) -> None:
    if compile:
        from .compiling import check_compile_quality

        check_compile_quality(quality)


def _no_gpu_plan(spec: PipelineSpec, req: Request, quality: str, found: DeviceProbe) -> Plan:
    return Plan(
        steps=[],
        predicted=None,
        request={
            "model": spec.name,
            "height": req.height,
            "width": req.width,
            "batch_size": req.batch_size,
            "quality": quality,
            "device": found.device,
        },
        notes=[
            f"no GPU found ({found.name}): nothing to place on a GPU, so the plan has no steps. "
            "Pass vram= (e.g. vram='8GiB') to plan for a GPU anyway."
        ],
    )


# ------------------------------------------------------------------------------------------------
# Real pipelines
# ------------------------------------------------------------------------------------------------


def _pipeline_kind(pipe: Any) -> str:
    cls = type(pipe).__name__
    if "Fill" in cls:
        return "fill"
    if "Kontext" in cls:
        return "kontext"
    if "ControlNet" in cls:
        return "controlnet"
    if "Img2Img" in cls or "Inpaint" in cls:
        return "img2img"
    return "flux"


def spec_from_pipeline(pipe: Any) -> PipelineSpec:
    """The :class:`PipelineSpec` of a loaded diffusers Flux pipeline (reads shapes; changes nothing)."""
    from .._pipeline import check_flux_pipeline, model_components

    check_flux_pipeline(pipe)
    modules = model_components(pipe)
    sample = int(getattr(pipe, "default_sample_size", 128) or 128)
    scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    side = max(16, (sample * scale) // 16 * 16)
    return spec_from_modules(
        modules,
        kind=_pipeline_kind(pipe),
        name=type(pipe).__name__,
        default_max_sequence_length=512,
        default_steps=28,
        default_height=side,
        default_width=side,
    )


def _bytes_on(modules: Mapping[str, torch.nn.Module], device: str) -> int:
    """Bytes of the modules' tensors currently on ``device`` (``"cpu"``, ``"cuda:0"``, ...)."""
    want = torch.device(device)
    total = 0
    seen: set[int] = set()
    for module in modules.values():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in seen:
                continue
            seen.add(id(t))
            if t.device.type == want.type and (want.index is None or t.device.index in (None, want.index)):
                total += t.numel() * t.element_size()
    return total


def _offload_bytes_held(
    modules: Mapping[str, torch.nn.Module], folder: str | os.PathLike[str] | None
) -> int:
    """Bytes of the offload files that streamers on ``modules`` hold on the disk of ``folder``
    (default the default offload folder). A re-plan of a streamed pipeline (another ``optimize``,
    OOM recovery) undoes the old plan, which deletes these files, before the new one writes."""
    from ..engine.streamer import streamer_of
    from ..memory.probe import default_offload_folder, existing_ancestor, files_nbytes

    try:
        disk = existing_ancestor(folder if folder is not None else default_offload_folder()).stat().st_dev
    except OSError:
        return 0
    held: set[str] = set()
    for module in modules.values():
        for sub in module.modules():
            streamer = streamer_of(sub)
            path = streamer.summary().get("offload_file") if streamer is not None else None
            if path:
                held.add(path)
    on_disk = []
    for path in held:
        try:
            if os.stat(path).st_dev == disk:
                on_disk.append(path)
        except OSError:
            continue
    return files_nbytes(on_disk)


def plan_pipeline(
    pipe: Any,
    *,
    vram: int | str | Mapping[Any, int | str] | None = None,
    ram: int | str | None = None,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
    max_sequence_length: int | None = None,
    quality: str = "auto",
    device: str | None = None,
    true_cfg: bool = False,
    num_inference_steps: int = 28,
    bandwidth: float | str | None = None,
    calibration: Calibration | None = None,
    disk_bandwidth: float | str | None = None,
    compile: bool = False,
    offload_folder: str | os.PathLike[str] | None = None,
) -> Plan:
    """The fastest plan for ``pipe`` and this request, without changing the pipeline.

    ``vram``/``ram``: bytes or strings (``"8GiB"``, ``"8GB"``, ``"80%"`` of the device total);
    default: what the probe finds free (minus a margin) and the available host RAM plus what the
    pipeline already holds in host RAM. With no GPU and no ``vram``, the plan is empty (with a note);
    with ``vram`` given it plans for a GPU anyway (bandwidth assumed unless given).
    ``disk_bandwidth``: read + copy rate of blocks streamed from disk when the weights do not fit
    the RAM budget (default: the calibration's assumed figure). ``compile=True``: also compile the
    transformer's repeated blocks, in the mode the placement allows (the plan says which and why).
    ``offload_folder``: the folder offload files will go to (default: ``$VRAMKIT_OFFLOAD_DIR`` or
    vramkit's cache), whose free disk space bounds what a plan may write there.

    Several GPUs: ``vram`` may map devices to budgets (``{"cuda:0": "12GiB", "cuda:1": "12GiB"}``,
    keys also ``0``/``1`` or ``torch.device``); with no ``vram`` and no ``device`` on a machine with
    several CUDA devices, each gets what is free on it minus a margin. The plan may then place the
    transformer and the text encoders/VAE on different devices (see :mod:`vramkit.planner.devices`).
    """
    if quality not in QUALITIES:
        raise InvalidRequestError(f"quality={quality!r}: use one of {QUALITIES}.")
    _check_compile(quality, compile)
    spec = spec_from_pipeline(pipe)
    h = spec.default_height if height is None else height
    w = spec.default_width if width is None else width
    validate_size(h, w)
    req = Request(
        height=h,
        width=w,
        batch_size=batch_size,
        max_sequence_length=spec.default_max_sequence_length if max_sequence_length is None else max_sequence_length,
        num_inference_steps=num_inference_steps,
        true_cfg=bool(true_cfg),
    )
    found = probe(device, measure_bandwidth=bandwidth is None)
    from .._pipeline import model_components

    modules = model_components(pipe)
    several = vram is None and device is None and torch.cuda.is_available() and torch.cuda.device_count() > 1
    if isinstance(vram, Mapping) or several:
        # Several GPUs: per-device budgets (given, or what each visible device has free).
        probes = probe_devices(measure_bandwidth=bandwidth is None)
        budget, notes = budget_for_devices(
            probes,
            vram=vram,
            ram=ram,
            bandwidth=bandwidth,
            extra_ram=_process_rss() if ram is None else 0,
            extra_vram={p.device: _bytes_on(modules, p.device) for p in probes} if vram is None else None,
            visible=torch.cuda.device_count() if torch.cuda.is_available() else None,
            host=found,
            disk_bandwidth=disk_bandwidth,
            offload_folder=offload_folder,
            extra_disk=_offload_bytes_held(modules, offload_folder),
        )
        record = _request_record(spec, req, budget, quality)
        plan = search(spec, req, budget, quality, calibration, request_record=record, notes=notes, parts=not compile)
        return _finish(plan, quality, compile, spec)
    if not found.is_gpu and vram is None:
        return _finish(_no_gpu_plan(spec, req, quality, found), quality, compile, spec)
    budget, notes = budget_for(
        found,
        vram=vram,
        ram=ram,
        bandwidth=bandwidth,
        extra_ram=_process_rss() if ram is None else 0,
        extra_vram=_bytes_on(modules, found.device) if (vram is None and found.is_gpu) else 0,
        disk_bandwidth=disk_bandwidth,
        offload_folder=offload_folder,
        extra_disk=_offload_bytes_held(modules, offload_folder),
    )
    if ram is None:
        notes.append(f"the pipeline holds {format_bytes(_bytes_on(modules, 'cpu'))} in host RAM now")
    record = _request_record(spec, req, budget, quality)
    plan = search(spec, req, budget, quality, calibration, request_record=record, notes=notes, parts=not compile)
    return _finish(plan, quality, compile, spec)


def _process_rss() -> int:
    """Resident memory of this process: the plan's RAM figure counts the whole process (weights in
    host RAM included), so the default RAM budget is what is available plus what we already hold."""
    import psutil

    return int(psutil.Process().memory_info().rss)
