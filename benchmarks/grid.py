"""Planned vs measured peaks over budgets x sizes x pipelines, with recovery, repeated calls and a
second process taking memory mid-generation (issues #3, #5, #6).

Run on the GPU machine from the repository root:

    PYTHONPATH=src:/tmp/site python3 benchmarks/grid.py --pipelines flux-dev --budgets 4,6,8,12,16,24 \
        --sizes 512x512,1024x1024,1360x768,2048x2048 --example 8:1024x1024 --repeat 20 --grab 2

One process per pipeline: the full-size pipeline (random bf16 weights, offline tokenizers) is built
once on the GPU and moved to host RAM. For each (budget, size): a ballast allocation leaves exactly
the budget free (``torch.cuda.mem_get_info`` reports it, so any overshoot is a real CUDA OOM),
``vramkit.optimize(pipe, height=..., width=...)`` plans for what the probe finds free (the user's
default path: free minus the planner's margin, quality "auto"), one call of ``--steps`` denoising
steps runs under ``vramkit.profile``, then ``vramkit.restore(pipe)`` and the ballast goes. Measured
per stage: ``max_memory_allocated`` less the ballast (the profiler resets the peak at every stage
boundary). Predicted: ``plan.predicted``. OOMs that recovery handled are listed with their events.

Options for the other questions, at one configuration each:
- ``--example B:HxW``: flux-dev only; a full 28-step call under ``vramkit.profile`` whose report
  (text), JSON and PNG timeline are written to ``$OUT`` (issue #6), and the profiler's overhead:
  unprofiled and profiled calls interleaved, medians compared.
- ``--repeat N``: N calls in a row at the example configuration; allocated and reserved VRAM, pinned
  host memory and RSS after each, and each call's time (issue #5).
- ``--grab G`` (at ``--grab-at B:HxW``): a second process allocates G GiB on the same GPU as a
  28-step call starts (the first pipeline of ``--pipelines``) and holds it; the call must finish,
  through recovery where the memory the plan counted on is gone (issue #5).

Writes ``$OUT/grid_<pipeline>.json`` (and the example files) and prints a table. ``--tiny`` runs the
harness on the tiny CPU pipeline (to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import GIB, Ballast  # noqa: E402

MODELS = {"flux-dev": "flux", "flux-fill": "fill", "flux-dev+controlnet-union": "controlnet-union"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build(model: str, tiny: bool, control_modes: int = 1) -> Any:
    if tiny:
        from vramkit.testing import tiny_pipeline

        # bf16 like the full-size runs, so the planned Precision step is a no-op that restore undoes.
        pipe = tiny_pipeline(MODELS[model]).to(torch.bfloat16)
    else:
        from vramkit.testing.full_size import full_size_flux_pipeline

        torch.manual_seed(0)
        pipe = full_size_flux_pipeline(model, device="cuda", dtype=torch.bfloat16)
        for comp in pipe.components.values():
            if isinstance(comp, torch.nn.Module):
                comp.eval()
        pipe.to("cpu")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    if control_modes > 1 and "controlnet" in model:
        from diffusers import FluxMultiControlNetModel

        # Several modes of one union ControlNet: diffusers runs the same net once per control image.
        pipe.controlnet = FluxMultiControlNetModel([pipe.controlnet])
    return pipe


def call_kwargs(model: str, height: int, width: int, steps: int, tiny: bool, control_modes: int = 1) -> dict[str, Any]:
    from vramkit.testing import tiny_call_kwargs

    kwargs = tiny_call_kwargs(MODELS[model])
    kwargs.update(num_inference_steps=steps, height=height, width=width, output_type="pt")
    if control_modes > 1 and "control_image" in kwargs:
        from vramkit.testing import tiny_call_kwargs as again

        images = [again("controlnet-union", seed=i)["control_image"] for i in range(control_modes)]
        kwargs.update(
            control_image=images,
            control_mode=[(2 * i) % 10 for i in range(control_modes)],  # canny (0), depth (2), ...
            controlnet_conditioning_scale=[0.7 / control_modes] * control_modes,
            # diffusers sizes the per-control schedule by the number of nets (one here): without one
            # entry per image, zip() silently drops every control but the first.
            control_guidance_start=[0.0] * control_modes,
            control_guidance_end=[1.0] * control_modes,
        )
    if tiny:
        return kwargs
    kwargs.pop("max_sequence_length", None)  # the model's own (512 for dev and fill)
    for key in ("image", "mask_image", "control_image"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = [im.resize((width, height)) for im in kwargs[key]]
        elif key in kwargs:
            kwargs[key] = kwargs[key].resize((width, height))
    return kwargs


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pinned_bytes() -> int | None:
    if not torch.cuda.is_available():
        return None
    try:
        stats = torch.cuda.host_memory_stats()
        return int(stats.get("allocated_bytes.current", stats.get("allocated_bytes", 0)))
    except Exception:  # noqa: BLE001 - older torch: no host statistics
        return None


def _stage_rows(prof_dict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Measured peak per stage kind (max over repeats; the profiler leaves out what the process held
    outside the pipeline when the plan was applied, i.e. the ballast); predicted from the plan."""
    out: dict[str, dict[str, Any]] = {}
    for s in prof_dict["stages"]:
        kind = s["name"]
        row = out.setdefault(kind, {"measured": 0, "seconds": []})
        if "vram_allocated_peak" in s:
            row["measured"] = max(row["measured"], s["vram_allocated_peak"])
        row["seconds"].append(s["seconds"])
        pred = (s.get("predicted") or {}).get("vram")
        if pred is not None:
            row["predicted"] = pred
    for row in out.values():
        row["seconds"] = statistics.median(row["seconds"])
    return out


