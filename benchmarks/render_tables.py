"""Render the committed benchmark JSON under benchmarks/results as Markdown tables.

    python benchmarks/render_tables.py > benchmarks/results/TABLES.md

Only what the JSON holds is printed: every table names the GPU, versions and command it came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def streaming(data: dict[str, Any]) -> list[str]:
    out = [
        f"### Transformer step with block streaming, {data['size']}² ({data['device']}, torch {data['torch']}, "
        f"diffusers {data['diffusers']})",
        "",
        f"Command: `{data['command']}`. Resident (all weights on the GPU): "
        f"{data['resident']['s_per_step']:.3f} s/step; "
        f"pinned host-to-device {data['bandwidth']['gbps']:.1f} GB/s. L(B) = max(resident compute, streamed bytes / "
        "bandwidth); the fp8 rows' L(B) uses the bf16 compute time.",
        "",
        "| budget GiB | storage | prefetch | resident blocks | streamed GB | s/step | L(B) | ratio | peak GiB "
        "| output |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        if "s_per_step" not in r:
            why = r.get("error", "failed")[:60]
            out.append(f"| {r['budget_gib']:g} | {r['storage']} | {r.get('prefetch', 1)} | | | {why} | | | | |")
            continue
        exact = (
            "bit-identical"
            if r.get("bit_identical")
            else (f"rel. L2 {r['rel_l2_err']:.1e}" if "rel_l2_err" in r else "differs")
        )
        # Rows streamed by parts (bench_streaming.py --unit part) count parts, not blocks.
        resident = r["resident_blocks"] if r.get("unit", "block") == "block" else f"{r['resident_blocks']} parts"
        out.append(
            f"| {r['budget_gib']:g} | {r['storage']} | {r.get('prefetch', 1)} | {resident} | "
            f"{r['streamed_gb']:.1f} | "
            f"{r['s_per_step']:.3f} | {r['L_B']:.3f} | {r['ratio']:.2f} | {r['peak_alloc_gib']:.2f} | {exact} |"
        )
    return out


def reference(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The run's unoptimized reference row (whole GPU), where it was measured."""
    return next((x for x in results if x["config"] == "unoptimized" and x["budget_gib"] <= 0
                 and x.get("status") == "ok"), None)


def transformer_storage(r: dict[str, Any]) -> str | None:
    """The storage format a vramkit row's plan gives the transformer's blocks (``None``: as loaded)."""
    for step in (r.get("plan") or {}).get("steps") or ():
        if step.get("component") == "transformer" and step.get("strategy") == "BlockStreaming":
            return (step.get("config") or {}).get("storage")
    return None


def resident_seconds(results: list[dict[str, Any]], storage: str | None) -> float | None:
    """The compute term of L(B) for ``storage``, measured in the same run: the unoptimized reference's
    s/step for the weights as loaded; for a re-encoded storage (fp8, int8) the fastest row whose plan
    keeps every transformer block resident in that storage (it streams nothing, so its step is that
    storage's compute, the per-step decode included), or None where the run has no such row."""
    if storage is None:
        ref = reference(results)
        return ref["seconds_per_step"] if ref is not None else None
    steps = [x["seconds_per_step"] for x in results if x.get("status") == "ok"
             and x.get("transformer_streamed_bytes") == 0 and transformer_storage(x) == storage]
    return min(steps) if steps else None


def floor_seconds(results: list[dict[str, Any]], r: dict[str, Any]) -> float | None:
    """L(B) of a vramkit row: max(the resident s/step of its transformer storage measured in the same
    run, the transformer bytes its plan streams per step / the pinned bandwidth measured in the
    reference run). Where the run has no all-resident row of a re-encoded storage, its compute term is
    the reference's (weights as loaded): a lower bound. None without a reference."""
    ref = reference(results)
    if ref is None or "transformer_streamed_bytes" not in r or not ref.get("pinned_bandwidth"):
        return None
    compute = resident_seconds(results, transformer_storage(r)) or ref["seconds_per_step"]
    return max(compute, r["transformer_streamed_bytes"] / ref["pinned_bandwidth"])


