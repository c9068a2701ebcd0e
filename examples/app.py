"""An offline web demo of vramkit: prompt, seed, steps and size in; the chosen plan, the image and a
memory report out.

    python examples/app.py                         # tiny offline pipeline (random weights), CPU is fine
    python examples/app.py --model-path /models/FLUX.1-dev --vram 12GiB   # your local weights
    python examples/app.py --check                 # no server: one generation, printed (for tests/CI)

It listens on 127.0.0.1 only, never creates a share link, turns Gradio's analytics off and never
downloads anything (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). The UI is Gradio when it is
installed (``pip install "vramkit[app]"``); otherwise, or with ``--ui stdlib``, the same page is
served by Python's own ``http.server`` (no extra package at all).

How it works: at start-up, and again whenever the requested size changes, the app calls
``vramkit.optimize(pipe, vram=..., height=..., width=...)``; the plan is shown as ``plan.explain()``
prints it. Each generation runs inside ``vramkit.profiling.profile(pipe)`` and shows its report
(measured time and memory per stage next to the planner's prediction); without
``vramkit.profiling`` it shows the plan's predicted per-stage table instead.

With the tiny pipeline (the default) nothing needs a GPU or weights: the plan is made for a stand-in
budget (``--vram``, default 8GiB) and, below it, the app also shows what the planner would do with
full-size FLUX.1-dev on the same budget (planning only, on the meta device).
"""

from __future__ import annotations

import os

# Before gradio is imported: it reads these at import time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import argparse  # noqa: E402
import base64  # noqa: E402
import html  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

import vramkit  # noqa: E402
from vramkit.errors import IrreversibleError, VramkitError  # noqa: E402

HOST = "127.0.0.1"  # never anything else: the demo is for this machine only
TITLE = "vramkit demo"


@dataclass
class Settings:
    """What the app was started with."""

    model_path: str | None = None
    vram: str | None = None
    ram: str | None = None
    quality: str = "auto"
    full_size_model: str = "flux-dev"
    default_steps: int = 2
    default_size: int = 32
    min_size: int = 32
    max_size: int = 128
    max_sequence_length: int = 16


@dataclass
class Result:
    """One generation: the image, the plan text, the memory report and how long it took."""

    image: Any
    plan_text: str
    memory_text: str
    seconds: float
    width: int
    height: int
    extra: dict[str, Any] = field(default_factory=dict)