def run_config(
    pipe: Any, model: str, budget_gib: float, size: tuple[int, int], args: argparse.Namespace
) -> dict[str, Any]:
    import vramkit

    h, w = size
    row: dict[str, Any] = {"pipeline": model, "budget_gib": budget_gib, "height": h, "width": w}
    ballast = Ballast(int(budget_gib * GIB))
    row["free_at_start_gib"] = torch.cuda.mem_get_info()[0] / GIB if torch.cuda.is_available() else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    kwargs_plan: dict[str, Any] = {"height": h, "width": w}
    if args.tiny:
        kwargs_plan["vram"] = f"{budget_gib}GiB"
    try:
        t0 = time.perf_counter()
        plan = vramkit.optimize(pipe, **kwargs_plan)
        sync()
        row["apply_s"] = time.perf_counter() - t0
        row["plan"] = plan.to_dict()
        row["steps"] = [f"{s.strategy!r} on {s.component}" for s in plan.steps]
        row["lossless"] = plan.lossless
        row["predicted_peak"] = plan.predicted.peak_vram
        row["predicted_s_per_step"] = plan.predicted.seconds_per_step
        row["planned_budget"] = plan.request.get("vram_budget")
        if torch.cuda.is_available():
            row["apply_peak"] = torch.cuda.max_memory_allocated() - ballast.nbytes
        t0 = time.perf_counter()
        with vramkit.profile(pipe, sample_interval=None) as prof:
            pipe(**call_kwargs(model, h, w, args.steps, args.tiny, args.control_modes))
        sync()
        row["call_s"] = time.perf_counter() - t0
        d = prof.to_dict(timeline=False)
        row["stages"] = _stage_rows(d)
        row["profiler_vram_offset"] = d.get("vram_offset")
        row["ballast"] = ballast.nbytes
        row["measured_peak"] = max(r["measured"] for r in row["stages"].values())
        row["host_rss_peak"] = d["peak"].get("ram")
        events = list(getattr(pipe, "vramkit_events", []) or [])
        row["recoveries"] = events
        row["status"] = "recovered" if events else "ok"
        # The plan in force at the end (recovery may have swapped it).
        final = vramkit.applied_plan(pipe)
        if final is not None and events:
            row["final_predicted_peak"] = final.predicted.peak_vram
    except vramkit.errors.PlanInfeasibleError as exc:
        row.update(status="infeasible", minimum_vram=getattr(exc, "minimum_vram", None), error=str(exc)[:300])
    except torch.OutOfMemoryError as exc:
        row.update(status="OOM", error=str(exc).splitlines()[0][:300])
    except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:300]}", tb=traceback.format_exc()[-1500:])
    finally:
        try:
            if vramkit.applied_plan(pipe) is not None:
                vramkit.restore(pipe)
        except Exception as exc:  # noqa: BLE001
            row["restore_error"] = f"{type(exc).__name__}: {exc}"
        gc.collect()
        if torch.cuda.is_available():
            row["peak_overall"] = torch.cuda.max_memory_allocated() - ballast.nbytes
            ballast.release()
            row["left_allocated"] = torch.cuda.memory_allocated()
    if "measured_peak" in row:
        budget = int(budget_gib * GIB)
        row["within_budget"] = row["peak_overall"] <= budget if "peak_overall" in row else None
        pred = row.get("final_predicted_peak", row["predicted_peak"])
        row["error_vs_predicted"] = (row["measured_peak"] - pred) / pred if pred else None
    return row