#: diffusers' own options (group offload, model and sequential offload): the "fastest diffusers
#: built-in" columns compare with these only, not with the peers (diffusers-mm, ...) from PyPI.
_BUILTINS = ("diffusers-leaf", "diffusers-block", "diffusers-model-offload", "diffusers-sequential")


def below_floor(r: dict[str, Any], floor: float | None) -> bool:
    """Whether a row ran more than 5% faster than its L(B): no row can beat the floor, so the row or
    an input of L(B) measured in the same run (the reference step, the compute term, the bandwidth)
    was mis-measured."""
    return bool(floor) and r["seconds_per_step"] < 0.95 * floor  # type: ignore[operator]


def slowed(r: dict[str, Any]) -> bool:
    """Whether the GPU was slowed while the row was measured (its ``gpu_state``, sampled by
    bench_pipeline.py from nvidia-smi): a thermal or hardware slowdown or a power brake; the power
    cap where the median SM clock also fell below 90% of its maximum (at full load the cap is often
    active without slowing the GPU much); or another process computing on it."""
    state = r.get("gpu_state") or {}
    reasons = state.get("slowdowns") or {}
    median, top = state.get("sm_clock_mhz_median"), state.get("sm_clock_mhz_max")
    clock_fell = median is not None and top is not None and median < 0.9 * top
    return (any(name != "power cap" for name in reasons) or ("power cap" in reasons and clock_fell)
            or state.get("gpu_processes", 1) > 1)


def _builtin(config: str) -> bool:
    return config.startswith(_BUILTINS)


def _predicts_allocated(plan: dict[str, Any]) -> bool:
    """Whether the plan's predicted peaks are allocated memory (the planner says so in a note since
    it stopped reporting the peak padded with its allocator reserve)."""
    return any(str(n).startswith("predicted peaks are allocated memory") for n in plan.get("notes") or ())


def _commands_text(data: dict[str, Any]) -> str:
    commands = data.get("commands") or [data["environment"]["command"]]
    if len(commands) == 1:
        return f"Command: `{commands[0]}`; "
    # A run resumed on another machine of the same GPU model (the harness refuses another model) says
    # how many machines in its "machines" field.
    machines = int(data.get("machines", 1))
    where = "one machine" if machines == 1 else f"{machines} machines of one GPU model"
    return f"Commands (one run over {len(commands)} calls on {where}, resumed): " + "; ".join(
        f"`{c}`" for c in commands
    ) + "; "


def _timing_text(results: list[dict[str, Any]]) -> str:
    ok = [r for r in results if r.get("status") == "ok"]
    events = [r for r in ok if r.get("step_timing") == "step events"]
    text = ""
    if events:
        text += ("s/step is the mean gap between consecutive step ends of an N-step call (CUDA events from "
                 "callback_on_step_end); s/image is that call plus the remaining steps to 28 at that rate (text "
                 "encoding, VAE decode and every per-call cost included)")
    if len(events) < len(ok):
        text += ("; rows marked † were timed by difference" if events else "s/step from the difference of a 2-step "
                 "and an N-step call; s/image extrapolated to 28 steps (text encoding and VAE decode included)")
    return text + ". "