def _gib(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB"


def load_pipeline(model_path: str | None) -> tuple[Any, str]:
    """The pipeline to serve and a one-line description. Without ``model_path``: the tiny offline
    FLUX pipeline in bf16 (as real FLUX is loaded). With it: the local diffusers folder, never a
    download."""
    if model_path is None:
        from vramkit.testing import tiny_pipeline

        pipe = tiny_pipeline("flux").to(torch.bfloat16)
        return pipe, "tiny offline FLUX pipeline (random weights, a few hundred kB): images are noise-like"
    from diffusers import DiffusionPipeline, FluxPipeline

    pipe = DiffusionPipeline.from_pretrained(model_path, torch_dtype=torch.bfloat16, local_files_only=True)
    if not isinstance(pipe, FluxPipeline):
        raise SystemExit(
            f"{model_path} holds a {type(pipe).__name__}; this demo is text-to-image: give a FLUX.1-dev or "
            "FLUX.1-schnell folder (see examples/fill_inpaint_low_vram.py and controlnet_union_low_vram.py)."
        )
    return pipe, f"{type(pipe).__name__} from {model_path}"


def full_size_plan_text(model: str, vram: str, ram: str | None, width: int, height: int) -> str:
    """What the planner does for the full-size model on this budget (meta device: no memory, no
    weights). Planning only: nothing runs."""
    from vramkit.testing.full_size import full_size_flux_pipeline

    try:
        big = full_size_flux_pipeline(model, device="meta")
        plan = vramkit.plan(big, vram=vram, ram=ram or "64GiB", height=height, width=width)
    except VramkitError as exc:
        return f"full-size {model} at {vram}: {exc}"
    return plan.explain()


class DemoApp:
    """The state behind the UI: the pipeline, its applied plan, and :meth:`generate`."""

    def __init__(self, pipe: Any, description: str, settings: Settings) -> None:
        self.pipe = pipe
        self.description = description
        self.settings = settings
        self.tiny = settings.model_path is None
        self.plan: vramkit.Plan | None = None
        self.plan_error: str | None = None
        self.planned_size: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._full_size_cache: dict[tuple[int, int], str] = {}

    # --- planning ------------------------------------------------------------------------------

    def ensure_plan(self, width: int, height: int) -> None:
        """Optimize the pipeline for this size (again only when the size changed)."""
        if self.planned_size == (width, height):
            return
        if self.plan is not None:
            try:
                vramkit.restore(self.pipe)
            except IrreversibleError as exc:  # e.g. fp8 storage: the pipeline keeps working in that form
                self.plan_error = f"note: {exc}"
        self.plan = None
        try:
            self.plan = vramkit.optimize(
                self.pipe,
                vram=self.settings.vram,
                ram=self.settings.ram,
                height=height,
                width=width,
                quality=self.settings.quality,
            )
            self.plan_error = None
        except VramkitError as exc:
            # The pipeline is unchanged after a failed optimize: run it as it is and say why.
            self.plan_error = f"vramkit.optimize failed, the pipeline runs unoptimized: {type(exc).__name__}: {exc}"
        self.planned_size = (width, height)

    def plan_text(self, width: int, height: int) -> str:
        lines = [f"pipeline: {self.description}"]
        if self.plan is not None:
            lines.append(self.plan.explain())
        if self.plan_error:
            lines.append(self.plan_error)
        if self.tiny:
            key = (width, height)
            if key not in self._full_size_cache:
                side = 1024
                self._full_size_cache[key] = full_size_plan_text(
                    self.settings.full_size_model, self.settings.vram or "8GiB", self.settings.ram, side, side
                )
            lines.append("")
            lines.append(
                f"--- for comparison: full-size {self.settings.full_size_model} at 1024x1024 on the same budget "
                "(planning only, meta device; predictions are the planner's, not measurements) ---"
            )
            lines.append(self._full_size_cache[key])
        return "\n".join(lines)

    # --- generating ----------------------------------------------------------------------------

    def _check_size(self, value: Any, what: str) -> int:
        n = int(value)
        lo, hi = self.settings.min_size, self.settings.max_size
        if n % 16 or not lo <= n <= hi:
            raise ValueError(f"{what} must be a multiple of 16 between {lo} and {hi}, got {n}")
        return n

    def generate(self, prompt: str, seed: Any = 0, steps: Any = None, width: Any = None, height: Any = None) -> Result:
        """Run the pipeline once (optimized for this size) inside the profiler."""
        prompt = (prompt or "").strip() or "a red fox in the snow"
        steps = int(steps or self.settings.default_steps)
        if not 1 <= steps <= 100:
            raise ValueError(f"steps must be between 1 and 100, got {steps}")
        width = self._check_size(width or self.settings.default_size, "width")
        height = self._check_size(height or self.settings.default_size, "height")
        with self._lock:
            self.ensure_plan(width, height)
            kwargs = dict(
                prompt=prompt,
                num_inference_steps=steps,
                height=height,
                width=width,
                guidance_scale=3.5,
                max_sequence_length=self.settings.max_sequence_length,
                generator=torch.Generator("cpu").manual_seed(int(seed or 0)),
                output_type="pil",
            )
            started = time.perf_counter()
            images, memory = self._profiled_call(kwargs)
            seconds = time.perf_counter() - started
        return Result(
            image=images[0],
            plan_text=self.plan_text(width, height),
            memory_text=f"{seconds:.2f} s for {steps} steps at {width}x{height}\n{memory}",
            seconds=seconds,
            width=width,
            height=height,
        )

    def _profiled_call(self, kwargs: dict[str, Any]) -> tuple[list[Any], str]:
        try:
            from vramkit.profiling import profile
        except ImportError:
            profile = None
        if profile is not None:
            with profile(self.pipe) as prof:
                images = self.pipe(**kwargs).images
            return images, prof.report()
        images = self.pipe(**kwargs).images
        return images, self._predicted_table()

    def _predicted_table(self) -> str:
        if self.plan is None or self.plan.predicted is None:
            return "no memory report: vramkit.profiling is not available and the plan has no prediction"
        p = self.plan.predicted
        rows = [
            "predicted by the planner (vramkit.profiling not available, nothing measured):",
            f"peak VRAM {_gib(p.peak_vram)}, peak RAM {_gib(p.peak_ram)}, {p.seconds_per_step:.3f} s/step",
            f"{'stage':<16} {'VRAM':>10} {'RAM':>10} {'seconds':>9}",
        ]
        for name, st in p.stages.items():
            rows.append(f"{name:<16} {_gib(st.vram):>10} {_gib(st.ram):>10} {st.seconds:>9.3f}")
        return "\n".join(rows)


# ------------------------------------------------------------------------------------------------
# Gradio UI
# ------------------------------------------------------------------------------------------------

_CSS = (
    "#plan textarea, #memory textarea { font-family: ui-monospace, Consolas, monospace; font-size: 12px; }\n"
    "#result img { image-rendering: pixelated; width: 256px !important; height: 256px !important;"
    " object-fit: contain; }"
)


def build_gradio(app: DemoApp) -> Any:
    """The Gradio Blocks of the demo (element ids: prompt, seed, steps, width, height, generate,
    result, plan, memory, status)."""
    import gradio as gr

    s = app.settings

    def on_generate(prompt: str, seed: float, steps: float, width: float, height: float):  # type: ignore[no-untyped-def]
        try:
            r = app.generate(prompt, seed, steps, width, height)
        except (ValueError, VramkitError) as exc:
            raise gr.Error(str(exc)) from None
        return r.image, r.plan_text, r.memory_text, f"done in {r.seconds:.2f} s"

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(f"## {TITLE}\n{app.description}. Nothing leaves this machine.")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", value="a red fox in the snow", lines=2, elem_id="prompt")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                steps = gr.Slider(1, 50, value=s.default_steps, step=1, label="Steps", elem_id="steps")
                width = gr.Slider(s.min_size, s.max_size, value=s.default_size, step=16, label="Width", elem_id="width")
                height = gr.Slider(
                    s.min_size, s.max_size, value=s.default_size, step=16, label="Height", elem_id="height"
                )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            with gr.Column(scale=1):
                image = gr.Image(label="Result", type="pil", interactive=False, height=320, elem_id="result")
        plan = gr.Textbox(label="Plan (plan.explain())", lines=16, max_lines=40, interactive=False, elem_id="plan")
        memory = gr.Textbox(label="Memory report", lines=12, max_lines=40, interactive=False, elem_id="memory")
        button.click(on_generate, [prompt, seed, steps, width, height], [image, plan, memory, status])
    return demo


def serve_gradio(app: DemoApp, port: int) -> int:
    demo = build_gradio(app)
    print(f"{TITLE}: serving with Gradio on http://{HOST}:{port}", flush=True)
    demo.launch(
        server_name=HOST,
        server_port=port,
        share=False,
        inbrowser=False,
        show_error=True,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        css=_CSS,
        footer_links=[],
        quiet=True,
    )
    return 0


# ------------------------------------------------------------------------------------------------
# Standard-library UI (no extra package)
# ------------------------------------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
 body {{ font-family: system-ui, sans-serif; margin: 1.5rem; max-width: 1100px; }}
 label {{ display: block; margin: .4rem 0 .1rem; font-weight: 600; }}
 input, textarea {{ width: 100%; box-sizing: border-box; }}
 .row {{ display: flex; gap: 2rem; }} .col {{ flex: 1; }}
 pre {{ background: #f5f5f5; padding: .6rem; overflow-x: auto; font-size: 12px; white-space: pre-wrap; }}
 #result {{ image-rendering: pixelated; width: 256px; border: 1px solid #ccc; }}
 button {{ margin-top: .8rem; padding: .5rem 1.5rem; font-size: 1rem; }}
</style></head>
<body>
<h2>{title}</h2><p>{description}. Nothing leaves this machine.</p>
<div class="row"><div class="col">
 <label for="prompt">Prompt</label><textarea id="prompt" rows="2">a red fox in the snow</textarea>
 <label for="seed">Seed</label><input id="seed" type="number" value="0">
 <label for="steps">Steps</label><input id="steps" type="number" min="1" max="50" value="{steps}">
 <label for="width">Width</label><input id="width" type="number" min="{lo}" max="{hi}" step="16" value="{size}">
 <label for="height">Height</label><input id="height" type="number" min="{lo}" max="{hi}" step="16" value="{size}">
 <button id="generate">Generate</button> <span id="status"></span>
</div><div class="col"><label>Result</label><img id="result" alt=""></div></div>
<label>Plan (plan.explain())</label><pre id="plan"></pre>
<label>Memory report</label><pre id="memory"></pre>
<script>
document.getElementById("generate").addEventListener("click", async () => {{
  const status = document.getElementById("status");
  status.textContent = "generating...";
  const body = {{}};
  for (const k of ["prompt", "seed", "steps", "width", "height"]) body[k] = document.getElementById(k).value;
  const resp = await fetch("/generate", {{method: "POST", headers: {{"Content-Type": "application/json"}},
                                         body: JSON.stringify(body)}});
  const data = await resp.json();
  if (!resp.ok) {{ status.textContent = "error: " + data.error; return; }}
  document.getElementById("result").src = data.image;
  document.getElementById("plan").textContent = data.plan;
  document.getElementById("memory").textContent = data.memory;
  status.textContent = "done in " + data.seconds.toFixed(2) + " s";
}});
</script></body></html>
"""


def _png_data_url(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_stdlib_server(app: DemoApp, port: int) -> ThreadingHTTPServer:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 serving the page (GET /) and POST /generate."""
    s = app.settings
    page = _PAGE.format(
        title=TITLE,
        description=html.escape(app.description),
        steps=s.default_steps,
        lo=s.min_size,
        hi=s.max_size,
        size=s.default_size,
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path in ("/", "/index.html"):
                self._send(200, page, "text/html; charset=utf-8")
            else:
                self._send(404, b"not found", "text/plain")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/generate":
                self._send(404, b"not found", "text/plain")
                return
            try:
                length = min(int(self.headers.get("Content-Length", 0)), 1 << 16)
                req = json.loads(self.rfile.read(length) or b"{}")
                r = app.generate(req.get("prompt", ""), req.get("seed"), req.get("steps"), req.get("width"),
                                 req.get("height"))
                out = {"image": _png_data_url(r.image), "plan": r.plan_text, "memory": r.memory_text,
                       "seconds": r.seconds, "width": r.width, "height": r.height}
                self._send(200, json.dumps(out).encode(), "application/json")
            except (ValueError, TypeError, VramkitError) as exc:
                self._send(400, json.dumps({"error": str(exc)}).encode(), "application/json")

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            print(f"{TITLE}: {self.address_string()} {format % args}", file=sys.stderr, flush=True)

    return ThreadingHTTPServer((HOST, port), Handler)


def serve_stdlib(app: DemoApp, port: int) -> int:
    server = make_stdlib_server(app, port)
    print(f"{TITLE}: serving with http.server on http://{HOST}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# ------------------------------------------------------------------------------------------------


def _gradio_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gradio") is not None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="An offline web demo of vramkit (listens on 127.0.0.1 only).")
    p.add_argument("--model-path", help="a local diffusers FLUX text-to-image folder (default: tiny offline pipeline)")
    p.add_argument("--full", action="store_true", help="use real weights: needs --model-path")
    p.add_argument("--vram", help="GPU memory budget, e.g. 8GiB (default: free VRAM; 8GiB with the tiny pipeline "
                   "on a machine without a GPU)")
    p.add_argument("--ram", help="host RAM budget (default: available RAM)")
    p.add_argument("--quality", default="auto", choices=("auto", "lossless"))
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1 (default 7860; 0 picks a free one)")
    p.add_argument("--ui", default="auto", choices=("auto", "gradio", "stdlib"),
                   help="gradio if installed (auto), or Python's http.server")
    p.add_argument("--check", action="store_true", help="no server: generate once, print plan and report, exit")
    p.add_argument("--prompt", default="a red fox in the snow", help="prompt for --check")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.full and not args.model_path:
        raise SystemExit("--full needs --model-path DIR (a local diffusers folder; nothing is downloaded)")
    if args.model_path is None:
        vram = args.vram or (None if torch.cuda.is_available() else "8GiB")
        return Settings(model_path=None, vram=vram, ram=args.ram, quality=args.quality)
    return Settings(
        model_path=args.model_path, vram=args.vram, ram=args.ram, quality=args.quality, default_steps=28,
        default_size=1024, min_size=256, max_size=1536, max_sequence_length=512,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def main(argv: list[str] | None = None) -> Result | int:
    """Start the demo (blocks until stopped; returns 0). With ``--check``: generate once without a
    server and return the :class:`Result`."""
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    pipe, description = load_pipeline(settings.model_path)
    app = DemoApp(pipe, description, settings)
    if args.check:
        result = app.generate(args.prompt, 0, settings.default_steps, settings.default_size, settings.default_size)
        print(result.plan_text)
        print(result.memory_text)
        print(f"image: {result.image.size[0]}x{result.image.size[1]}")
        return result
    port = args.port or _free_port()
    ui = args.ui
    if ui == "auto":
        ui = "gradio" if _gradio_available() else "stdlib"
        if ui == "stdlib":
            print(f"{TITLE}: gradio is not installed (pip install 'vramkit[app]'); using http.server", flush=True)
    # Plan once before serving, so the first click is as fast as the others.
    app.ensure_plan(settings.default_size, settings.default_size)
    return serve_gradio(app, port) if ui == "gradio" else serve_stdlib(app, port)


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