def example(
    pipe: Any, budget_gib: float, size: tuple[int, int], args: argparse.Namespace, out_dir: str
) -> dict[str, Any]:
    """#6: a full 28-step call profiled (report, JSON, PNG) and the profiler's overhead."""
    import vramkit

    h, w = size
    res: dict[str, Any] = {"budget_gib": budget_gib, "height": h, "width": w}
    ballast = Ballast(int(budget_gib * GIB))
    try:
        plan = vramkit.optimize(pipe, height=h, width=w, **({"vram": f"{budget_gib}GiB"} if args.tiny else {}))
        res["plan_text"] = plan.explain()
        if args.repeat:
            # First: so the first of the N calls is the first call after optimize.
            res["repeat"] = repeated(pipe, h, w, args)
        steps = 4 if args.tiny else 28
        kwargs = call_kwargs("flux-dev", h, w, steps, args.tiny)
        pipe(**call_kwargs("flux-dev", h, w, 2, args.tiny))  # warm-up
        with vramkit.profile(pipe) as prof:
            pipe(**kwargs)
        report = prof.report()
        res["report"] = report
        tag = f"{int(budget_gib)}gib_{h}x{w}"
        with open(os.path.join(out_dir, f"profile_{tag}.txt"), "w") as f:
            f.write(report + "\n")
        with open(os.path.join(out_dir, f"profile_{tag}.json"), "w") as f:
            f.write(prof.to_json())
        try:
            prof.plot(os.path.join(out_dir, f"profile_{tag}.png"))
        except Exception as exc:  # noqa: BLE001
            res["plot_error"] = f"{type(exc).__name__}: {exc}"
        print(report, flush=True)
        # Overhead: interleaved calls, medians (4 steps each: the per-call fixed costs count).
        n_steps = 2 if args.tiny else 4
        times: dict[str, list[float]] = {"unprofiled": [], "profile()": [], "sync=True": []}
        for _ in range(args.overhead_reps):
            for name in times:
                kw = call_kwargs("flux-dev", h, w, n_steps, args.tiny)
                sync()
                t0 = time.perf_counter()
                if name == "unprofiled":
                    pipe(**kw)
                else:
                    with vramkit.profile(pipe, sync=(name == "sync=True")):
                        pipe(**kw)
                sync()
                times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        res["overhead"] = {
            "steps_per_call": n_steps,
            "reps": args.overhead_reps,
            "median_seconds": med,
            "all_seconds": times,
            "relative": {k: med[k] / med["unprofiled"] - 1 for k in med if k != "unprofiled"},
        }
        log(f"profiler overhead: {res['overhead']['relative']}")
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["tb"] = traceback.format_exc()[-2000:]
    finally:
        if vramkit.applied_plan(pipe) is not None:
            vramkit.restore(pipe)
        gc.collect()
        ballast.release()
    return res


