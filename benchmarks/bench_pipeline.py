"""Whole FLUX pipelines under simulated small cards: vramkit against diffusers' built-in options.

Run on the GPU machine from the repository root (one fresh process per configuration, so hooks and
caches of one never inflate the peaks of the next):

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_pipeline.py --size 1024 --budgets 8,12

Peers (``--configs ...,diffusers-mm,diffusers-dynamic-offloader,mmgp,mmgp-int8``) need their wheels in
/tmp/site: diffusers-mm 0.4.0, diffusers-dynamic-offloader 0.1.0rc2, mmgp 3.8.2 and optimum-quanto 0.2.7
(``pip download --no-deps`` into ``.whl/``, installed there with ``pip install --no-deps --target``).

Each configuration builds the full-size FLUX.1-dev pipeline (T5-XXL, CLIP-L, transformer, VAE) with
random bf16 weights on the GPU, moves it to host RAM, allocates a ballast so that
``torch.cuda.mem_get_info()`` reports exactly the budget as free (any overshoot is a real CUDA OOM),
applies the option, and times a 2-step and an N-step call. s/step is the mean gap between the
ends of consecutive steps of the N-step call (CUDA events recorded from ``callback_on_step_end``:
every step after the first, a slow one included, free of per-call costs; the median is kept as
``seconds_per_step_median``); s/image is the N-step call plus 28-N steps at that rate. The
difference of the two calls over N-2 steps (what results before 2026-12-06 report as s/step) is kept
as ``seconds_per_step_difference``. Peak VRAM is ``max_memory_allocated`` minus the ballast,
peak host RAM the process RSS sampled every 50 ms. ``--tiny`` runs the same harness on the tiny CPU
pipeline (to check the harness, not to measure). Writes ``$OUT/pipeline_<size>.json`` and prints a table.

A device call is limited in time, so one run per resolution may need several calls on the same
machine: with ``--deadline 540`` no configuration starts that the slowest so far would not finish
by 540 s and none runs past it (one cut short is recorded as ``cut`` and runs again), and the next
call continues with ``--resume <the file the last call wrote>`` (carried into the working tree),
skipping what was measured; the file lists every call's command under ``commands``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import psutil
import torch
from render_tables import floor_seconds

GIB = 2**30
CONFIGS = {
    "unoptimized": "pipe.to('cuda'): everything resident",
    "vramkit": "vramkit.optimize(pipe, quality='lossless')",
    "vramkit-fp8": "vramkit.optimize(pipe, quality='auto')",
    "vramkit-fp8-compile": "vramkit.optimize(pipe, quality='auto', compile=True)",
    "diffusers-leaf-stream": "group offload, leaf level, stream",
    "diffusers-leaf-stream-fp8": "group offload, leaf level, stream + fp8 layerwise casting",
    "diffusers-block-stream": "group offload, block level, stream",
    "diffusers-block-stream-fp8": "group offload, block level, stream + fp8 layerwise casting",
    "diffusers-model-offload": "enable_model_cpu_offload",
    "diffusers-sequential": "enable_sequential_cpu_offload",
    # Peers from PyPI, installed for the benchmark only (wheels carried to the GPU machine):
    "diffusers-mm": "diffusers-mm 0.4.0: diffusers_mm.managed(pipe)",
    "diffusers-dynamic-offloader": "diffusers-dynamic-offloader 0.1.0rc2: enable_pipeline_offload(pipe, preset='auto')",
    "mmgp": "mmgp 3.8.2: offload.profile(pipe, profile_type.HighRAM_LowVRAM, quantizeTransformer=False)",
    "mmgp-int8": "mmgp 3.8.2: offload.profile(pipe, profile_type.HighRAM_LowVRAM) (int8 transformer, its default)",
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class RssSampler:
    def __init__(self, interval: float = 0.05) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._interval = interval

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def build(tiny: bool) -> Any:
    if tiny:
        from vramkit.testing import tiny_pipeline

        return tiny_pipeline("flux")
    from vramkit.testing.full_size import full_size_flux_pipeline

    torch.manual_seed(0)
    pipe = full_size_flux_pipeline("flux-dev", device="cuda", dtype=torch.bfloat16)
    pipe.to("cpu")
    torch.cuda.empty_cache()
    return pipe


def apply_config(pipe: Any, config: str, device: str) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if config.startswith("vramkit"):
        import vramkit

        quality = "lossless" if config == "vramkit" else "auto"
        extra = {"compile": True} if config.endswith("-compile") else {}
        plan = vramkit.optimize(pipe, quality=quality, height=ARGS.size, width=ARGS.size, **extra)
        info["plan"] = plan.to_dict()
        info["plan_text"] = plan.explain()
        info["transformer_streamed_bytes"] = streamed_bytes(plan)
        return info
    if config == "unoptimized":
        pipe.to(device)
        return info
    if config.startswith("diffusers-leaf") or config.startswith("diffusers-block"):
        level = "leaf_level" if "leaf" in config else "block_level"
        if config.endswith("fp8"):
            pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        kwargs: dict[str, Any] = dict(onload_device=torch.device(device), offload_device=torch.device("cpu"),
                                      offload_type=level, use_stream=device != "cpu")
        if level == "block_level":
            kwargs["num_blocks_per_group"] = 1
        from diffusers.hooks import apply_group_offloading

        for name in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            apply_group_offloading(getattr(pipe, name), **kwargs)
        return info
    if config == "diffusers-model-offload":
        pipe.enable_model_cpu_offload(device=device)
        return info
    if config == "diffusers-sequential":
        pipe.enable_sequential_cpu_offload(device=device)
        return info
    if config == "diffusers-mm":
        from diffusers_mm import managed

        managed(pipe, device=device)
        return info
    if config == "diffusers-dynamic-offloader":
        from diffusers_dynamic_offloader import enable_pipeline_offload

        enable_pipeline_offload(pipe, preset="auto", execution_device=device)
        return info
    if config in ("mmgp", "mmgp-int8"):
        from mmgp import offload, profile_type

        offload.profile(pipe, profile_type.HighRAM_LowVRAM, quantizeTransformer=config == "mmgp-int8")
        return info
    raise SystemExit(f"unknown config {config}")


def streamed_bytes(plan: Any) -> int:
    """Bytes of the transformer that ``plan`` streams per step (0 when it keeps it whole), from the
    engine's layout of the same architecture on the meta device (no memory)."""
    step = next((st for st in plan.steps if st.name == "BlockStreaming" and "transformer" in
                 (st.strategy.components or ())), None)
    if step is None:
        return 0
    from vramkit.engine import compute_layout
    from vramkit.memory.architectures import build_architecture

    model = build_architecture("flux-dev", device="meta", dtype=torch.bfloat16)
    strategy = step.strategy
    layout = compute_layout(model, strategy.resident, strategy.prefetch, strategy.storage,
                            unit=getattr(strategy, "unit", "block"))
    return int(layout.streamed_nbytes)


