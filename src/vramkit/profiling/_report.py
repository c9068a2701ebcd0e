"""The profile as a JSON-safe dict, and the text and HTML tables rendered from that dict (so the
report and the JSON always say the same numbers)."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._profiler import Profiler

__all__ = ["build_dict", "render_text", "render_html", "fmt_mib", "fmt_seconds", "FORMAT"]

#: ``to_dict()["format"]``: bumped when a field changes meaning.
FORMAT = "vramkit.profile/1"
_MIB = 1024**2
_AUTO_MAX_STEP_ROWS = 12
_MEASURED_KEYS = ("vram_allocated_peak", "vram_reserved_peak", "pinned_peak")


def fmt_mib(n: int | float) -> str:
    """Bytes as MiB with one decimal, as every byte column of the report shows them."""
    return f"{n / _MIB:.1f}"


def fmt_seconds(x: float) -> str:
    """Seconds with four decimals, as every time column of the report shows them."""
    return f"{x:.4f}"


def _over(measured: dict[str, Any], predicted: dict[str, Any]) -> list[str]:
    """What exceeds its prediction: ``"vram"`` (peak allocated > predicted VRAM: the planner predicts
    allocated memory and fits the plan with an allocator reserve on top) and ``"ram"`` (peak RSS >
    predicted RAM). Time is compared in the table, never flagged."""
    over = []
    vram = measured.get("vram_allocated_peak")
    if vram is not None and vram > predicted["vram"]:
        over.append("vram")
    if measured.get("ram_peak") is not None and measured["ram_peak"] > predicted["ram"]:
        over.append("ram")
    return over


def _with_prediction(row: dict[str, Any], stage_predictions: dict[str, Any]) -> None:
    pred = stage_predictions.get(row["name"])
    if pred is None:
        return
    row["predicted"] = pred.to_dict() if hasattr(pred, "to_dict") else dict(pred)
    over = _over(row, row["predicted"])
    row["over"] = over
    row["over_prediction"] = bool(over)


def _summaries(stages: list[dict[str, Any]], stage_predictions: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    kinds: list[str] = []
    for s in stages:
        if s["name"] not in kinds:
            kinds.append(s["name"])
    for kind in kinds:
        rows = [s for s in stages if s["name"] == kind]
        seconds = [r["seconds"] for r in rows]
        summary: dict[str, Any] = {
            "count": len(rows),
            "first": rows[0]["index"],
            "last": rows[-1]["index"],
            "seconds_total": sum(seconds),
            "seconds_mean": sum(seconds) / len(rows),
            "seconds_max": max(seconds),
            "ram_peak": max(r["ram_peak"] for r in rows),
        }
        for key in _MEASURED_KEYS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                summary[key] = max(values)
        h2d = [r["h2d_bytes"] for r in rows if r.get("h2d_bytes") is not None]
        if h2d:
            summary["h2d_bytes"] = sum(h2d)
        pred = stage_predictions.get(kind)
        if pred is not None:
            summary["predicted"] = pred.to_dict() if hasattr(pred, "to_dict") else dict(pred)
            over = sorted({o for r in rows for o in r.get("over", [])})
            summary["over"] = over
            summary["over_prediction"] = bool(over)
        out[kind] = summary
    return out


def build_dict(prof: Profiler, *, timeline: bool = True) -> dict[str, Any]:
    """Everything ``prof`` measured, JSON-safe. Unmeasurable fields are left out, never zero."""
    plan = prof._applied_plan() if prof.recording else prof.plan
    predicted = getattr(plan, "predicted", None)
    stage_predictions: dict[str, Any] = dict(getattr(predicted, "stages", None) or {})
    gpu = prof.gpu
    stages: list[dict[str, Any]] = []
    for s in prof.stages:
        row: dict[str, Any] = {
            "name": s.kind,
            "index": s.index,
            "label": s.label,
            "start": s.start,
            "end": s.end,
            "seconds": s.seconds,
            "calls": dict(s.calls),
            "ram_peak": prof.ram_peak(s),
        }
        if gpu:
            for key in _MEASURED_KEYS:
                value = getattr(s, key)
                if value is not None:
                    row[key] = int(value)
        if s.h2d_bytes is not None:
            row["h2d_bytes"] = int(s.h2d_bytes)
        _with_prediction(row, stage_predictions)
        stages.append(row)
    out: dict[str, Any] = {
        "format": FORMAT,
        "pipeline": type(prof.pipe).__name__,
        "device": prof.device(),
        "sync": prof.sync,
        "vram_offset": prof.vram_offset,
        "sample_interval": prof.sample_interval,
        "total_seconds": prof.total_seconds,
        "num_steps": prof.num_steps,
        "peak": prof.overall_peaks(),
        "stages": stages,
        "summary": _summaries(stages, stage_predictions),
        "components": {name: {"calls": rec.calls, "seconds": rec.seconds} for name, rec in prof.components.items()},
    }
    budget = _budget(plan)
    if budget is not None:
        out["budget"] = budget
    if predicted is not None:
        out["predicted"] = predicted.to_dict()
        out["over_prediction"] = any(r.get("over_prediction", False) for r in stages)
    out["notes"] = _notes(prof, plan, predicted, stage_predictions)
    if timeline:
        samples = []
        for t, rss, alloc, reserved in prof.timeline():
            sample: dict[str, Any] = {"t": t, "ram": rss}
            if alloc is not None:
                sample["vram_allocated"] = alloc
                sample["vram_reserved"] = reserved
            samples.append(sample)
        out["timeline"] = samples
    return out


def _budget(plan: Any) -> dict[str, int] | None:
    from ._profiler import budget_of

    return budget_of(plan) if plan is not None else None


def _notes(prof: Profiler, plan: Any, predicted: Any, stage_predictions: dict[str, Any]) -> list[str]:
    notes: list[str] = []
    if not prof.gpu:
        notes.append("no CUDA device: VRAM and pinned-memory columns are absent (not zero)")
    else:
        if not prof.sync:
            notes.append(
                "stage times are host wall-clock without CUDA synchronization; profile(pipe, sync=True) "
                "gives GPU-accurate stage times at some cost"
            )
        if not any(s.pinned_peak is not None for s in prof.stages):
            notes.append("pinned host memory not measured (this torch has no torch.cuda.host_memory_stats)")
        if prof.vram_offset:
            notes.append(
                f"VRAM figures leave out {fmt_mib(prof.vram_offset)} MiB this process held on the device outside the "
                "pipeline when the plan was applied (not the plan's: it planned for the memory free then)"
            )
        if not prof.h2d_measured:
            notes.append("host-to-device bytes not counted: no component is streamed by vramkit's engine")
    if plan is not None and predicted is None:
        notes.append("the applied vramkit plan has no predictions (hand-picked strategies)")
    if predicted is not None:
        missing = sorted({s.kind for s in prof.stages} - set(stage_predictions))
        if missing:
            notes.append(f"no prediction for: {', '.join(missing)}")
        notes.append("OVER: peak VRAM allocated above the predicted VRAM, or peak RSS above the predicted RAM")
    notes.extend(prof.notes)
    return notes


# --- text and HTML ---------------------------------------------------------------------------


def _columns(d: dict[str, Any]) -> list[tuple[str, Callable[[dict[str, Any]], str]]]:
    """(header, cell) of each column present in this profile."""

    def mib(key: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt_mib(r[key]) if r.get(key) is not None else "-"

    def pred(key: str, fmt: Callable[[Any], str]) -> Callable[[dict[str, Any]], str]:
        return lambda r: fmt(r["predicted"][key]) if "predicted" in r else "-"

    stages = d["stages"]
    cols: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("seconds", lambda r: fmt_seconds(r["seconds"])),
        ("RAM MiB", mib("ram_peak")),
    ]
    if d["device"].get("gpu"):
        cols += [("VRAM alloc MiB", mib("vram_allocated_peak")), ("VRAM resv MiB", mib("vram_reserved_peak"))]
    if any("pinned_peak" in s for s in stages):
        cols.append(("pinned MiB", mib("pinned_peak")))
    if any("h2d_bytes" in s for s in stages):
        cols.append(("H2D MiB", mib("h2d_bytes")))
    if "predicted" in d:
        cols += [
            ("pred VRAM MiB", pred("vram", fmt_mib)),
            ("pred RAM MiB", pred("ram", fmt_mib)),
            ("pred seconds", pred("seconds", fmt_seconds)),
        ]
    return cols


def _rows(d: dict[str, Any], steps: str) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
    """``(label, row)`` pairs to show, and whether the denoising steps are summarized."""
    if steps not in ("auto", "all", "summary"):
        from ..errors import InvalidRequestError

        raise InvalidRequestError(f"report(steps={steps!r}): use 'auto', 'all' or 'summary'.")
    n = d["num_steps"]
    summarize = n > 0 and (steps == "summary" or (steps == "auto" and n > _AUTO_MAX_STEP_ROWS))
    rows: list[tuple[str, dict[str, Any]]] = []
    done = False
    for s in d["stages"]:
        if summarize and s["name"] == "denoising_step":
            if not done:
                summary = d["summary"]["denoising_step"]
                row = {**summary, "name": "denoising_step", "seconds": summary["seconds_mean"]}
                rows.append((f"denoising_step[{summary['first']}..{summary['last']}]", row))
                done = True
            continue
        rows.append((s["label"], s))
    return rows, summarize


def _headline(d: dict[str, Any]) -> list[str]:
    dev = d["device"]
    where = dev["type"] + (f":{dev['index']}" if dev.get("index") is not None else "")
    if dev.get("name"):
        where += f" ({dev['name']})"
    total = d["total_seconds"]
    lines = [
        f"vramkit profile: {d['pipeline']} on {where}, "
        + (f"{fmt_seconds(total)} s" if total is not None else "still recording")
        + f", {d['num_steps']} denoising steps"
    ]
    peak = d["peak"]
    parts = [f"RAM {fmt_mib(peak['ram'])} MiB"]
    if "vram_allocated" in peak:
        parts.append(f"VRAM allocated {fmt_mib(peak['vram_allocated'])} MiB")
        parts.append(f"VRAM reserved {fmt_mib(peak['vram_reserved'])} MiB")
    if "pinned" in peak:
        parts.append(f"pinned {fmt_mib(peak['pinned'])} MiB")
    lines.append("peak: " + ", ".join(parts))
    if "budget" in d:
        lines.append(
            "budget: "
            + ", ".join(f"{k.upper()} {fmt_mib(v)} MiB" for k, v in sorted(d["budget"].items(), reverse=True))
        )
    if "predicted" in d:
        p = d["predicted"]
        flag = " (some stages OVER their prediction)" if d.get("over_prediction") else ""
        lines.append(
            f"predicted: peak VRAM {fmt_mib(p['peak_vram'])} MiB, peak RAM {fmt_mib(p['peak_ram'])} MiB, "
            f"{fmt_seconds(p['seconds_per_step'])} s/step{flag}"
        )
    return lines


def render_text(d: dict[str, Any], *, steps: str = "auto") -> str:
    """The text report of a :func:`build_dict` dict (byte columns in MiB, times in seconds)."""
    cols = _columns(d)
    rows, summarized = _rows(d, steps)
    table = [["stage", *[h for h, _ in cols], ""]]
    for label, row in rows:
        table.append([label, *[cell(row) for _, cell in cols], "OVER" if row.get("over_prediction") else ""])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = _headline(d)
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1])]
        lines.append(("  ".join(cells) + ("  " + r[-1] if r[-1] else "")).rstrip())
    if summarized:
        lines.append("  (denoising_step[a..b]: mean seconds per step, largest peaks, total H2D over the steps)")
    if d["components"]:
        lines.append("components:")
        width = max(len(n) for n in d["components"])
        for name, c in d["components"].items():
            lines.append(f"  {name.ljust(width)}  calls {c['calls']:>4}  seconds {fmt_seconds(c['seconds'])}")
    for note in d["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_html(d: dict[str, Any], *, steps: str = "auto") -> str:
    """The same table as :func:`render_text`, as HTML for notebooks."""
    cols = _columns(d)
    rows, _ = _rows(d, steps)
    esc = html.escape
    out = [f"<div><p>{'<br>'.join(esc(line) for line in _headline(d))}</p>", "<table>", "<thead><tr><th>stage</th>"]
    out += [f"<th>{esc(h)}</th>" for h, _ in cols]
    out.append("<th></th></tr></thead><tbody>")
    for label, row in rows:
        over = row.get("over_prediction")
        style = ' style="color:#b00000;font-weight:bold"' if over else ""
        out.append(f"<tr{style}><td>{esc(label)}</td>")
        out += [f'<td style="text-align:right">{esc(cell(row))}</td>' for _, cell in cols]
        out.append(f"<td>{'OVER' if over else ''}</td></tr>")
    out.append("</tbody></table>")
    if d["components"]:
        out.append("<table><thead><tr><th>component</th><th>calls</th><th>seconds</th></tr></thead><tbody>")
        for name, c in d["components"].items():
            out.append(
                f'<tr><td>{esc(name)}</td><td style="text-align:right">{c["calls"]}</td>'
                f'<td style="text-align:right">{fmt_seconds(c["seconds"])}</td></tr>'
            )
        out.append("</tbody></table>")
    if d["notes"]:
        out.append("<ul>" + "".join(f"<li>{esc(n)}</li>" for n in d["notes"]) + "</ul>")
    out.append("</div>")
    return "".join(out)
