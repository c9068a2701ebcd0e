"""The :class:`Profiler`: wall time and memory of each stage of a pipeline call.

``with vramkit.profile(pipe) as prof: pipe(...)`` wraps, for the duration of the block only:

- ``pipe.encode_prompt`` (whatever is there, e.g. vramkit's PromptCache): a ``text_encoding`` stage;
- ``forward`` of every model component (text encoders, transformer, ControlNet, ...): per-component
  wall time; the first transformer or ControlNet call after the last scheduler step opens a
  ``denoising_step`` stage, and ``pipe.scheduler.step`` closes it, so the two transformer calls of
  true CFG and the ControlNet call of a step are one step;
- ``pipe.vae.encode`` / ``pipe.vae.decode``: ``vae_encode`` / ``vae_decode`` stages.

At each stage boundary the CUDA allocator's peak statistics are read and reset (no
synchronization unless ``sync=True``), host RSS is read, and a background thread samples RSS and
device memory every ``sample_interval`` seconds for the timeline. On exit every wrapper is removed
and the pipeline is exactly as before.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._pipeline import model_components
from ..errors import InvalidRequestError, VramkitError
from ._meters import CudaMeter, RssMeter, h2d_reader, pinned_reader

logger = logging.getLogger("vramkit")

__all__ = ["Profiler", "StageRecord", "ComponentRecord", "profile", "STAGE_KINDS"]

#: Stage kinds, in the order a pipeline call runs them; also the keys of ``Predicted.stages``.
STAGE_KINDS: tuple[str, ...] = ("text_encoding", "vae_encode", "denoising_step", "vae_decode")
_STEP_OPENERS = ("transformer", "controlnet")


@dataclass
class StageRecord:
    """One stage of a call, as measured. Times are seconds since the profile started; memory in
    bytes. A field is ``None`` where it cannot be measured here (no CUDA, no pinned-memory
    statistics, no streamed component), never a stand-in zero."""

    kind: str
    index: int
    start: float
    end: float | None = None
    seconds: float = 0.0
    calls: dict[str, int] = field(default_factory=dict)
    ram_start: int = 0
    ram_boundary_peak: int = 0
    vram_allocated_peak: int | None = None
    vram_reserved_peak: int | None = None
    pinned_peak: int | None = None
    h2d_bytes: int | None = None
    h2d_start: int | None = field(default=None, repr=False)
    opened_at: float = field(default=0.0, repr=False)

    @property
    def label(self) -> str:
        """``denoising_step[3]`` for steps, the kind alone for a stage that ran once."""
        return f"{self.kind}[{self.index}]" if self.kind == "denoising_step" else self.kind


@dataclass
class ComponentRecord:
    """Calls of one component's ``forward`` (``encode``/``decode`` for the VAE) and their wall time."""

    calls: int = 0
    seconds: float = 0.0
    depth: int = field(default=0, repr=False)


@dataclass
class _Patch:
    owner: Any
    name: str
    had: bool
    saved: Any
    wrapper: Any