class StepClock:
    """When each denoising step ends, from ``callback_on_step_end``: a CUDA event recorded on the
    current stream (no host synchronization, so streaming engines keep running ahead), or a host
    timestamp on CPU. The gaps between consecutive step ends are the steady-state step times,
    free of the per-call costs (text encoding, decode, an option's own per-call set-up) that a
    difference of two calls mixes in."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: list[Any] = []

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return callback_kwargs

    def gaps(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def call(pipe: Any, steps: int, tiny: bool, clock: StepClock | None = None) -> float:
    kwargs: dict[str, Any] = dict(prompt="a red fox in the snow", num_inference_steps=steps, guidance_scale=3.5,
                                  height=ARGS.size, width=ARGS.size, output_type="pt",
                                  generator=torch.Generator("cpu").manual_seed(0))
    if tiny:
        kwargs.update(max_sequence_length=16)
    if clock is not None:
        kwargs["callback_on_step_end"] = clock
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(**kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def run_one(config: str, budget_gib: float) -> dict[str, Any]:
    tiny = ARGS.tiny
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    result: dict[str, Any] = {"config": config, "budget_gib": budget_gib, "description": CONFIGS[config]}
    pipe = build(tiny)
    ballast = None
    if device == "cuda":
        torch.cuda.synchronize()
        free = torch.cuda.mem_get_info()[0]
        extra = free - int(budget_gib * GIB) if budget_gib > 0 else 0  # budget 0: the whole GPU (reference)
        if budget_gib <= 0:
            from vramkit.memory.probe import measure_h2d_bandwidth

            result["pinned_bandwidth"] = measure_h2d_bandwidth("cuda")
        if extra > 0:
            ballast = torch.empty(extra, dtype=torch.uint8, device="cuda")
        result["free_after_ballast"] = torch.cuda.mem_get_info()[0]
        torch.cuda.reset_peak_memory_stats()
    ballast_bytes = ballast.numel() if ballast is not None else 0
    with RssSampler() as rss:
        try:
            t0 = time.perf_counter()
            result.update(apply_config(pipe, config, device))
            result["apply_seconds"] = time.perf_counter() - t0
            call(pipe, 2, tiny)  # warm-up (first-call costs: cuDNN autotune, pinning, lazy init)
            graphs_before = _graphs_compiled()
            t_lo = call(pipe, 2, tiny)
            clock = StepClock(device == "cuda")
            try:
                t_hi = call(pipe, ARGS.steps, tiny, clock)
            except TypeError as exc:
                if "callback" not in str(exc):
                    raise
                # An option whose wrapper does not pass callback_on_step_end on: time it by difference.
                clock = StepClock(device == "cuda")
                t_hi = call(pipe, ARGS.steps, tiny)
            # Graphs compiled after the warm-up call: 0 unless something recompiles per call or step.
            result["graphs_compiled_while_measuring"] = _graphs_compiled() - graphs_before
            difference = (t_hi - t_lo) / (ARGS.steps - 2)
            gaps = clock.gaps()
            # The mean step gap when the pipeline called back every step (the mean, not the median:
            # a step that is slow every so often is part of the cost); else the difference of the
            # two calls (what results before 2026-12-06 used: fragile where per-call costs vary).
            per_step = statistics.fmean(gaps) if len(gaps) >= 2 else difference
            result.update(status="ok", seconds_2_steps=t_lo, seconds_n_steps=t_hi, n_steps=ARGS.steps,
                          step_seconds=gaps, seconds_per_step_difference=difference,
                          seconds_per_step_median=statistics.median(gaps) if gaps else None,
                          step_timing="step events" if len(gaps) >= 2 else "difference",
                          seconds_per_step=per_step,
                          # The N-step call as measured (every per-call cost included) plus the
                          # remaining steps at the steady rate.
                          seconds_per_image_28=t_hi + (28 - ARGS.steps) * per_step)
        except torch.OutOfMemoryError as exc:
            result.update(status="OOM", error=str(exc).splitlines()[0][:300])
        except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
            result.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    result["peak_host_rss_gib"] = rss.peak / GIB
    if device == "cuda":
        result["peak_vram_gib"] = (torch.cuda.max_memory_allocated() - ballast_bytes) / GIB
        result["peak_reserved_gib"] = (torch.cuda.max_memory_reserved() - ballast_bytes) / GIB
        events = getattr(pipe, "vramkit_events", None)
        if events:
            result["recoveries"] = list(events)
    return result


def environment() -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "python": platform.python_version(), "command": " ".join(sys.argv)}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["total_vram_gib"] = torch.cuda.mem_get_info()[1] / GIB
    env["host_ram_gib"] = psutil.virtual_memory().total / GIB
    return env


def print_table(results: list[dict[str, Any]]) -> None:
    best: dict[float, float] = {}
    for r in results:
        if r.get("status") == "ok" and r["config"].startswith("diffusers"):
            b = r["budget_gib"]
            best[b] = min(best.get(b, float("inf")), r["seconds_per_step"])
    print(f"{'budget':>6} {'config':<28} {'status':<6} {'s/step':>7} {'s/img28':>8} {'VRAM':>6} {'RSS':>6} "
          f"{'L(B)':>6} {'ratio':>6} {'vs best diffusers':>18}")
    for r in results:
        ok = r.get("status") == "ok"
        b = r["budget_gib"]
        speed = f"{best[b] / r['seconds_per_step']:.2f}x" if ok and b in best and r["seconds_per_step"] > 0 else ""
        floor = floor_seconds(results, r) if ok else None
        lb = f"{floor:.3f}" if floor else ""
        ratio = f"{r['seconds_per_step'] / floor:.2f}" if floor else ""
        print(f"{b:>6} {r['config']:<28} {r.get('status', '?'):<6} "
              f"{r.get('seconds_per_step', float('nan')):>7.3f} {r.get('seconds_per_image_28', float('nan')):>8.2f} "
              f"{r.get('peak_vram_gib', float('nan')):>6.2f} {r.get('peak_host_rss_gib', float('nan')):>6.1f} "
              f"{lb:>6} {ratio:>6} {speed:>18}")


#: Outcomes a resumed run does not repeat (a crash or an error is tried again).
_FINAL = ("ok", "OOM", "timeout")


def resumed(path: str) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows and commands of an earlier run to continue; refuses a file from another GPU or size."""
    with open(path) as f:
        data = json.load(f)
    env = environment()
    if data.get("environment", {}).get("device") != env.get("device"):
        raise SystemExit(f"--resume {path}: measured on {data.get('environment', {}).get('device')!r}, this is "
                         f"{env.get('device')!r}; ratios hold only within one GPU. Start a new file.")
    if data.get("size") != ARGS.size:
        raise SystemExit(f"--resume {path}: a {data.get('size')}² run, this is --size {ARGS.size}.")
    rows = [r for r in data["results"] if r.get("status") == "ok"]
    if any(r.get("n_steps") != ARGS.steps for r in rows):
        raise SystemExit(f"--resume {path}: its rows were measured with another --steps; use --steps "
                         f"{rows[0].get('n_steps')} or start a new file.")
    if any("step_timing" not in r for r in rows):
        raise SystemExit(f"--resume {path}: its rows were timed by the difference of two calls (before "
                         "2026-12-06); rows timed from step events must not be mixed with them. Start a new file.")
    commands = list(data.get("commands") or [data["environment"]["command"]])
    return list(data["results"]), commands