def repeated(pipe: Any, h: int, w: int, args: argparse.Namespace) -> dict[str, Any]:
    proc = psutil.Process()
    rows = []
    for i in range(args.repeat):
        sync()
        t0 = time.perf_counter()
        pipe(**call_kwargs("flux-dev", h, w, 2, args.tiny))
        sync()
        gc.collect()
        row = {"call": i, "seconds": time.perf_counter() - t0, "rss": proc.memory_info().rss, "pinned": pinned_bytes()}
        if torch.cuda.is_available():
            row.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved())
        rows.append(row)
    first = rows[0]
    later = rows[1:]
    summary: dict[str, Any] = {
        "calls": len(rows),
        "first_seconds": first["seconds"],
        "later_median_seconds": statistics.median(r["seconds"] for r in later) if later else None,
        "rss_growth_after_second": rows[-1]["rss"] - rows[1]["rss"] if len(rows) > 1 else 0,
    }
    for key in ("allocated", "reserved", "pinned"):
        if rows[-1].get(key) is not None and len(rows) > 1:
            summary[f"{key}_growth_after_second"] = rows[-1][key] - rows[1][key]
    log(f"repeated calls: {summary}")
    return {"summary": summary, "rows": rows}


_GRABBER = """
import sys, time, torch
gib = float(sys.argv[1]); delay = float(sys.argv[2])
torch.empty(1, device="cuda"); torch.cuda.synchronize()
print("READY", flush=True)
sys.stdin.readline()
time.sleep(delay)
x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
torch.cuda.synchronize()
print("GRABBED", flush=True)
time.sleep(600)
"""


def grab(pipe: Any, model: str, budget_gib: float, size: tuple[int, int], args: argparse.Namespace) -> dict[str, Any]:
    """A second process takes ``args.grab`` GiB as a 28-step call starts: the call must finish,
    through vramkit's recovery where the memory it had planned on is gone."""
    import vramkit

    h, w = size
    res: dict[str, Any] = {"gib": args.grab, "budget_gib": budget_gib, "height": h, "width": w}
    if not torch.cuda.is_available():
        res["skipped"] = "no CUDA"
        return res
    # The second process creates its CUDA context (which takes device memory) before the ballast,
    # as a process already running would have; it allocates when told to.
    child = subprocess.Popen(
        [sys.executable, "-c", _GRABBER, str(args.grab), "0"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    res["grabber_ready"] = child.stdout.readline().strip()
    ballast = Ballast(int(budget_gib * GIB))
    try:
        plan = vramkit.optimize(pipe, height=h, width=w)
        res["plan"] = [f"{s.strategy!r} on {s.component}" for s in plan.steps]
        res["predicted_peak"] = plan.predicted.peak_vram
        # As in a fresh process: nothing cached by the allocator from earlier calls.
        torch.cuda.empty_cache()
        child.stdin.write("go\n")
        child.stdin.flush()
        t0 = time.perf_counter()
        out = pipe(**call_kwargs(model, h, w, 28, args.tiny, args.control_modes))
        sync()
        res["seconds"] = time.perf_counter() - t0
        res["image_shape"] = list(out.images.shape)
        res["image_finite"] = bool(torch.isfinite(out.images.float()).all())
        res["events"] = list(getattr(pipe, "vramkit_events", []) or [])
        res["status"] = "recovered" if res["events"] else "ok (no OOM happened)"
        final = vramkit.applied_plan(pipe)
        res["final_plan"] = [f"{s.strategy!r} on {s.component}" for s in final.steps] if final else None
    except Exception as exc:  # noqa: BLE001
        res["status"] = "failed"
        res["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        res["tb"] = traceback.format_exc()[-1500:]
    finally:
        child.kill()
        child.wait()
        res["grabber_output"] = (child.stdout.read() or "")[-300:]
        if vramkit.applied_plan(pipe) is not None:
            vramkit.restore(pipe)
        gc.collect()
        ballast.release()
    log(f"grab: {res.get('status')} {res.get('error', '')}")
    return res


def environment() -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "command": "python3 " + " ".join(sys.argv),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["total_vram_gib"] = torch.cuda.mem_get_info()[1] / GIB
    env["host_ram_gib"] = psutil.virtual_memory().total / GIB
    return env


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'pipeline':<26} {'budget':>6} {'size':>10} {'status':<10} {'pred GiB':>8} {'meas GiB':>8} "
        f"{'err':>6} {'<=B':>4} {'s/call':>7}"
    )
    for r in rows:
        pred = r.get("final_predicted_peak", r.get("predicted_peak"))
        meas = r.get("measured_peak")
        err = r.get("error_vs_predicted")
        print(
            f"{r['pipeline']:<26} {r['budget_gib']:>6g} {r['height']:>4}x{r['width']:<5} {r.get('status', '?'):<10} "
            f"{(pred or 0) / GIB:>8.2f} {(meas or 0) / GIB:>8.2f} "
            f"{(f'{err * 100:+.0f}%' if err is not None else ''):>6} {str(r.get('within_budget', '')):>4} "
            f"{r.get('call_s', float('nan')):>7.2f}"
        )


def parse_size(s: str) -> tuple[int, int]:
    a, _, b = s.partition("x")
    return int(a), int(b or a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipelines", default="flux-dev")
    p.add_argument("--budgets", default="4,6,8,12,16,24")
    p.add_argument("--sizes", default="512x512,1024x1024,1360x768,2048x2048")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--example", default=None, help="B:HxW, e.g. 8:1024x1024 (flux-dev only)")
    p.add_argument("--overhead-reps", type=int, default=3)
    p.add_argument("--repeat", type=int, default=0)
    p.add_argument("--grab", type=float, default=0.0, help="GiB a second process takes mid-call")
    p.add_argument("--grab-at", default="12:2048x2048", help="B:HxW of the --grab run")
    p.add_argument("--control-modes", type=int, default=1, help="union ControlNet modes per call (controlnet only)")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args()
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    import vramkit  # noqa: F401 - fail early if the path is wrong

    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    for model in args.pipelines.split(","):
        t_start = time.perf_counter()
        log(f"building {model}")
        pipe = build(model, args.tiny, args.control_modes)
        result: dict[str, Any] = {"environment": environment(), "pipeline": model, "steps": args.steps, "rows": []}
        if "controlnet" in model:
            result["control_modes"] = args.control_modes
        path = os.path.join(out_dir, f"grid_{model.replace('+', '_')}{'_tiny' if args.tiny else ''}.json")
        if args.example and model == "flux-dev":
            b, _, s = args.example.partition(":")
            log(f"example report at {b} GiB, {s}")
            result["example"] = example(pipe, float(b), parse_size(s), args, out_dir)
        if args.grab and model == args.pipelines.split(",")[0]:
            b, _, s = args.grab_at.partition(":")
            log(f"second process takes {args.grab} GiB at {b} GiB, {s} ({model})")
            result["grab"] = grab(pipe, model, float(b), parse_size(s), args)
        for budget in budgets:
            for size in sizes:
                row = run_config(pipe, model, budget, size, args)
                result["rows"].append(row)
                pred = row.get("predicted_peak") or 0
                log(
                    f"{model} {budget:g} GiB {size[0]}x{size[1]}: {row.get('status')} pred {pred / GIB:.2f} "
                    f"meas {(row.get('measured_peak') or 0) / GIB:.2f} GiB {row.get('error', '')[:160]}"
                )
                result["wall_s"] = time.perf_counter() - t_start
                with open(path, "w") as f:
                    json.dump(result, f, indent=1, default=str)
        print_table(result["rows"])
        log(f"wrote {path}")
        del pipe
        gc.collect()


if __name__ == "__main__":
    main()