def _model_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's model components, in the pipeline's own order (text encoders first)."""
    if not isinstance(getattr(pipe, "components", None), dict):
        return {}
    return model_components(pipe)


def _cuda_index(pipe: Any) -> int:
    """The CUDA device index the pipeline executes on (the current device when it names none).

    Resolved once, in the calling thread: the sampler thread's current device is its own.
    """
    try:
        device = pipe._execution_device
    except (AttributeError, RuntimeError, StopIteration):
        device = None
    if isinstance(device, torch.device) and device.type == "cuda" and device.index is not None:
        return device.index
    # Before CUDA initializes, the current device is 0 (set_device initializes CUDA).
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def _budget_value(value: Any) -> int | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return int(value) if value > 0 else None
    if isinstance(value, str):
        from ..errors import InvalidBudgetError
        from ..memory.budget import parse_budget

        try:
            return parse_budget(value)
        except (InvalidBudgetError, ValueError):
            return None
    return None


def budget_of(plan: Any) -> dict[str, int] | None:
    """The VRAM/RAM budget a plan was made for, from ``plan.request`` (``None`` if not recorded)."""
    request = getattr(plan, "request", None)
    if not isinstance(request, dict):
        return None
    found: dict[str, int] = {}
    nested = request.get("budget")
    sources: list[dict[str, Any]] = [request] + ([nested] if isinstance(nested, dict) else [])
    for what in ("vram", "ram"):
        for source in sources:
            for key in (what, f"{what}_budget", f"budget_{what}"):
                value = _budget_value(source.get(key))
                if value is not None and what not in found:
                    found[what] = value
    if "vram" not in found and not isinstance(nested, dict):
        value = _budget_value(nested)
        if value is not None:
            found["vram"] = value
    return found or None


def _outside_bytes(plan: Any) -> int:
    """Device bytes this process held outside the pipeline when the plan was applied (0 if unknown)."""
    request = getattr(plan, "request", None)
    value = request.get("vram_outside_pipeline") if isinstance(request, dict) else None
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


class Profiler:
    """Records one ``with`` block of pipeline calls; see :func:`profile`.

    After the block: :meth:`report` (text), :meth:`to_dict` / :meth:`to_json`, :meth:`plot` (PNG)
    and, in notebooks, the HTML table of ``_repr_html_``. A profiler records once; profile again
    with a new ``vramkit.profile(pipe)``.
    """

    def __init__(self, pipe: Any, *, sample_interval: float | None = 0.01, sync: bool = False) -> None:
        if sample_interval is not None and (
            isinstance(sample_interval, bool)
            or not isinstance(sample_interval, (int, float))
            or not sample_interval > 0
        ):
            raise InvalidRequestError(
                f"profile(sample_interval={sample_interval!r}): give seconds between samples (> 0), "
                "e.g. 0.01, or None for no background sampling."
            )
        self.pipe = pipe
        self.sample_interval = float(sample_interval) if sample_interval is not None else None
        self.sync = bool(sync)
        self.stages: list[StageRecord] = []
        self.components: dict[str, ComponentRecord] = {}
        self.total_seconds: float | None = None
        self.plan: Any = None  # the applied vramkit plan (at the end of the block, else at its start)
        self.vram_offset = 0  # device bytes outside the pipeline, left out of every VRAM reading
        self.notes: list[str] = []
        self._state = "new"  # new -> recording -> done
        self._recording = False
        self._open: StageRecord | None = None
        self._counts: dict[str, int] = {}
        self._patches: list[_Patch] = []
        self._samples: list[tuple[float, int, int | None, int | None]] = []
        self._t0 = 0.0
        self._gpu: CudaMeter | None = None
        self._device_name: str | None = None
        self._cuda_index: int | None = None
        self._rss = RssMeter()
        self._pinned: tuple[Callable[[], int | None], Callable[[], None]] | None = None
        self._h2d: Callable[[], int | None] = lambda: None
        self._module_list: list[torch.nn.Module] = []
        self._peak: dict[str, int] = {}
        self._h2d_seen = False
        self._sampler: threading.Thread | None = None
        self._stop_sampling = threading.Event()

    # --- context manager ----------------------------------------------------------------------

    def __enter__(self) -> Profiler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def gpu(self) -> bool:
        """Whether device memory is measured (CUDA available when the profile started)."""
        return self._gpu is not None

    @property
    def recording(self) -> bool:
        """Whether the ``with`` block is running (a report taken now shows the stages so far)."""
        return self._state == "recording"

    @property
    def num_steps(self) -> int:
        """Denoising steps recorded (scheduler steps that ran a transformer/ControlNet call)."""
        return sum(1 for s in self.stages if s.kind == "denoising_step")

    def start(self) -> None:
        """Install the wrappers and start sampling (what ``with`` does on entry)."""
        if self._state != "new":
            raise VramkitError("This Profiler has already recorded; start a new one with vramkit.profile(pipe).")
        self.plan = self._applied_plan()
        if torch.cuda.is_available():
            self._cuda_index = _cuda_index(self.pipe)
            self.vram_offset = _outside_bytes(self.plan)
            self._gpu = CudaMeter(self._cuda_index, offset=self.vram_offset)
            self._pinned = pinned_reader(self._modules)
        self._module_list = list(_model_components(self.pipe).values())
        self._h2d = h2d_reader(self._modules)
        self._state = "recording"
        try:
            self._install()
        except BaseException:
            self._uninstall()
            self._state = "done"
            raise
        self._t0 = time.perf_counter()
        self._fold_gap()
        self._recording = True
        self._boundary_sample()
        if self.sample_interval is not None:
            self._sampler = threading.Thread(target=self._sample_loop, name="vramkit-profile-sampler", daemon=True)
            self._sampler.start()
        logger.debug("profiling %s (gpu=%s, sync=%s)", type(self.pipe).__name__, self.gpu, self.sync)

    def stop(self) -> None:
        """Close any open stage, stop sampling and remove every wrapper (``with`` exit)."""
        if self._state != "recording":
            return
        try:
            if self._open is not None:
                self.notes.append(f"{self._open.label} was still open when the profile ended")
                self._end_stage()
            self._fold_gap()
            self._boundary_sample()
        finally:
            self.total_seconds = time.perf_counter() - self._t0
            self._recording = False
            self._stop_sampling.set()
            if self._sampler is not None:
                self._sampler.join(timeout=max(1.0, 10 * (self.sample_interval or 0.0)))
            self._uninstall()
            self._state = "done"
        if self._gpu is not None:
            self._device_name = self._gpu.name()
        self.plan = self._applied_plan() or self.plan

    # --- wrappers -----------------------------------------------------------------------------

    def _modules(self) -> Iterable[torch.nn.Module]:
        # The model components as of start(): a streamer is attached to the module object, so a
        # re-plan mid-call that streams a component is still seen (listing the pipeline's
        # components anew costs an ``inspect.signature`` per stage boundary).
        return self._module_list

    def _patch(
        self,
        owner: Any,
        name: str,
        *,
        component: str | None = None,
        bracket: str | None = None,
        opens_step: bool = False,
        closes_step: bool = False,
    ) -> None:
        """Put a profiling wrapper around ``owner.<name>`` (whatever is there now) as an instance
        attribute, remembering what the instance ``__dict__`` held so it can be put back exactly."""
        original = getattr(owner, name, None)
        if original is None or not callable(original):
            return
        had = name in owner.__dict__
        saved = owner.__dict__.get(name)
        wrapper = self._wrapper(
            original, component=component, bracket=bracket, opens_step=opens_step, closes_step=closes_step
        )
        functools.update_wrapper(wrapper, original, updated=())
        owner.__dict__[name] = wrapper
        self._patches.append(_Patch(owner, name, had, saved, wrapper))

    def _install(self) -> None:
        pipe = self.pipe
        self._patch(pipe, "encode_prompt", bracket="text_encoding")
        for name, module in _model_components(pipe).items():
            self.components[name] = ComponentRecord()
            if name == "vae":
                self._patch(module, "encode", component=name, bracket="vae_encode")
                self._patch(module, "decode", component=name, bracket="vae_decode")
            else:
                self._patch(module, "forward", component=name, opens_step=name in _STEP_OPENERS)
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None:
            self._patch(scheduler, "step", closes_step=True)

    def _uninstall(self) -> None:
        while self._patches:
            p = self._patches.pop()
            current = p.owner.__dict__.get(p.name)
            if current is not p.wrapper:
                # Something replaced our wrapper mid-profile (e.g. a hook installed by a re-plan):
                # leave its chain intact; our wrapper is now a pass-through.
                logger.warning(
                    "vramkit.profile: %s.%s was replaced while profiling; its profiling wrapper stays in "
                    "that chain as a pass-through.",
                    type(p.owner).__name__,
                    p.name,
                )
                continue
            if p.had:
                p.owner.__dict__[p.name] = p.saved
            else:
                del p.owner.__dict__[p.name]

    def _wrapper(
        self,
        original: Callable[..., Any],
        *,
        component: str | None = None,
        bracket: str | None = None,
        opens_step: bool = False,
        closes_step: bool = False,
    ) -> Callable[..., Any]:
        def profiled(*args: Any, **kwargs: Any) -> Any:
            if not self._recording:
                return original(*args, **kwargs)
            opened = False
            if bracket is not None:
                opened = self._enter_bracket(bracket)
            elif opens_step and self._open is None:
                self._begin_stage("denoising_step")
            rec = self.components.get(component) if component is not None else None
            timed = rec is not None and rec.depth == 0
            start = 0.0
            if timed:
                assert rec is not None
                rec.depth += 1
                self._synchronize()
                start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                if timed:
                    assert rec is not None and component is not None
                    self._synchronize()
                    rec.seconds += time.perf_counter() - start
                    rec.calls += 1
                    rec.depth -= 1
                    if self._open is not None:
                        self._open.calls[component] = self._open.calls.get(component, 0) + 1
                if self._recording:
                    if opened:
                        self._end_stage()
                    if closes_step and self._open is not None and self._open.kind == "denoising_step":
                        self._end_stage()

        return profiled

    # --- stages -------------------------------------------------------------------------------

    def _synchronize(self) -> None:
        if self.sync and self._gpu is not None:
            self._gpu.synchronize()

    def _enter_bracket(self, kind: str) -> bool:
        if self._open is not None:
            if self._open.kind != "denoising_step":
                return False  # nested inside another stage: counted there
            self._end_stage()
        self._begin_stage(kind)
        return True

    def _fold_gap(self) -> tuple[int | None, int | None]:
        """Fold the peaks since the last reset into the overall peaks, then reset them; returns
        the device's current ``(allocated, reserved)`` (``None`` without CUDA)."""
        current: tuple[int | None, int | None] = (None, None)
        if self._gpu is not None:
            g = self._gpu.read()
            self._fold("vram_allocated", g.peak_allocated)
            self._fold("vram_reserved", g.peak_reserved)
            self._gpu.reset_peak()
            current = (g.allocated, g.reserved)
        if self._pinned is not None:
            peak = self._pinned[0]()
            if peak is not None:
                self._fold("pinned", peak)
            self._pinned[1]()
        return current

    def _fold(self, key: str, value: int) -> None:
        self._peak[key] = max(self._peak.get(key, 0), value)

    def _read_h2d(self) -> int | None:
        value = self._h2d()
        if value is not None:
            self._h2d_seen = True
        return value

    def _begin_stage(self, kind: str) -> None:
        self._synchronize()
        device_now = self._fold_gap()
        index = self._counts.get(kind, 0)
        self._counts[kind] = index + 1
        rss = self._rss.read()
        h2d = self._read_h2d()
        now = time.perf_counter()
        stage = StageRecord(kind=kind, index=index, start=now - self._t0, ram_start=rss, ram_boundary_peak=rss)
        stage.h2d_start = h2d
        stage.opened_at = now
        self._samples.append((now - self._t0, rss, *device_now))
        self.stages.append(stage)
        self._open = stage

    def _end_stage(self) -> None:
        stage = self._open
        if stage is None:
            return
        self._synchronize()
        now = time.perf_counter()
        stage.end = now - self._t0
        stage.seconds += now - stage.opened_at
        rss = self._rss.read()
        stage.ram_boundary_peak = max(stage.ram_boundary_peak, rss)
        if self._gpu is not None:
            g = self._gpu.read()
            stage.vram_allocated_peak = g.peak_allocated
            stage.vram_reserved_peak = g.peak_reserved
            self._fold("vram_allocated", g.peak_allocated)
            self._fold("vram_reserved", g.peak_reserved)
            self._gpu.reset_peak()
            self._samples.append((stage.end, rss, g.allocated, g.reserved))
        else:
            self._samples.append((stage.end, rss, None, None))
        if self._pinned is not None:
            peak = self._pinned[0]()
            stage.pinned_peak = peak
            if peak is not None:
                self._fold("pinned", peak)
            self._pinned[1]()
        h2d = self._read_h2d()
        if h2d is not None:
            stage.h2d_bytes = max(0, h2d - (stage.h2d_start or 0))
        self._open = None

    # --- sampling -----------------------------------------------------------------------------

    def _gpu_now(self) -> tuple[int | None, int | None]:
        if self._gpu is None:
            return None, None
        return self._gpu.current()

    def _boundary_sample(self) -> None:
        self._samples.append((time.perf_counter() - self._t0, self._rss.read(), *self._gpu_now()))

    def _sample_loop(self) -> None:
        interval = self.sample_interval or 0.01
        import psutil

        while not self._stop_sampling.is_set():
            try:
                self._boundary_sample()
            except (psutil.Error, RuntimeError, OSError) as exc:
                logger.debug("vramkit.profile: sampling stopped: %s", exc)
                return
            self._stop_sampling.wait(interval)

    # --- results ------------------------------------------------------------------------------

    def _applied_plan(self) -> Any:
        from ..api import applied_plan

        try:
            return applied_plan(self.pipe)
        except (AttributeError, TypeError):
            return None

    def timeline(self) -> list[tuple[float, int, int | None, int | None]]:
        """``(t, rss, vram_allocated, vram_reserved)`` samples in time order (GPU values ``None``
        without CUDA)."""
        return sorted(self._samples, key=lambda s: s[0])

    def ram_peak(self, stage: StageRecord) -> int:
        """Largest RSS seen during ``stage``: boundary readings and the sampler's samples."""
        end = stage.end if stage.end is not None else float("inf")
        peak = stage.ram_boundary_peak
        for t, rss, _, _ in list(self._samples):
            if stage.start <= t <= end and rss > peak:
                peak = rss
        return peak

    def device(self) -> dict[str, Any]:
        """Where device memory was measured: ``{"type": "cuda", "index", "name"}`` or ``{"type": "cpu"}``."""
        if self._gpu is None:
            return {"type": "cpu", "gpu": False}
        out: dict[str, Any] = {"type": "cuda", "gpu": True, "index": self._cuda_index}
        if self._device_name is not None:
            out["name"] = self._device_name
        return out

    def overall_peaks(self) -> dict[str, int]:
        """Peaks over the whole profile (RSS, and device/pinned memory where measured)."""
        peaks = {"ram": max((s[1] for s in self._samples), default=0)}
        for key in ("vram_allocated", "vram_reserved", "pinned"):
            if key in self._peak:
                peaks[key] = self._peak[key]
        return peaks

    @property
    def h2d_measured(self) -> bool:
        """Whether any component was streamed by vramkit's engine (so H2D bytes were counted)."""
        return self._h2d_seen

    def to_dict(self, *, timeline: bool = True) -> dict[str, Any]:
        """Everything measured, JSON-safe (see ``docs/profiling.md`` for the fields)."""
        from ._report import build_dict

        return build_dict(self, timeline=timeline)

    def to_json(self, **kwargs: Any) -> str:
        """:meth:`to_dict` as JSON (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)

    def report(self, *, steps: str = "auto") -> str:
        """A text table: one row per stage with predictions next to measurements when a vramkit
        plan with predictions is applied, stages over their predicted peak marked ``OVER``.

        ``steps``: ``"all"`` (one row per denoising step), ``"summary"`` (one row for all steps:
        mean seconds, largest peaks) or ``"auto"`` (all up to 12 steps, else summary).
        """
        from ._report import render_text

        return render_text(self.to_dict(timeline=False), steps=steps)

    def __str__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        from ._report import render_html

        return render_html(self.to_dict(timeline=False))

    def plot(self, path: Any, *, width: int = 1200, height: int = 600) -> None:
        """Write a PNG timeline (``width`` x ``height`` pixels) of device memory and RSS with the
        stages shaded, the budget and the predicted peaks. Needs matplotlib (``vramkit[plot]``)."""
        from ._plot import plot_profile

        plot_profile(self.to_dict(), path, width=width, height=height)


def profile(pipe: Any, *, sample_interval: float | None = 0.01, sync: bool = False) -> Profiler:
    """Profile the pipeline calls made inside a ``with`` block.

    >>> with vramkit.profile(pipe) as prof:
    ...     pipe(prompt)
    >>> print(prof.report())
    >>> prof.plot("timeline.png")

    Args:
        pipe: a diffusers pipeline (FLUX family; any pipeline with ``encode_prompt``,
            ``scheduler.step`` and model components works).
        sample_interval: seconds between background samples of RSS and device memory for the
            timeline and the per-stage RSS peak; ``None`` samples at stage boundaries only.
        sync: synchronize CUDA at stage and component boundaries, so times are GPU-accurate (slower).
            Without it, a stage's time is host time, which on CUDA includes waiting for earlier
            queued work and leaves out work still queued.

    Returns:
        A :class:`Profiler`, recording from ``__enter__`` to ``__exit__``.
    """
    return Profiler(pipe, sample_interval=sample_interval, sync=sync)
