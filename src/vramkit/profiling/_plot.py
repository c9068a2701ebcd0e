"""The PNG timeline of a profile: device memory (allocated, reserved) and host RSS over the call,
stages shaded and labelled, the budget as a horizontal line and each stage's predicted peak as a
short dashed segment. matplotlib is optional (``pip install 'vramkit[plot]'``); it is imported
only here, on first use, and drawn with the Agg canvas directly (pyplot's global state and the
process-wide backend are left alone)."""

from __future__ import annotations

import os
from typing import Any

from ..errors import InvalidRequestError, MissingDependencyError

__all__ = ["plot_profile"]

_DPI = 100
_COLORS = {"text_encoding": "#4c72b0", "vae_encode": "#8172b2", "vae_decode": "#55a868"}
_STEP_COLORS = ("#dd8452", "#c44e52")  # alternating, so neighbouring steps stay apart
_SHORT = {"text_encoding": "text", "vae_encode": "encode", "vae_decode": "decode"}
_MAX_LABELS = 24


def _matplotlib() -> tuple[Any, Any]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "prof.plot() needs matplotlib, which is not installed: pip install 'vramkit[plot]' "
            "(or pip install matplotlib). prof.report() and prof.to_dict() work without it."
        ) from exc
    return Figure, FigureCanvasAgg


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 64 <= value <= 20000:
        raise InvalidRequestError(f"plot({name}={value!r}): give a whole number of pixels from 64 to 20000.")
    return value


def _unit(largest: float) -> tuple[str, float]:
    return ("GiB", 1024.0**3) if largest >= 1024**3 else ("MiB", 1024.0**2)


def _stage_color(stage: dict[str, Any]) -> str:
    if stage["name"] == "denoising_step":
        return _STEP_COLORS[int(stage["index"]) % 2]
    return _COLORS.get(stage["name"], "#999999")


def _stage_text(stage: dict[str, Any]) -> str:
    if stage["name"] == "denoising_step":
        return f"step {stage['index']}"
    return _SHORT.get(stage["name"], stage["name"])


def _draw_stages(ax: Any, stages: list[dict[str, Any]], labels: bool) -> None:
    steps = [s for s in stages if s["name"] == "denoising_step"]
    every = max(1, -(-len(steps) // _MAX_LABELS))
    for s in stages:
        if s["end"] is None:
            continue
        over = s.get("over_prediction", False)
        ax.axvspan(
            s["start"],
            s["end"],
            facecolor=_stage_color(s),
            alpha=0.15,
            linewidth=1.5 if over else 0,
            edgecolor="#d00000" if over else None,
        )
        if not labels or (s["name"] == "denoising_step" and s["index"] % every and s is not steps[-1]):
            continue
        ax.text(
            (s["start"] + s["end"]) / 2,
            0.98,
            _stage_text(s) + (" OVER" if over else ""),
            transform=ax.get_xaxis_transform(),
            rotation=90,
            ha="center",
            va="top",
            fontsize=7,
            color="#d00000" if over else "#333333",
            clip_on=True,
        )


def _dig(stage: dict[str, Any], keys: tuple[str, ...]) -> Any:
    value: Any = stage
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _draw_segments(
    ax: Any, stages: list[dict[str, Any]], keys: tuple[str, ...], scale: float, *, color: str, style: str, label: str
) -> None:
    """A short horizontal segment over each stage at the stage's value under ``keys`` (if any)."""
    labelled = False
    for s in stages:
        y = _dig(s, keys)
        if y is None or s["end"] is None:
            continue
        ax.hlines(
            y / scale,
            s["start"],
            s["end"],
            colors=color,
            linestyles=style,
            linewidth=1.5,
            label=None if labelled else label,
        )
        labelled = True


def plot_profile(d: dict[str, Any], path: str | os.PathLike[str], *, width: int = 1200, height: int = 600) -> None:
    """Draw the profile dict ``d`` (from :func:`~vramkit.profiling._report.build_dict`) to ``path``
    as a PNG of exactly ``width`` x ``height`` pixels.

    Raises:
        MissingDependencyError: matplotlib is not installed.
        InvalidRequestError: the size is not a whole number of pixels from 64 to 20000.
    """
    width = _check_size("width", width)
    height = _check_size("height", height)
    figure_cls, canvas_cls = _matplotlib()
    # A hair over the exact inches so Agg's truncation to whole pixels lands on the size asked.
    fig = figure_cls(figsize=((width + 0.01) / _DPI, (height + 0.01) / _DPI), dpi=_DPI)
    canvas_cls(fig)
    gpu = bool(d["device"].get("gpu"))
    axes = list(fig.subplots(2 if gpu else 1, 1, sharex=True, squeeze=False)[:, 0])
    timeline = d.get("timeline", [])
    stages = d["stages"]
    budget = d.get("budget", {})
    t = [s["t"] for s in timeline]
    panels: list[tuple[Any, str, list[tuple[str, str, str]], str, str]] = []
    if gpu:
        panels.append(
            (
                axes[0],
                "VRAM",
                [("vram_allocated", "allocated", "#1f77b4"), ("vram_reserved", "reserved", "#9467bd")],
                "vram",
                "vram",
            )
        )
    panels.append((axes[-1], "RAM (RSS)", [("ram", "RSS", "#2ca02c")], "ram", "ram"))
    for i, (ax, title, series, pred_key, budget_key) in enumerate(panels):
        values = [s[k] for s in timeline for k, _, _ in series if s.get(k) is not None]
        values += [st["predicted"][pred_key] for st in stages if "predicted" in st]
        peak_key = "vram_reserved_peak" if pred_key == "vram" else "ram_peak"
        values += [st[peak_key] for st in stages if st.get(peak_key) is not None]
        if budget_key in budget:
            values.append(budget[budget_key])
        unit, scale = _unit(max(values, default=0))
        for key, label, color in series:
            points = [(s["t"], s[key] / scale) for s in timeline if s.get(key) is not None]
            if points:
                ax.plot(
                    [p[0] for p in points],
                    [p[1] for p in points],
                    color=color,
                    linewidth=1.2,
                    label=label,
                    drawstyle="steps-post",
                )
        _draw_stages(ax, stages, labels=i == 0)
        # The sampler can miss a short-lived peak; the allocator's (and the boundary readings') cannot.
        label = "stage peak (reserved)" if pred_key == "vram" else "stage peak"
        _draw_segments(ax, stages, (peak_key,), scale, color="#555555", style="-", label=label)
        _draw_segments(ax, stages, ("predicted", pred_key), scale, color="#d00000", style="--", label="predicted peak")
        if budget_key in budget:
            ax.axhline(budget[budget_key] / scale, color="#000000", linestyle=":", linewidth=1.2, label="budget")
        ax.set_ylabel(f"{title} [{unit}]")
        top = max(values, default=0) / scale
        ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=7, framealpha=0.8)
    end = max([d.get("total_seconds") or 0.0, *t, *[s["end"] or 0.0 for s in stages]])
    axes[-1].set_xlim(0, end if end > 0 else 1.0)
    axes[-1].set_xlabel("seconds since the profile started")
    dev = d["device"]
    where = dev.get("name") or dev["type"]
    over = " - some stages OVER their predicted peak" if d.get("over_prediction") else ""
    axes[0].set_title(f"vramkit profile: {d['pipeline']} on {where}, {d['num_steps']} steps{over}", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), format="png", dpi=_DPI)