def pipeline(data: dict[str, Any]) -> list[str]:
    env = data["environment"]
    out = [
        f"### Whole FLUX.1-dev pipeline, {data['size']}² ({env.get('device', '?')}, torch {env['torch']}, "
        f"diffusers {env['diffusers']})",
        "",
        _commands_text(data)
        + f"code: {data.get('code_state', 'not recorded')}. "
        + (f"Note: {data['note']}. " if data.get("note") else "")
        + _timing_text(data["results"])
        + "Peaks exclude the ballast. "
        "'planned for' is the VRAM the planner used after its safety margin: where it is far below the budget, "
        "the run predates the fix that made the margin a share of the free memory rather than of the device. "
        "'predicted allocated' is the planner's predicted peak of allocated memory and 'with reserve' that "
        "plus its allocator reserve (5% + 384 MiB); plans from before the planner reported allocated memory "
        "recorded the padded figure, and the allocated one is derived from it.",
        "",
        "| budget GiB | option | s/step | s/image (28) | peak VRAM GiB | peak host RSS GiB | planned for GiB | "
        "predicted s/step | predicted peak GiB (with reserve) | predicted allocated GiB | L(B) | ratio to L(B) "
        "| per step vs fastest diffusers built-in (same numerics) | per image, same |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = reference(data["results"])
    if ref is not None:
        fp8 = resident_seconds(data["results"], "fp8")
        fp8_term = (f"{fp8:.3f} s/step, the fastest fp8 row of this run that keeps every block resident (it "
                    "streams nothing; its per-step fp8 decode included)" if fp8 is not None
                    else "the bf16 one (this run has no all-resident fp8 row): a lower bound")
        out[4:4] = [
            f"Reference (same run, whole GPU, unoptimized): {ref['seconds_per_step']:.3f} s/step resident, pinned "
            f"host-to-device {ref['pinned_bandwidth'] / 1e9:.1f} GB/s. L(B) = max(that s/step, transformer bytes the "
            "row's plan streams per step / that bandwidth); for a row whose plan stores the transformer's blocks in "
            f"fp8 the compute term is {fp8_term}. Budget 0 = the whole GPU.",
            "",
        ]
    # Each row's L(B), once: the flags below and the table both read it.
    floors = {id(r): floor_seconds(data["results"], r) for r in data["results"] if r.get("status") == "ok"}
    flagged = [r for r in data["results"] if r.get("status") == "ok" and r.get("seconds_per_step", 0) > 0
               and (slowed(r) or below_floor(r, floors[id(r)]))]
    if flagged:
        out.insert(4, "Rows marked § were measured while nvidia-smi reported a thermal or hardware slowdown, a "
                   "power cap with the median SM clock below 90% of its maximum, or another process on the GPU; "
                   "ratios marked ‡ are below 0.95: no row can run faster than its floor, so the row or an input "
                   "of L(B) measured in the same run (the reference step, the fp8 compute term, the bandwidth) "
                   "was mis-measured: not a speed to read.\n")
    # Like with like: lossless rows against diffusers' lossless options, fp8 rows against its fp8 ones.
    best_step: dict[tuple[float, bool], float] = {}
    best_image: dict[tuple[float, bool], float] = {}
    for r in data["results"]:
        if r.get("status") == "ok" and _builtin(r["config"]) and r["seconds_per_step"] > 0:
            key = (r["budget_gib"], "fp8" in r["config"])
            best_step[key] = min(best_step.get(key, float("inf")), r["seconds_per_step"])
            best_image[key] = min(best_image.get(key, float("inf")), r["seconds_per_image_28"])
    # Where some rows were timed from step events, the rows timed by difference are marked.
    timed_by_events = any(r.get("step_timing") == "step events" for r in data["results"])
    results = data["results"]
    if any("harness" in r for r in results):
        # A grid run: every option of a budget together (rows are written in the order measured).
        results = sorted(results, key=lambda r: r["budget_gib"])
        out.insert(4, "Rows marked ◦ were measured in one process per option, at every budget from the largest down "
                   "(options that never read the free memory; the ballast resized to the budget less what the option "
                   "holds between calls); 'OOM below' rows were not run: the same option ran out of memory at the "
                   "larger budget named. Every other row is a process of its own.\n")
    for r in results:
        if r.get("status") != "ok":
            status = r.get("status")
            if r.get("oom_implied_by") is not None:
                status = f"OOM below {r['oom_implied_by']:g} GiB (not run)"
            elif status == "OOM" and str(r.get("error", "")).startswith("the option holds"):
                status = "OOM: " + r["error"]
            elif status == "error" and r.get("error"):
                status = "error: " + str(r["error"]).splitlines()[0][:80].replace("|", "/")
            out.append(f"| {r['budget_gib']:g} | {r['config']} | {status} | | | | | | | | | | | |")
            continue
        b = r["budget_gib"]
        if r["seconds_per_step"] <= 0:
            # The N-step call took less than the 2-step one: this option's per-call time varies more
            # than the steps take, so neither figure means anything.
            out.append(
                f"| {b:g} | {r['config']} | n/a ({r['seconds_2_steps']:.1f} s for 2 steps, "
                f"{r['seconds_n_steps']:.1f} s for {r['n_steps']}) | | {r['peak_vram_gib']:.2f} | "
                f"{r['peak_host_rss_gib']:.1f} | | | | | | | | |"
            )
            continue
        plan = r.get("plan") or {}
        pred = plan.get("predicted") or {}
        planned = plan.get("request", {}).get("vram_budget")
        pf = f"{planned / 2**30:.2f}" if planned else ""
        ps = f"{pred['seconds_per_step']:.3f}" if pred else ""
        pp = pa = ""
        if pred:
            reserve = 384 * 2**20
            if _predicts_allocated(plan):
                allocated = pred["peak_vram"]
                padded = allocated * 1.05 + reserve
            else:
                # Runs before the planner reported allocated memory recorded the padded peak; the
                # allocated estimate inside it is (padded - 384 MiB) / 1.05 (the allocator reserve).
                padded = pred["peak_vram"]
                allocated = (padded - reserve) / 1.05
            pp, pa = f"{padded / 2**30:.2f}", f"{allocated / 2**30:.2f}"
        key = (b, "fp8" in r["config"])
        step_x = f"{best_step[key] / r['seconds_per_step']:.2f}x" if key in best_step else ""
        image_x = f"{best_image[key] / r['seconds_per_image_28']:.2f}x" if key in best_image else ""
        floor = floors[id(r)]
        lb, ratio = (f"{floor:.3f}", f"{r['seconds_per_step'] / floor:.2f}") if floor else ("", "")
        if below_floor(r, floor):
            ratio += " ‡"
        label = r["config"] + (" †" if timed_by_events and r.get("step_timing") != "step events" else "") + (
            " ◦" if r.get("harness") == "sweep" else "") + (" §" if slowed(r) else "")
        out.append(
            f"| {b:g} | {label} | {r['seconds_per_step']:.3f} | {r['seconds_per_image_28']:.1f} | "
            f"{r.get('peak_vram_gib', float('nan')):.2f} | {r['peak_host_rss_gib']:.1f} | {pf} | {ps} | {pp} | {pa} "
            f"| {lb} | {ratio} "
            f"| {step_x} | {image_x} |"
        )
    return out


def grid(data: dict[str, Any]) -> list[str]:
    """Planned vs measured peak per (budget, size) of one pipeline (benchmarks/grid.py)."""
    env = data["environment"]
    modes = f", {data['control_modes']} control modes" if data.get("control_modes", 1) > 1 else ""
    out = [
        f"### Predicted vs measured peak VRAM: {data['pipeline']}{modes} ({env.get('device', '?')}, torch "
        f"{env['torch']}, diffusers {env['diffusers']})",
        "",
        _commands_text(data)
        + f"code: {data.get('code_state', 'not recorded')}. "
        f"Each row: a ballast leaves exactly the budget free, `vramkit.optimize(pipe, height=, width=)` plans for "
        f"what the probe finds (free minus the margin, quality 'auto'), one {data['steps']}-step call runs under "
        "`vramkit.profile`. Measured = `max_memory_allocated` less the ballast, highest stage; 'peak <= budget' "
        "also counts applying the plan. 'error' = (measured - predicted) / predicted.",
        "",
        "| budget GiB | size | status | plan | predicted GiB | measured GiB | error | peak <= budget |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        size = f"{r['height']}x{r['width']}"
        if "measured_peak" not in r:
            why = r.get("error", r.get("status", ""))[:120].replace("|", "/")
            out.append(f"| {r['budget_gib']:g} | {size} | {r.get('status')} | {why} | | | | |")
            continue
        names = []
        for step in r.get("plan", {}).get("steps", []):
            config = step.get("config", {})
            kind = step.get("strategy", "?")
            if kind == "BlockStreaming":
                storage = f" {config['storage']}" if config.get("storage") else ""
                kind = f"stream {step.get('component')} ({config.get('resident')} res.){storage}"
            elif kind == "VaeTiling":
                kind = f"VAE tiles {config.get('tile')}"
            if kind not in ("Precision", "Resident"):
                names.append(kind)
        pred = r.get("final_predicted_peak", r["predicted_peak"])
        status = r["status"] + (f" ({len(r['recoveries'])})" if r.get("recoveries") else "")
        out.append(
            f"| {r['budget_gib']:g} | {size} | {status} | {', '.join(names)} | {pred / 2**30:.2f} | "
            f"{r['measured_peak'] / 2**30:.2f} | {r['error_vs_predicted'] * 100:+.0f}% | {r.get('within_budget')} |"
        )
    return out


def multi_gpu(data: dict[str, Any]) -> list[str]:
    env = data["environment"]
    names = sorted({d["name"] for d in env["devices"].values()})
    quality = "lossless" if "lossless" in env["command"] else "auto"
    out = [
        f"### Two GPUs vs one, {data['size']}², {data['budget_gib']:g} GiB per GPU, quality {quality} "
        f"({len(env['devices'])} x {', '.join(names)}, torch {env['torch']}, diffusers {env['diffusers']})",
        "",
        f"Command: `{env['command']}`; code: {data.get('code_state', 'not recorded')}. Each configuration in its "
        "own process; ballasts leave exactly the budget free on every GPU it uses. Peak VRAM = "
        "`max_memory_allocated` less the ballast, per device.",
        "",
        "| config | status | s/step | predicted | s/image (28) | predicted | peak VRAM GiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if r.get("status") != "ok":
            out.append(f"| {r['config']} | {r.get('status')} | | | | | | |")
            continue
        vram = r["peak_vram_gib"]
        vram_s = ", ".join(f"{k}: {v:.2f}" for k, v in vram.items()) if isinstance(vram, dict) else f"{vram:.2f}"
        out.append(
            f"| {r['config']} | ok | {r['seconds_per_step']:.3f} | {r['predicted_seconds_per_step']:.3f} | "
            f"{r['seconds_per_image_28']:.2f} | {r['predicted_seconds_per_image']:.2f} | {vram_s} | "
            f"{r['peak_host_rss_gib']:.1f} |"
        )
    return out


def compiled(data: dict[str, Any]) -> list[str]:
    storage = data.get("storage") or "bf16 (as loaded)"
    return [
        f"### torch.compile on a streamed transformer, {data['size']}², {data['budget_gib']:g} GiB, storage {storage} "
        f"({data['device']}, torch {data['torch']}, diffusers {data['diffusers']})",
        "",
        f"Command: `{data['command']}`. {data['resident_blocks']} of "
        f"{data['resident_blocks'] + data['streamed_blocks']} blocks resident; backend {data['backend']}; "
        f"warm-up {data['warmup_seconds']:.1f} s.",
        "",
        "| uncompiled s/step | compiled s/step | speed-up | graphs compiled while measuring | rel. L2 vs uncompiled "
        "| peak GiB |",
        "|---|---|---|---|---|---|",
        f"| {data['uncompiled_s_per_step']:.3f} | {data['compiled_s_per_step']:.3f} | {data['speedup']:.2f}x | "
        f"{data['frames_compiled_during_measure']} | {data['rel_l2_err']:.4f} | {data['peak_alloc_gib']:.2f} |",
    ]


def host_ram(data: dict[str, Any]) -> list[str]:
    b = data["blocks"]
    out = [
        f"### Host RAM of fp8 block streaming: originals in RAM or in the offload file ({data['device']}, "
        f"torch {data['torch']}, diffusers {data['diffusers']})",
        "",
        f"Command: `{data['command']}`; FLUX transformer at full width with {b['double']} double- and {b['single']} "
        f"single-stream blocks, all streamed, one fresh process per row."
        + (f" Note: {data['note']}." if data.get("note") else ""),
        "",
        "| originals | weights GiB | RSS before GiB | peak RSS applying GiB | peak / before | RSS applied GiB "
        "| apply s | peak RSS restoring GiB | RSS restored GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "error" in r:
            out.append(f"| {r['originals']} | error | | | | | | | |")
            continue
        out.append(
            f"| {r['originals']} | {r['weights_gib']:.2f} | {r['rss_before_gib']:.2f} | {r['peak_rss_gib']:.2f} | "
            f"{r['peak_over_before']:.3f} | {r['rss_after_apply_gib']:.2f} | {r['apply_s']:.1f} | "
            f"{r['restore_peak_rss_gib']:.2f} | {r['rss_after_restore_gib']:.2f} |"
        )
    return out


def main() -> int:
    lines = ["# Measured results", "", "Generated by `benchmarks/render_tables.py` from the JSON in this folder.", ""]
    tables = (
        ("streaming_1024_h200.json", streaming),
        ("streaming_1024_prefetch_h200.json", streaming),
        ("streaming_1024_fp8_prefetch_h200.json", streaming),
        ("streaming_512_h200.json", streaming),
        ("streaming_1024_balanced_h200.json", streaming),
        ("streaming_1024_parts_h100.json", streaming),
        ("pipeline_1024_grid_h100.json", pipeline),
        ("pipeline_1024_grid_h200.json", pipeline),
        ("pipeline_1024_grid_anchors_h200.json", pipeline),
        ("pipeline_512_grid_h100.json", pipeline),
        ("pipeline_512_grid_h200.json", pipeline),
        ("pipeline_512_sweep_diag_h100.json", pipeline),
        ("pipeline_1024_8gib_h200.json", pipeline),
        ("pipeline_1024_12gib_h200.json", pipeline),
        ("pipeline_1024_8gib_h100.json", pipeline),
        ("pipeline_1024_parts_h100.json", pipeline),
        ("pipeline_1024_8gib_parts_h100.json", pipeline),
        ("pipeline_1024_12gib_h100.json", pipeline),
        ("pipeline_512_8gib_h100.json", pipeline),
        ("pipeline_1024_h100.json", pipeline),
        ("pipeline_512_h100.json", pipeline),
        ("pipeline_1024_8gib_compile_h200.json", pipeline),
        ("pipeline_512_8gib_partial_h200.json", pipeline),
        ("pipeline_1024_h200.json", pipeline),
        ("grid_flux-dev_h200.json", grid),
        ("grid_flux-fill_h200.json", grid),
        ("grid_flux-dev_controlnet-union_h200.json", grid),
        ("grid_flux-dev_controlnet-union_subset_h200.json", grid),
        ("compile_1024_bf16_h200.json", compiled),
        ("compile_1024_fp8_h200.json", compiled),
        ("multi_gpu_1024_lossless_h200x2.json", multi_gpu),
        ("multi_gpu_1024_auto_h200x2.json", multi_gpu),
        ("host_ram_cpu.json", host_ram),
    )
    for name, render in tables:
        data = _load(name)
        if data is not None:
            lines += render(data) + [""]
    sys.stdout.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
