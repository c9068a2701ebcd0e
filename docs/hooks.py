"""MkDocs hook: the benchmarks page is rendered at build time from the JSON committed under
``benchmarks/results/`` (nothing else), so results that land later appear without editing the page.

``<!-- benchmark-tables -->`` in a page becomes the tables of ``benchmarks/render_tables.py`` (the
formats it knows) followed by an inventory of every result file with its device and command, the
calibration runs summarised from their own ``measurements``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = "<!-- benchmark-tables -->"


def _render_tables() -> str:
    spec = importlib.util.spec_from_file_location("_vramkit_render_tables", ROOT / "benchmarks" / "render_tables.py")
    if spec is None or spec.loader is None:
        return ""
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    lines: list[str] = []
    for name, render in (("streaming_1024_h200.json", "streaming"), ("pipeline_1024_h200.json", "pipeline")):
        path = RESULTS / name
        if path.exists() and hasattr(module, render):
            lines += getattr(module, render)(json.loads(path.read_text())) + [""]
    return "\n".join(lines)


def _device(data: dict[str, Any]) -> str:
    env = data.get("environment") or {}
    return str(data.get("device") or env.get("device") or "?")


def _command(data: dict[str, Any]) -> str:
    env = data.get("environment") or {}
    return str(data.get("command") or env.get("command") or "?")


def _calibration(name: str, data: dict[str, Any]) -> list[str]:
    rows = [m for m in data.get("measurements", []) if m.get("ok")]
    out = [
        f"#### {name}: {_device(data)}, torch {data.get('versions', {}).get('torch', '?')}, "
        f"diffusers {data.get('versions', {}).get('diffusers', '?')} ({data.get('started', '?')})",
        "",
        "| stage | setting | seconds | activation / transfer |",
        "|---|---|---|---|",
    ]
    skip = {"stage", "ok", "seconds", "seconds_all", "baseline_allocated", "peak_allocated", "peak_reserved",
            "activation_bytes", "weight_bytes", "bytes", "bytes_per_s", "trace", "tokens", "streamed_bytes",
            "device_bytes", "pinned_bytes", "decoded_bytes", "setup_seconds"}
    for m in rows:
        setting = ", ".join(f"{k}={v}" for k, v in m.items() if k not in skip and v is not None)
        if "bytes_per_s" in m:
            extra = f"{m['bytes_per_s'] / 1e9:.1f} GB/s"
        elif "activation_bytes" in m:
            extra = f"{m['activation_bytes'] / 2**30:.2f} GiB activations"
            if m.get("streamed_bytes"):
                extra += f", {m['streamed_bytes'] / 1e9:.1f} GB streamed per step"
        else:
            extra = ""
        out.append(f"| {m['stage']} | {setting} | {m.get('seconds', 0):.4f} | {extra} |")
    failed = [m for m in data.get("measurements", []) if not m.get("ok")]
    if failed:
        out += ["", "Failed in this run (recorded, not used): "
                + "; ".join(f"{m['stage']} ({m.get('error', '?')})" for m in failed) + "."]
    if data.get("not_measured"):
        out += ["", "Not measured (built-in defaults kept): " + ", ".join(f"`{k}`" for k in data["not_measured"]) + "."]
    return out + [""]


def render() -> str:
    parts = [_render_tables(), "## Calibration runs of the memory model", ""]
    inventory = ["## Every committed result file", "", "| file | device | command |", "|---|---|---|"]
    for path in sorted(RESULTS.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            inventory.append(f"| `{path.name}` | unreadable: {exc} | |")
            continue
        inventory.append(f"| `{path.name}` | {_device(data)} | `{_command(data)}` |")
        if path.name.startswith("calibration"):
            parts += _calibration(path.name, data)
    return "\n".join(parts + inventory) + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:  # noqa: ARG001 - mkdocs API
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown
