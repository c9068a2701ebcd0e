"""Block streaming on a full-size FLUX.1-dev transformer (random bf16 weights) under simulated cards.

Run on the GPU machine from the repository root:

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_streaming.py --size 1024 --budgets 6,8,12,16,24

What it does, in one process:

1. builds the transformer on the GPU (bf16, random weights) and times one denoising step with every
   weight resident (if it fits), keeping that output as the reference and measuring the
   activation peak;
2. measures pinned host-to-device bandwidth (cudaHostRegister'ed buffer, as the engine uses);
3. moves the model to host memory, then for each budget (GiB) and storage (bf16 as loaded, fp8):
   allocates a ballast tensor so that ``torch.cuda.mem_get_info()[0]`` equals the budget, picks the
   largest ``resident`` whose weights fit in budget - activations - margin, applies the streamer,
   runs warm-up + timed steps (CUDA events), and records s/step, peak allocated (ballast excluded),
   the floor ``L(B) = max(resident step, streamed bytes / bandwidth)``, the ratio, the engine's
   counters and whether the output is bit-identical to the reference (bf16) or how far it is (fp8).

``--unit part`` (or ``block,part`` to compare in one process) streams each block as its parts
(:func:`vramkit.engine.blocks.block_parts`: smaller ring slots, more resident weights for the same
budget); each row records its ``unit``, and ``resident_blocks``/``streamed_blocks`` then count parts.

Prints a short table and writes ``$OUT/streaming_<size>.json`` (``./out`` when ``OUT`` is unset).
Expected runtime on an H100: about 3-5 minutes (mostly packing/pinning 24 GB per configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

from vramkit.engine import BlockStreamer, HostBuffer, max_resident_for_budget
from vramkit.engine.blocks import UNITS
from vramkit.errors import PlanInfeasibleError

GIB = 2**30

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_model(device: str) -> torch.nn.Module:
    from vramkit.memory.architectures import build_architecture

    torch.manual_seed(0)
    return build_architecture("flux-dev", device=device, dtype=torch.bfloat16)


def make_inputs(size: int, device: str, text_tokens: int = 512) -> dict[str, Any]:
    g = torch.Generator(device="cpu").manual_seed(1234)
    n = (size // 16) ** 2
    bf16 = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=bf16)

    side = size // 16
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return dict(
        hidden_states=randn(1, n, 64),
        encoder_hidden_states=randn(1, text_tokens, 4096),
        pooled_projections=randn(1, 768),
        timestep=torch.tensor([0.5], device=device, dtype=bf16),
        guidance=torch.tensor([3.5], device=device, dtype=bf16),
        img_ids=img_ids.reshape(-1, 3).to(device=device, dtype=bf16),
        txt_ids=torch.zeros(text_tokens, 3, device=device, dtype=bf16),
        return_dict=False,
    )


def run_steps(
    model: torch.nn.Module, inputs: dict[str, Any], warmup: int, steps: int
) -> tuple[list[float], list[torch.Tensor]]:
    """Warm-up then ``steps`` back-to-back forwards; per-step seconds from CUDA events (no host sync
    between steps, as in a denoising loop) and every output."""
    outs: list[torch.Tensor] = []
    with torch.inference_mode():
        for _ in range(warmup):
            outs.append(model(**inputs)[0])
        torch.cuda.synchronize()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            outs.append(model(**inputs)[0])
            events[i + 1].record()
        torch.cuda.synchronize()
    times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    return times, outs


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise (NaN-safe): random weights through 57 blocks may leave non-finite values.
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def error_vs(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    r, o = ref.float(), out.float()
    finite = torch.isfinite(r) & torch.isfinite(o)
    diff = (o - r)[finite]
    return {
        "max_abs_err": float(diff.abs().max()) if diff.numel() else float("nan"),
        "rel_l2_err": float(diff.norm() / r[finite].norm()) if diff.numel() else float("nan"),
    }


def pinned_bandwidth(nbytes: int = GIB, reps: int = 10) -> dict[str, Any]:
    host = HostBuffer(nbytes, pin=True, method="register")
    host.tensor.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    out: dict[str, Any] = {"registered": host.pinned, "is_pinned": bool(host.tensor.is_pinned())}
    for _ in range(2):
        with torch.cuda.stream(stream):
            dev.copy_(host.tensor, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for _ in range(reps):
            dev.copy_(host.tensor, non_blocking=True)
        end.record(stream)
    # Does an async copy from the registered buffer return before it finishes? (true async H2D)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(stream):
        dev.copy_(host.tensor, non_blocking=True)
    out["host_blocked_ms"] = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    out["gbps"] = nbytes * reps / (start.elapsed_time(end) / 1e3) / 1e9
    # PyTorch's pinned allocator, for comparison (and to see its power-of-two rounding).
    try:
        before = (
            torch.cuda.host_memory_stats().get("allocated_bytes.current", None)
            if hasattr(torch.cuda, "host_memory_stats")
            else None
        )
        probe = torch.empty(680_000_000, dtype=torch.uint8, pin_memory=True)
        after = torch.cuda.host_memory_stats().get("allocated_bytes.current", None) if before is not None else None
        out["torch_pinned_680MB_reserves"] = (after - before) if before is not None and after is not None else None
        del probe
    except (RuntimeError, AttributeError) as exc:
        out["torch_pinned_probe_error"] = str(exc)
    del dev
    host.release()
    torch.cuda.empty_cache()
    return out


class Ballast:
    """Occupies GPU memory so that exactly ``budget`` bytes stay free (as on a smaller card)."""

    def __init__(self, budget: int) -> None:
        self.tensors: list[torch.Tensor] = []
        self.nbytes = 0
        self.free_after = 0
        if not torch.cuda.is_available():  # harness checks on CPU: nothing to occupy
            return
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for _ in range(4):
            free = torch.cuda.mem_get_info()[0]
            extra = free - budget
            if abs(extra) < 2 * 2**20:
                break
            if extra < 0:
                raise RuntimeError(f"only {free / GIB:.2f} GiB free, cannot simulate {budget / GIB:.2f} GiB")
            extra = extra // (2 * 2**20) * (2 * 2**20)
            self.tensors.append(torch.empty(extra, dtype=torch.uint8, device="cuda"))
            self.nbytes += extra
        self.free_after = torch.cuda.mem_get_info()[0]

    def release(self) -> None:
        self.tensors.clear()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def measure_config(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    budget_gib: float,
    storage: str | None,
    args: argparse.Namespace,
    prefetch: int,
    unit: str,
    activation_bytes: int,
    resident_step: float | None,
    bandwidth: float,
    ref: torch.Tensor | None,
) -> dict[str, Any]:
    budget = int(budget_gib * GIB)
    row: dict[str, Any] = {"budget_gib": budget_gib, "storage": storage or "bf16", "prefetch": prefetch, "unit": unit}
    margin = max(args.margin_mib * 2**20, int(0.03 * budget))
    weights_budget = budget - activation_bytes - margin
    row["weights_budget_gib"] = weights_budget / GIB
    try:
        layout = max_resident_for_budget(model, weights_budget, prefetch, storage, unit=unit)
    except PlanInfeasibleError as exc:
        row["error"] = f"infeasible: {exc}"
        return row
    row.update(
        resident_blocks=len(layout.resident_positions),
        streamed_blocks=len(layout.streamed_positions),
        resident_gb=(layout.rest_nbytes + layout.resident_nbytes) / 1e9,
        streamed_gb=layout.streamed_nbytes / 1e9,
        ring_gb=layout.ring_nbytes / 1e9,
        slot_gb=layout.slot_nbytes / 1e9,
        scratch_gb=layout.scratch_nbytes / 1e9,
        predicted_weights_gib=layout.device_nbytes / GIB,
    )
    ballast = Ballast(budget)
    row["free_gib_at_start"] = ballast.free_after / GIB
    streamer = None
    try:
        t0 = time.perf_counter()
        streamer = BlockStreamer(model, layout, device="cuda").start()
        torch.cuda.synchronize()
        row["apply_s"] = time.perf_counter() - t0
        torch.cuda.reset_peak_memory_stats()
        streamer.stats.reset()
        times, outs = run_steps(model, inputs, args.warmup, args.steps)
        row["s_per_step"] = statistics.median(times)
        row["s_per_step_mean"] = statistics.fmean(times)
        row["step_times"] = times
        row["peak_alloc_gib"] = (torch.cuda.max_memory_allocated() - ballast.nbytes) / GIB
        row["peak_reserved_gib"] = (torch.cuda.max_memory_reserved() - ballast.nbytes) / GIB
        row["stats"] = streamer.stats.as_dict()
        row["fused_decodes"] = streamer.decoder.fused_calls
        row["torch_decodes"] = streamer.decoder.fallback_calls
        row["pinned_gb"] = streamer.pinned_nbytes / 1e9
        row["pageable_gb"] = streamer.pageable_nbytes / 1e9
        copy_floor = layout.streamed_nbytes / (bandwidth * 1e9)
        row["copy_floor_s"] = copy_floor
        if resident_step is not None:
            row["L_B"] = max(resident_step, copy_floor)
            row["ratio"] = row["s_per_step"] / row["L_B"]
        if ref is not None:
            if storage is None:
                row["bit_identical"] = all(bit_equal(ref, o.cpu()) for o in outs)
            else:
                row.update(error_vs(ref, outs[-1].cpu()))
                row["steps_identical"] = all(bit_equal(outs[0], o) for o in outs)
        del outs
    except torch.cuda.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc).splitlines()[0]}"
    finally:
        t0 = time.perf_counter()
        if streamer is not None:
            streamer.restore()
        row["restore_s"] = time.perf_counter() - t0
        ballast.release()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--budgets", default="6,8,12,16,24", help="GiB, comma separated")
    p.add_argument("--storages", default="bf16,fp8", help="bf16 (as loaded) and/or fp8, int8")
    p.add_argument("--prefetch", default="1", help="blocks copied ahead; comma separated to compare")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--margin-mib", type=int, default=384, help="kept free on top of the activation peak")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument(
        "--unit",
        default="block",
        help="what streams as one piece: block (default) and/or part (each block's parts); comma separated",
    )
    args = p.parse_args()
    units = [u for u in args.unit.split(",") if u]
    bad = [u for u in units if u not in UNITS]
    if bad or not units:
        p.error(f"--unit {args.unit!r}: use some of {', '.join(UNITS)}")
    if not torch.cuda.is_available():
        sys.exit("bench_streaming needs a CUDA device")
    import diffusers

    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    result: dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "size": args.size,
        "text_tokens": args.text_tokens,
        "rows": [],
    }
    t_start = time.perf_counter()

    log("building FLUX.1-dev transformer (random bf16) on the GPU")
    model = build_model("cuda")
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    result["model_gb"] = model_bytes / 1e9
    inputs = make_inputs(args.size, "cuda", args.text_tokens)

    ref: torch.Tensor | None = None
    resident_step: float | None = None
    activation_bytes = int(1.0 * GIB)
    try:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times, outs = run_steps(model, inputs, args.warmup, args.steps)
        resident_step = statistics.median(times)
        activation_bytes = torch.cuda.max_memory_allocated() - base
        ref = outs[-1].cpu()
        result["resident"] = {
            "s_per_step": resident_step,
            "step_times": times,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / GIB,
            "activation_peak_gib": activation_bytes / GIB,
            "deterministic": all(bit_equal(outs[0], o) for o in outs),
            "output_finite": bool(torch.isfinite(ref.float()).all()),
        }
        del outs
        log(f"resident: {resident_step:.3f} s/step, activations {activation_bytes / GIB:.2f} GiB")
    except torch.cuda.OutOfMemoryError:
        log("the whole model does not fit: no resident reference")
    result["activation_bytes_used"] = activation_bytes

    model.to("cpu")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    log("model moved to host memory")

    bw = pinned_bandwidth()
    result["bandwidth"] = bw
    log(f"pinned H2D {bw['gbps']:.1f} GB/s (registered={bw['registered']}, is_pinned={bw['is_pinned']})")

    if ref is None:
        ref = sync_reference(model, inputs)
        result["reference"] = "per-block synchronous copies"
    else:
        result["reference"] = "all resident"

    storages = [None if s in ("bf16", "none") else s for s in args.storages.split(",") if s]
    prefetches = [int(p) for p in args.prefetch.split(",") if p]
    for budget in [float(b) for b in args.budgets.split(",") if b]:
        for storage in storages:
            for prefetch in prefetches:
                for unit in units:
                    log(f"budget {budget:g} GiB, storage {storage or 'bf16'}, prefetch {prefetch}, unit {unit}")
                    row = measure_config(
                        model,
                        inputs,
                        budget,
                        storage,
                        args,
                        prefetch,
                        unit,
                        activation_bytes,
                        resident_step,
                        bw["gbps"],
                        ref,
                    )
                    result["rows"].append(row)
                    brief = {k: v for k, v in row.items() if k not in ("step_times", "stats")}
                    log("  " + json.dumps(brief, default=str))
                    with open(os.path.join(out_dir, f"streaming_{args.size}.json"), "w") as f:
                        json.dump(result, f, indent=1, default=str)

    result["wall_s"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, f"streaming_{args.size}.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print_table(result)


def sync_reference(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Reference output when the model does not fit: every block moved to the GPU right before it
    runs and back after (plain ``.to()``, independent of the engine)."""
    from vramkit.engine import execution_order, find_block_stacks

    blocks = [b for _, _, b in execution_order(find_block_stacks(model))]
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    for m in model.modules():
        if id(m) not in in_blocks:
            for prm in m._parameters.values():
                if prm is not None:
                    prm.data = prm.data.to("cuda")
    handles = []
    for b in blocks:
        handles.append(b.register_forward_pre_hook(lambda mod, a: mod.to("cuda") and None))
        handles.append(b.register_forward_hook(lambda mod, a, o: mod.to("cpu") and None))
    with torch.inference_mode():
        out = model(**inputs)[0].cpu()
    for h in handles:
        h.remove()
    model.to("cpu")
    return out


def print_table(result: dict[str, Any]) -> None:
    res = result.get("resident") or {}
    print()
    print(f"{result['device']}, torch {result['torch']}, diffusers {result['diffusers']}, {result['size']}px")
    print(
        f"resident: {res.get('s_per_step', float('nan')):.3f} s/step; pinned H2D {result['bandwidth']['gbps']:.1f} GB/s"
    )
    hdr = (
        f"{'budget':>6} {'store':>5} {'pf':>2} {'unit':>5} {'res':>4} {'resGB':>6} {'strGB':>6} {'s/step':>7} "
        f"{'L(B)':>6} {'ratio':>5} {'peakGiB':>7} {'fallb':>5} {'exact/err':>10}"
    )
    print(hdr)
    for r in result["rows"]:
        if "error" in r:
            print(
                f"{r['budget_gib']:>6g} {r['storage']:>5} {r['prefetch']:>2} {r.get('unit', 'block'):>5} "
                f"{r['error'][:90]}"
            )
            continue
        exact = r.get("bit_identical")
        check = ("yes" if exact else "NO") if exact is not None else f"{r.get('rel_l2_err', float('nan')):.2e}"
        print(
            f"{r['budget_gib']:>6g} {r['storage']:>5} {r['prefetch']:>2} {r.get('unit', 'block'):>5} "
            f"{r['resident_blocks']:>4} "
            f"{r['resident_gb']:>6.1f} "
            f"{r['streamed_gb']:>6.1f} {r['s_per_step']:>7.3f} {r.get('L_B', float('nan')):>6.3f} "
            f"{r.get('ratio', float('nan')):>5.2f} {r['peak_alloc_gib']:>7.2f} {r['stats']['fallbacks']:>5} {check:>10}"
        )
    print(f"wall {result.get('wall_s', 0):.0f} s")


if __name__ == "__main__":
    main()