def write_payload(path: str, results: list[dict[str, Any]], commands: list[str]) -> None:
    env = environment()
    payload = {"environment": env, "size": ARGS.size, "results": results,
               "commands": [*commands, env["command"]]}
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--budgets", default="8,12")
    p.add_argument("--configs", default="vramkit,vramkit-fp8,diffusers-leaf-stream,diffusers-leaf-stream-fp8")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    p.add_argument("--tiny", action="store_true", help="check the harness on the tiny CPU pipeline")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="first run the unoptimized pipeline on the whole GPU (resident s/step and pinned "
                        "bandwidth: the inputs of L(B))")
    p.add_argument("--resume", metavar="JSON",
                   help="continue a run: keep that file's rows, skip the configurations it already measured "
                        "(ok, OOM or timeout; the reference too), append the rest (one run spread over several "
                        "calls on the same GPU; a file from another GPU is refused)")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="start no configuration that the slowest so far (at least 90 s) would not finish "
                        "within this many seconds of the start, and cut any that runs past it (recorded as "
                        "'cut', run again on --resume), so that a time-limited call ends with its rows written")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    if ARGS.one:
        print("RESULT " + json.dumps(run_one(ARGS.one, ARGS.budget)), flush=True)
        return
    results: list[dict[str, Any]] = []
    commands: list[str] = []
    env_vars = dict(os.environ)
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"pipeline_{ARGS.size}{'_tiny' if ARGS.tiny else ''}.json")
    if ARGS.resume:
        if not os.path.exists(ARGS.resume):
            raise SystemExit(f"--resume {ARGS.resume}: no such file (a mistyped path would silently start over).")
        results, commands = resumed(ARGS.resume)
    runs = [(0.0, "unoptimized")] if ARGS.reference else []
    runs += [(float(b), c) for b in ARGS.budgets.split(",") for c in ARGS.configs.split(",")]
    done = {(r["budget_gib"], r["config"]) for r in results if r.get("status") in _FINAL}
    skipped = [(b, c) for b, c in runs if (b, c) in done]
    runs = [(b, c) for b, c in runs if (b, c) not in done]
    if skipped:
        log(f"resuming {ARGS.resume}: {len(skipped)} configuration(s) already measured, {len(runs)} to go")
    # A crashed or failed row of a configuration that runs again is replaced, not kept beside it.
    to_run = set(runs)
    results = [r for r in results if (r["budget_gib"], r["config"]) not in to_run]
    slowest = 0.0
    for budget, config in runs:
        elapsed = time.perf_counter() - _STARTED
        timeout = ARGS.timeout
        if ARGS.deadline is not None:
            # A configuration is given at most the time left (a longer one is cut and recorded as
            # such, to run again on --resume), and none starts that the slowest so far would not finish.
            timeout = min(timeout, int(ARGS.deadline - elapsed))
        if ARGS.deadline is not None and elapsed + max(slowest, 90.0) > ARGS.deadline:
            left = runs[runs.index((budget, config)):]
            log(f"deadline: {len(left)} configuration(s) not started: " + ", ".join(f"{b:g} {c}" for b, c in left))
            break
        log(f"budget {budget} GiB, {config}")
        t_config = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", config, "--budget", str(budget), "--size", str(ARGS.size),
               "--steps", str(ARGS.steps)] + (["--tiny"] if ARGS.tiny else [])
        env = dict(env_vars)
        if "block" in config:
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if lines:
                results.append(json.loads(lines[-1][7:]))
            else:
                results.append({"config": config, "budget_gib": budget, "status": "crashed",
                                "error": proc.stderr[-800:]})
        except subprocess.TimeoutExpired:
            cut = timeout < ARGS.timeout
            # "cut" (by the deadline) is not final: --resume runs that configuration again.
            results.append({"config": config, "budget_gib": budget, "status": "cut" if cut else "timeout",
                            "timeout_s": timeout})
        slowest = max(slowest, time.perf_counter() - t_config)
        log(f"  -> {results[-1].get('status')} {results[-1].get('seconds_per_step', '')}")
        # Written after every configuration: a run cut short still leaves what it measured.
        write_payload(path, results, commands)
    write_payload(path, results, commands)  # also when the deadline or --resume left nothing to run
    print_table(results)
    print(f"wrote {path}")


ARGS: argparse.Namespace
#: When this process started: --deadline counts from here (imports and loading a resumed file included).
_STARTED = time.perf_counter()
if __name__ == "__main__":
    main()
