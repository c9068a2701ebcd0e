"""Whole FLUX pipelines under simulated small cards: vramkit against diffusers' options and peers.

Run on the GPU machine from the repository root:

    PYTHONPATH=src:/tmp/site python3 benchmarks/bench_pipeline.py --size 1024 --budgets 4,6,8,12,16,24 \
        --configs suite --deadline 540

Peers (``--configs ...,diffusers-mm,diffusers-dynamic-offloader,mmgp,mmgp-int8``) need their wheels in
/tmp/site: diffusers-mm 0.4.0, diffusers-dynamic-offloader 0.1.0rc2, mmgp 3.8.2 and optimum-quanto 0.2.7
(``pip download --no-deps`` into ``.whl/``, installed there with ``pip install --no-deps --target``).

The pipeline is the full-size FLUX.1-dev (T5-XXL, CLIP-L, transformer, VAE) with random bf16
weights, built on the GPU (seed 0) by a fresh process that writes them raw to ``--weights-cache``
(31.4 GiB, in /dev/shm where it has room, else on local disk; deleted once read unless
``--keep-weights-cache``). This process reads them into host RAM, never touches CUDA, and forks one child per
configuration: each child starts with the pipeline in host RAM as a fresh process would (its
resident set counts those pages; what it frees or pins is its own), and no configuration's hooks,
caches or CUDA state reach another. One difference remains: pages a child frees stay in this
process, so the host's available RAM (recorded per row) does not rise as it would in a fresh
process; ``--no-fork`` starts a fresh process per child where that matters. A ballast makes
``torch.cuda.mem_get_info()`` report exactly the budget as free (any overshoot is a real CUDA OOM).

diffusers' built-ins, which never read the free memory, are applied once per child and measured at
every budget from the largest down ("sweep" rows): before each budget the caching allocator is
emptied and the ballast resized so that the free memory is the budget less what the option holds
between calls, as it would be in a fresh process. Where the allocator keeps memory cached after
``empty_cache`` the next ballast cannot be sized and the row is an error, not an OOM (mmgp did
that). Once one runs out of memory, the smaller budgets are recorded as OOM without running
(``oom_implied_by``): an option whose footprint does not depend on the budget cannot fit in less.
vramkit, the peers that read the free memory and mmgp get a child of their own per budget ("fork"
rows).

Each measurement is a 2-step warm-up call (first-call costs: pinning, lazy init, autotuning) and an
N-step call. s/step is the mean gap between the ends of consecutive steps of the N-step call (CUDA
events recorded from ``callback_on_step_end``: every step after the first, a slow one included, free
of per-call costs; the median is kept as ``seconds_per_step_median``); s/image is the N-step call
plus 28-N steps at that rate. Peak VRAM is ``max_memory_allocated`` minus the ballast, peak host RAM
the child's RSS sampled every 50 ms (apply included; cumulative over a sweep). ``--tiny`` runs the
same harness on the tiny CPU pipeline (to check the harness, not to measure). Writes
``$OUT/pipeline_<size>.json`` and prints a table.

Each budget of a child may take ``--timeout`` seconds (the first one its apply included); past that
the child is killed and the budget recorded as ``timeout`` (a sweep's smaller budgets as not run).
A device call is limited in time, so one run per resolution may need several calls on the same
machine: with ``--deadline 540`` no configuration starts after 540 s less a minute and none runs past
540 s (what it had not measured is recorded as ``cut`` and runs again), and the next call continues
with ``--resume <the file the last call wrote>`` (carried into the working tree), skipping what was
measured; the file lists every call's command under ``commands``.

``--configs`` entries may carry their own budgets, ``NAME@B1/B2`` in place of ``--budgets`` (e.g.
``diffusers-sequential@4``: an option whose speed does not depend on the budget, measured at one).
"""

from __future__ import annotations

import os

# This process forks the children that use CUDA, so it must never initialize CUDA itself (a forked
# child cannot use an inherited context): is_available() asks NVML instead of the driver.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse
import atexit
import json
import math
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import torch
from render_tables import below_floor, floor_seconds, slowed

#: The children's intra-op threads (main() keeps this process on one: see there).
_THREADS = torch.get_num_threads()

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


#: Options that never read the free memory: applied once and measured at every budget in one child.
#: diffusers' built-ins do not look at memory at all. Not mmgp, though it sizes itself from the
#: device's total memory, which a ballast does not change: after its 24 GiB row at 512² on an H100,
#: freeing the ballast and emptying the cache left 55 GiB reserved but unallocated by torch's
#: allocator (benchmarks/results/pipeline_512_sweep_diag_h100.json), so it runs one process per budget.
SWEEP_CONFIGS = frozenset({
    "diffusers-leaf-stream", "diffusers-leaf-stream-fp8", "diffusers-block-stream", "diffusers-block-stream-fp8",
    "diffusers-model-offload", "diffusers-sequential",
})
#: Memory torch's allocator may keep cached after ``empty_cache`` before a sweep stops: more than
#: this and the next ballast would leave the option more than its budget.
_SWEEP_CACHED_LIMIT = 1 * GIB
#: ``--configs suite``: every option of the suite, vramkit and diffusers' built-ins first (the
#: comparisons the acceptance figures need), the slowest last.
SUITE = ("vramkit", "vramkit-fp8", "diffusers-leaf-stream", "diffusers-leaf-stream-fp8", "diffusers-block-stream",
         "diffusers-block-stream-fp8", "diffusers-model-offload", "diffusers-mm", "diffusers-dynamic-offloader",
         "mmgp", "mmgp-int8", "diffusers-sequential")
#: The components the weights cache holds, in file order.
COMPONENTS = ("text_encoder", "text_encoder_2", "transformer", "vae")
#: Bumped when the cache's layout changes (an old file is then rebuilt, not misread).
WEIGHTS_FORMAT = 1


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


#: nvidia-smi's clock-event reasons (the bits of ``clocks_event_reasons.active``) that can slow a GPU
#: that has work. The power cap is often active at full load without slowing it much, so a row
#: counts as slowed by it only where the median SM clock also fell (see render_tables.slowed).
_SLOWDOWNS = {0x4: "power cap", 0x8: "hardware slowdown", 0x20: "software thermal slowdown",
              0x40: "hardware thermal slowdown", 0x80: "power brake"}
_CLOCK_FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "temperature.gpu", "utilization.gpu")
#: Seconds an nvidia-smi query may take: a driver in trouble can hang it, and monitoring must never
#: hold up or fail a measurement.
_SMI_TIMEOUT = 5.0


def _smi(args: list[str]) -> str | None:
    """nvidia-smi's output for ``args`` about the GPU this process computes on (CUDA device 0: the
    first of CUDA_VISIBLE_DEVICES where set, an index or a UUID, both of which nvidia-smi takes), or
    None where it failed, hung or is missing."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    try:
        done = subprocess.run(["nvidia-smi", *args, f"--id={visible or 0}"], capture_output=True, text=True,
                              timeout=_SMI_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


class GpuSampler:
    """The GPU's SM clock, power, temperature, utilization, clock-event reasons and the processes
    computing on it, sampled from nvidia-smi every ``interval`` seconds while a call is measured, so
    that a row measured on a throttled or shared GPU says so. One-shot queries from a thread, not
    ``nvidia-smi --loop-ms``: that one's output to a pipe is buffered and lost when it is stopped.
    Without nvidia-smi (a CPU machine), or where it fails, it records nothing; it never fails the
    measurement."""

    def __init__(self, interval: float = 0.25, enabled: bool = True) -> None:
        self._interval = interval
        self._enabled = enabled  # False: a CPU measurement on a GPU machine (--tiny) samples nothing
        self._fields: str | None = None
        self._lines: list[str] = []
        self._processes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.summary: dict[str, Any] | None = None

    def _sample(self) -> None:
        assert self._fields is not None
        out = _smi([f"--query-gpu={self._fields}", "--format=csv,noheader,nounits"])
        if out is not None:
            self._lines += out.splitlines()
        apps = _smi(["--query-compute-apps=pid", "--format=csv,noheader"])
        if apps is not None:
            self._processes.append(sum(1 for line in apps.splitlines() if line.strip().isdigit()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self._interval)

    def __enter__(self) -> GpuSampler:
        if not self._enabled or shutil.which("nvidia-smi") is None:
            return self
        for reasons in ("clocks_event_reasons.active", "clocks_throttle_reasons.active"):  # newer, older drivers
            fields = ",".join((*_CLOCK_FIELDS, reasons))
            if _smi([f"--query-gpu={fields}", "--format=csv,noheader,nounits"]) is not None:
                self._fields = fields
                self._thread.start()
                break
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fields is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample()  # the state at the end of the call too
        self.summary = summarize_gpu_samples("\n".join(self._lines))
        if self.summary is not None and self._processes:
            # Processes computing on the GPU, this one included (1 unless something else shared it
            # at some sample; pids are not compared: in a container nvidia-smi may show the host's).
            self.summary["gpu_processes"] = max(self._processes)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def summarize_gpu_samples(text: str) -> dict[str, Any] | None:
    """nvidia-smi's CSV lines (the fields of :class:`GpuSampler`) as a row's ``gpu_state``: SM clock
    (min and median, and the maximum it could run at), the highest power and temperature, the
    median utilization (each over the samples that could read it: a field a GPU does not report
    leaves the others), and each slowdown reason with the share of samples it was active in."""
    samples: list[tuple[list[float | None], int | None]] = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(_CLOCK_FIELDS) + 1:
            continue  # a cut or foreign line
        values = [_number(p) for p in parts[:-1]]
        try:
            reasons: int | None = int(parts[-1], 16)
        except ValueError:
            reasons = None
        if any(v is not None for v in values) or reasons is not None:
            samples.append((values, reasons))
    if not samples:
        return None

    def column(i: int) -> list[float]:
        return [v[i] for v, _ in samples if v[i] is not None]  # type: ignore[misc]

    summary: dict[str, Any] = {"samples": len(samples)}
    for key, i, how in (("sm_clock_mhz_min", 0, min), ("sm_clock_mhz_median", 0, statistics.median),
                        ("sm_clock_mhz_max", 1, max), ("power_w_max", 2, max), ("temperature_c_max", 3, max),
                        ("utilization_pct_median", 4, statistics.median)):
        values = column(i)
        if values:
            summary[key] = how(values)
    masks = [r for _, r in samples if r is not None]
    summary["slowdowns"] = {name: round(sum(1 for m in masks if m & bit) / len(masks), 3)
                            for bit, name in _SLOWDOWNS.items() if any(m & bit for m in masks)}
    return summary


def build(tiny: bool) -> Any:
    if tiny:
        from vramkit.testing import tiny_pipeline

        return tiny_pipeline("flux")
    pipe = _random_pipeline_on_gpu()
    pipe.to("cpu")
    torch.cuda.empty_cache()
    return pipe


def _random_pipeline_on_gpu() -> Any:
    """The full-size FLUX.1-dev pipeline, random bf16 weights (seed 0) created on the GPU."""
    from vramkit.testing.full_size import full_size_flux_pipeline

    torch.manual_seed(0)
    return full_size_flux_pipeline("flux-dev", device="cuda", dtype=torch.bfloat16)


def _cached_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """What the weights cache stores of ``module``: every parameter (a tied one once) and buffer
    (non-persistent ones too: an empty module has none of their values), in module order."""
    return [(f"param:{n}", p) for n, p in module.named_parameters()] + [
        (f"buffer:{n}", b) for n, b in module.named_buffers()
    ]


def save_weights(pipe: Any, path: str, about: dict[str, Any]) -> None:
    """Write the tensors of ``pipe``'s models raw to ``path`` and an index to ``path + '.json'``
    (the index last: a file without one is incomplete and rebuilt)."""
    entries = []
    offset = 0
    with open(path + ".part", "wb") as f:
        for component in COMPONENTS:
            for name, tensor in _cached_tensors(getattr(pipe, component)):
                data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
                f.write(memoryview(data))
                entries.append({"component": component, "name": name, "dtype": str(tensor.dtype),
                                "shape": list(tensor.shape), "offset": offset, "nbytes": int(data.nbytes)})
                offset += int(data.nbytes)
    os.replace(path + ".part", path)
    with open(path + ".json", "w") as f:
        json.dump({"format": WEIGHTS_FORMAT, **about, "nbytes": offset, "entries": entries}, f)


def load_weights(pipe: Any, path: str) -> Any:
    """Give ``pipe``'s models (on any device, meta included) fresh host memory holding the tensors
    saved in ``path``: one allocation per tensor, as ``pipe.to('cpu')`` or a loader makes them."""
    with open(path + ".json") as f:
        index = json.load(f)
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for component in COMPONENTS:
        module = getattr(pipe, component)
        module.to_empty(device="cpu")
        if hasattr(module, "tie_weights"):
            module.tie_weights()  # to_empty gives each holder of a tied weight its own tensor
        tensors.update({(component, n): t for n, t in _cached_tensors(module)})
    saved = {(e["component"], e["name"]): e for e in index["entries"]}
    if set(saved) != set(tensors) or any(
        list(tensors[k].shape) != e["shape"] or str(tensors[k].dtype) != e["dtype"] for k, e in saved.items()
    ):
        raise SystemExit(f"weights cache {path} does not hold these architectures' tensors: delete it and "
                         "run again (it is rebuilt)")
    fd = os.open(path, os.O_RDONLY)

    def read(entry: dict[str, Any]) -> bool:
        view = memoryview(tensors[(entry["component"], entry["name"])].reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < entry["nbytes"]:  # a read may return less than asked
            n = os.preadv(fd, [view[done:]], entry["offset"] + done)
            if not n:
                return False
            done += n
        return True

    try:
        # Positional reads in a few threads (they release the GIL), so that copying 31 GiB out of
        # the page cache or /dev/shm is not bound to one core (not timed against one thread yet).
        with ThreadPoolExecutor(max_workers=8) as pool:
            complete = all(pool.map(read, index["entries"]))
    finally:
        os.close(fd)
    if not complete:
        raise SystemExit(f"weights cache {path} is truncated: delete it and run again")
    return pipe


def write_weights(path: str) -> None:
    """(A fresh process, on the GPU.) The pipeline ``build`` makes, saved for the forked children."""
    torch.set_num_threads(_THREADS)
    about = {"model": "flux-dev", "dtype": "bfloat16", "seed": 0, "torch": torch.__version__,
             "device": torch.cuda.get_device_name(0)}
    save_weights(_random_pipeline_on_gpu(), path, about)


def _fresh_cache(path: str) -> bool:
    try:
        with open(path + ".json") as f:
            return json.load(f).get("format") == WEIGHTS_FORMAT
    except (OSError, ValueError):
        return False


def default_weights_cache(keep: bool) -> str:
    """An existing cache (one kept by an earlier call on this machine) where there is one; else
    RAM-backed /dev/shm when it can hold the weights with room to spare and the file is deleted once
    read (faster to write and read than the disk); else the local disk (a kept file in /dev/shm
    would take 31 GiB of the RAM the options measured plan for)."""
    name = "flux-dev-bf16-seed0.bin"
    shm, disk = os.path.join("/dev/shm", "vramkit-bench", name), os.path.join(".bench_cache", name)
    for path in (disk, shm) if keep else (shm, disk):
        if _fresh_cache(path):
            return path
    try:
        stat = os.statvfs("/dev/shm")
        shm_free = stat.f_bavail * stat.f_frsize
    except OSError:
        shm_free = 0
    if not keep and shm_free > 40 * GIB and os.access("/dev/shm", os.W_OK):
        return shm
    return disk


def cached_pipeline(path: str, read: bool = True) -> Any:
    """The full-size random-weight pipeline in host RAM, from the cache (built first if missing;
    ``read=False`` only builds it)."""
    if not _fresh_cache(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        log(f"building the random-weight pipeline on the GPU into {path}")
        subprocess.run([sys.executable, __file__, "--write-weights", path], check=True)
    if not read:
        return None
    from vramkit.testing.full_size import full_size_flux_pipeline

    t0 = time.perf_counter()
    pipe = load_weights(full_size_flux_pipeline("flux-dev", device="meta", dtype=torch.bfloat16), path)
    log(f"read {path} in {time.perf_counter() - t0:.1f} s")
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


def sweep_check(config: str, budget_gib: float, held: int, allocated: int, reserved: int) -> None:
    """Before the next budget of a sweep: raises where the option cannot be measured there in this
    process. ``held`` is what the driver sees it hold between calls (ballast freed, cache emptied),
    ``allocated`` and ``reserved`` what torch's allocator reports then."""
    cached = reserved - allocated
    if cached > _SWEEP_CACHED_LIMIT:
        # Not an OOM: the option did not run at this budget. The next ballast, sized from the
        # driver's free memory, would leave it this cache on top of the budget.
        raise RuntimeError(f"sweep stopped: the allocator kept {cached / GIB:.2f} GiB cached after empty_cache, "
                           f"so this budget cannot be simulated in the same process; measure {config}@{budget_gib:g} "
                           "in a process of its own")
    if budget_gib > 0 and held > budget_gib * GIB:
        raise torch.OutOfMemoryError(f"the option holds {held / GIB:.2f} GiB on the GPU between calls, more than "
                                     "the budget")


def set_budget(budget_gib: float, held: int) -> torch.Tensor | None:
    """A ballast after which ``mem_get_info`` reports ``budget_gib`` less ``held`` bytes (what the
    option already holds on the GPU) as free; None for budget 0 (the whole GPU)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if budget_gib <= 0:
        return None
    extra = torch.cuda.mem_get_info()[0] - (int(budget_gib * GIB) - held)
    return torch.empty(extra, dtype=torch.uint8, device="cuda") if extra > 0 else None


def measure(pipe: Any, tiny: bool, device: str, row: dict[str, Any]) -> None:
    """The warm-up and N-step calls of one row, their timings written into ``row``."""
    t0 = time.perf_counter()
    call(pipe, 2, tiny)  # warm-up (first-call costs: cuDNN autotune, pinning, lazy init)
    row["warmup_seconds"] = time.perf_counter() - t0
    graphs_before = _graphs_compiled()
    clock = StepClock(device == "cuda")
    difference = None
    gpu = GpuSampler(enabled=device == "cuda")
    try:
        with gpu:
            t_hi = call(pipe, ARGS.steps, tiny, clock)
    except TypeError as exc:
        if "callback" not in str(exc):
            raise
        # An option whose wrapper does not pass callback_on_step_end on: time it by difference.
        clock = StepClock(device == "cuda")
        t_lo = call(pipe, 2, tiny)
        gpu = GpuSampler(enabled=device == "cuda")
        with gpu:
            t_hi = call(pipe, ARGS.steps, tiny)
        difference = (t_hi - t_lo) / (ARGS.steps - 2)
        row["seconds_2_steps"] = t_lo
    if gpu.summary is not None:
        row["gpu_state"] = gpu.summary
    # Graphs compiled after the warm-up call: 0 unless something recompiles per call or step.
    row["graphs_compiled_while_measuring"] = _graphs_compiled() - graphs_before
    gaps = clock.gaps()
    # The mean step gap (the mean, not the median: a step that is slow every so often is part of
    # the cost), or the difference of a 2-step and the N-step call where there are no step events.
    per_step = statistics.fmean(gaps) if len(gaps) >= 2 else difference
    row.update(status="ok", seconds_n_steps=t_hi, n_steps=ARGS.steps, step_seconds=gaps,
               seconds_per_step_median=statistics.median(gaps) if gaps else None,
               step_timing="step events" if len(gaps) >= 2 else "difference",
               seconds_per_step=per_step,
               # The N-step call as measured (every per-call cost included) plus the remaining
               # steps at the steady rate.
               seconds_per_image_28=t_hi + (28 - ARGS.steps) * per_step)


def measure_config(pipe: Any, config: str, budgets: list[float], emit: Callable[[dict[str, Any]], None]) -> None:
    """(In a forked child.) Apply ``config`` once under the first budget and measure it at each of
    ``budgets`` in turn (one budget, or several from the largest down for a sweep), emitting a row
    per budget as soon as it is measured."""
    tiny = ARGS.tiny
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    harness = "sweep" if len(budgets) > 1 else "fork"
    ballast: torch.Tensor | None = None
    held = 0
    free_before = 0
    applied: dict[str, Any] = {}
    with RssSampler() as rss:
        for i, budget_gib in enumerate(budgets):
            emit({"_start": budget_gib})  # the parent times each budget from here
            row: dict[str, Any] = {"config": config, "budget_gib": budget_gib, "description": CONFIGS[config],
                                   "harness": harness,
                                   # Forked children share the parent's copy of the weights, which stays
                                   # in RAM when a child frees its own: the host had this much available.
                                   "host_available_gib": psutil.virtual_memory().available / GIB}
            peak_counted = False
            try:
                if device == "cuda":
                    if i == 0:
                        torch.cuda.synchronize()
                        free_before = torch.cuda.mem_get_info()[0]
                    else:
                        ballast = None  # freed before the next one is sized
                        torch.cuda.synchronize()
                        torch.cuda.empty_cache()
                        # What the option holds between calls, from the driver's free memory (the
                        # ballast gone, the cache empty): its tensors and also what the allocator does
                        # not see (kernels loaded on first use, library handles), all of which a
                        # fresh process at this budget would hold inside the budget too.
                        held = max(0, free_before - torch.cuda.mem_get_info()[0])
                        row["held_between_calls_gib"] = held / GIB
                        # What of it torch's allocator sees: allocated = live tensors (a reference kept
                        # somewhere), reserved but not allocated = cache empty_cache could not return,
                        # neither = memory outside the allocator.
                        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
                        row["held_allocated_gib"] = allocated / GIB
                        row["held_reserved_gib"] = reserved / GIB
                        sweep_check(config, budget_gib, held, allocated, reserved)
                    if budget_gib <= 0:
                        from vramkit.memory.probe import measure_h2d_bandwidth

                        row["pinned_bandwidth"] = measure_h2d_bandwidth("cuda")
                    ballast = set_budget(budget_gib, held)
                    row["free_after_ballast"] = torch.cuda.mem_get_info()[0]
                    torch.cuda.reset_peak_memory_stats()
                    peak_counted = True
                if i == 0:
                    t0 = time.perf_counter()
                    applied = apply_config(pipe, config, device)
                    applied["apply_seconds"] = time.perf_counter() - t0
                row.update(applied)
                measure(pipe, tiny, device, row)
            except torch.OutOfMemoryError as exc:
                row.update(status="OOM", error=str(exc).splitlines()[0][:300])
            except Exception as exc:  # noqa: BLE001 - a benchmark records every failure and goes on
                # An allocation that fails outside the caching allocator (cuBLAS, a kernel) raises
                # "CUDA error: out of memory" as another type: it is an OOM all the same.
                oom = "out of memory" in str(exc).splitlines()[0].lower() if str(exc) else False
                row.update(status="OOM" if oom else "error", error=f"{type(exc).__name__}: {str(exc)[:300]}")
            row["peak_host_rss_gib"] = rss.peak / GIB
            if peak_counted:
                ballast_bytes = ballast.numel() if ballast is not None else 0
                row["peak_vram_gib"] = (torch.cuda.max_memory_allocated() - ballast_bytes) / GIB
                row["peak_reserved_gib"] = (torch.cuda.max_memory_reserved() - ballast_bytes) / GIB
                events = getattr(pipe, "vramkit_events", None)
                if events:
                    row["recoveries"] = list(events)
            emit(row)
            if row["status"] != "ok":
                # An option whose footprint does not depend on the budget fits no smaller one; after
                # an error its state is unknown. Neither is worth running.
                for smaller in budgets[i + 1:]:
                    emit({"config": config, "budget_gib": smaller, "description": CONFIGS[config],
                          "harness": harness, "status": row["status"],
                          "error": f"not run: {row['status']} at {budget_gib:g} GiB in the same process",
                          **({"oom_implied_by": budget_gib} if row["status"] == "OOM" else {})})
                return


def measured_pipeline() -> Any:
    """The pipeline the children measure: the tiny CPU one with ``--tiny``, else the full-size one
    from the weights cache."""
    return build(tiny=True) if ARGS.tiny else cached_pipeline(ARGS.weights_cache)


def write_rows(path: str, target: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
    """Run ``target(emit)``, each emitted row a JSON line of ``path``, flushed at once (the parent
    reads the file while the child runs)."""
    with open(path, "w") as rows:

        def emit(row: dict[str, Any]) -> None:
            rows.write(json.dumps(row) + "\n")
            rows.flush()

        target(emit)


def _start_fork(target: Callable[[Callable[[dict[str, Any]], None]], None], log_path: str,
                rows_path: str) -> int:
    """Fork a child that runs ``target(emit)``, its output to ``log_path`` and each emitted row a
    JSON line of ``rows_path``; the child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        # Python-level writers too, where this process had replaced them (a test's capture).
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:  # if host RAM runs out, the kernel kills this child, not the parent holding the weights
            with open("/proc/self/oom_score_adj", "w") as f:
                f.write("1000")
        except OSError:
            pass
        # Exit handlers and finalizers of the parent's objects are not this child's to run (it
        # exits through os._exit below, after running its own).
        atexit._clear()
        for inherited in list(weakref.finalize._registry):  # type: ignore[attr-defined]
            inherited.detach()
        torch.set_num_threads(_THREADS)
        write_rows(rows_path, target)
        code = 0
    except BaseException:  # noqa: BLE001 - the child reports everything in its log and exits
        traceback.print_exc()
    finally:
        # What a normal interpreter exit runs for this child's own objects: atexit handlers and
        # finalizers (vramkit deletes its offload files there; skipped, they would fill the disk
        # the next child's plan counts on). Then an exit that leaves the parent's state alone.
        try:
            atexit._run_exitfuncs()
            weakref.finalize._exitfunc()  # type: ignore[attr-defined]
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


def _read_rows(path: str, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of ``path`` after byte ``offset``, and the offset after them (a line
    still being written, or one a killed child left half-written, is not read)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    rows = []
    end = data.rfind(b"\n") + 1
    for line in data[:end].splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            log(f"  unreadable row skipped: {line[:120]!r}")
    return rows, offset + end


def supervise(poll: Callable[[], int | None], kill: Callable[[], None], rows_path: str, budget_timeout: float,
              end_at: float | None) -> tuple[list[dict[str, Any]], str | None, float | None, int | None]:
    """Wait for a child that writes rows (and a ``{"_start": budget}`` line before each budget) to
    ``rows_path``. ``poll()`` gives its exit status once it has ended. It is killed when a budget
    runs past ``budget_timeout`` seconds ("timeout", final), at ``end_at`` (a ``time.monotonic()``),
    or when it takes longer than ``budget_timeout`` to start its first budget or to exit after its
    last row (both "cut": no budget ran over, so --resume runs it again). Returns its rows, the
    outcome (None when it ended by itself, or "timeout", "cut", "crashed"), the budget it was
    measuring when it ended or was killed (None after a row), and its exit status."""
    rows: list[dict[str, Any]] = []
    offset = 0
    current: float | None = None
    started = time.monotonic()

    def read() -> None:
        nonlocal offset, current, started
        new, offset = _read_rows(rows_path, offset)
        for row in new:
            if "_start" in row:
                current, started = row["_start"], time.monotonic()
            else:
                rows.append(row)
                current, started = None, time.monotonic()

    outcome = None
    while True:
        status = poll()
        read()  # after poll: a child that has ended has written everything
        if status is not None:
            outcome = "crashed" if status != 0 else None
            break
        now = time.monotonic()
        over = now - started > budget_timeout
        if over or (end_at is not None and now > end_at):
            # A budget ran over only if one was running (not before the first or after a row).
            ran_over = over and current is not None
            kill()
            status = poll()
            read()  # what it wrote between the last read and the kill
            outcome = "timeout" if ran_over else "cut"
            break
        time.sleep(0.1)
    if os.path.exists(rows_path):
        os.remove(rows_path)
    return rows, outcome, current, status


def _rows_path(log_path: str) -> str:
    """The file a child beside ``log_path`` writes its rows to, empty: a leftover of a killed run
    would be read as this child's."""
    rows_path = log_path + ".rows"
    if os.path.exists(rows_path):
        os.remove(rows_path)
    return rows_path


def run_forked(target: Callable[[Callable[[dict[str, Any]], None]], None], budget_timeout: float,
               end_at: float | None, log_path: str) -> tuple[list[dict[str, Any]], str | None, float | None, str]:
    """``target(emit)`` in a forked child, supervised (see :func:`supervise`); the last item says
    how the child ended."""
    rows_path = _rows_path(log_path)
    pid = _start_fork(target, log_path, rows_path)
    waited: dict[str, int] = {}

    def poll() -> int | None:
        if "status" not in waited:
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done:
                return None
            waited["status"] = status
        return waited["status"]

    def kill() -> None:
        os.kill(pid, signal.SIGKILL)
        waited["status"] = os.waitpid(pid, 0)[1]

    rows, outcome, current, status = supervise(poll, kill, rows_path, budget_timeout, end_at)
    if status is not None and os.WIFSIGNALED(status):
        how = f"killed by signal {os.WTERMSIG(status)}"
    else:
        how = f"exit status {os.waitstatus_to_exitcode(status) if status is not None else '?'}"
    return rows, outcome, current, how


def run_child(config: str, budgets: list[float], fork: bool, pipe: Any, budget_timeout: float,
              end_at: float | None, log_path: str) -> tuple[list[dict[str, Any]], str | None, float | None, str]:
    """Measure ``config`` at ``budgets`` in one child: forked from this process (holding ``pipe``)
    or, with ``fork=False``, a fresh process that reads the weights cache. See :func:`supervise`;
    the last item says how the child ended (exit status or signal)."""
    if fork:
        return run_forked(lambda emit: measure_config(pipe, config, budgets, emit), budget_timeout, end_at,
                          log_path)
    rows_path = _rows_path(log_path)
    cmd = [sys.executable, __file__, "--child", config, "--child-budgets", ",".join(map(str, budgets)),
           "--child-rows", rows_path, "--size", str(ARGS.size), "--steps", str(ARGS.steps),
           "--weights-cache", ARGS.weights_cache] + (["--tiny"] if ARGS.tiny else [])
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)

        def kill_proc() -> None:
            proc.kill()
            proc.wait()

        rows, outcome, current, status = supervise(proc.poll, kill_proc, rows_path, budget_timeout, end_at)
    how = f"killed by signal {-status}" if status is not None and status < 0 else f"exit status {status}"
    return rows, outcome, current, how


def _log_tail(path: str, chars: int = 800) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-chars:]
    except OSError:
        return ""


def environment() -> dict[str, Any]:
    import diffusers

    env: dict[str, Any] = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "python": platform.python_version(), "command": " ".join(sys.argv)}
    if torch.cuda.is_available() and not ARGS.tiny:
        # From nvidia-smi: this process must not initialize CUDA (the children fork from it).
        name, total_mib = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True, text=True, check=True).stdout.strip().rsplit(",", 1)
        env["device"] = name.strip()
        env["total_vram_gib"] = float(total_mib) / 1024
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
        if ok and below_floor(r, floor):
            ratio += "‡"  # faster than its floor: this row or an input of L(B) was mis-measured
        if ok and slowed(r):
            speed += " §"  # the GPU reported a slowdown or another process while it was measured
        print(f"{b:>6} {r['config']:<28} {r.get('status', '?'):<6} "
              f"{r.get('seconds_per_step', float('nan')):>7.3f} {r.get('seconds_per_image_28', float('nan')):>8.2f} "
              f"{r.get('peak_vram_gib', float('nan')):>6.2f} {r.get('peak_host_rss_gib', float('nan')):>6.1f} "
              f"{lb:>6} {ratio:>6} {speed:>18}")


#: Outcomes a resumed run does not repeat (a crash or an error is tried again).
_FINAL = ("ok", "OOM", "timeout")


def resumed(path: str) -> tuple[list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """The rows, commands and superseded rows of an earlier run to continue; refuses a file from
    another GPU or size."""
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
    return list(data["results"]), commands, list(data.get("superseded") or [])


def measure_again(results: list[dict[str, Any]], entries: list[str]) -> tuple[set[tuple[float, str]], list[str]]:
    """``--again``: the (budget, option) rows of a resumed run to measure again, each entry NAME or
    NAME@B1/B2 (without budgets, every row of NAME), and the --configs entries that measure exactly
    those (the reference, 'unoptimized', runs first anyway). Every row named must be in the file."""
    again: set[tuple[float, str]] = set()
    extra: list[str] = []
    for entry in entries:
        name, own = split_config(entry)
        if name not in CONFIGS:
            raise SystemExit(f"--again {entry}: unknown option; known: {', '.join(CONFIGS)}")
        held = list(dict.fromkeys(r["budget_gib"] for r in results if r["config"] == name))  # file order
        missing = [b for b in own or () if b not in held]
        if not held:
            raise SystemExit(f"--again {entry}: the resumed file has no such row to measure again")
        if missing:
            raise SystemExit(f"--again {entry}: the resumed file has no such row to measure again at "
                             f"{', '.join(f'{b:g}' for b in missing)} GiB (it has {name} at "
                             f"{', '.join(f'{b:g}' for b in held)} GiB)")
        budgets = own or held
        again |= {(b, name) for b in budgets}
        if name != "unoptimized":
            extra.append(f"{name}@{'/'.join(f'{b:g}' for b in budgets)}")
    return again, extra


def write_payload(path: str, results: list[dict[str, Any]], commands: list[str],
                  superseded: list[dict[str, Any]] | None = None) -> None:
    env = environment()
    payload = {"environment": env, "size": ARGS.size, "results": results,
               "commands": [*commands, env["command"]]}
    if superseded:
        payload["superseded"] = superseded
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


def split_config(entry: str) -> tuple[str, list[float] | None]:
    """``name`` or ``name@B1/B2``: a configuration and, where given, its own budgets (GiB) in place of
    --budgets (an option whose speed does not depend on the budget, measured where it matters)."""
    name, at, own = entry.partition("@")
    if not at:
        return name, None
    try:
        return name, [float(b) for b in own.split("/")]
    except ValueError:
        raise SystemExit(f"--configs {entry}: budgets after '@' are numbers in GiB separated by '/', "
                         f"e.g. {name}@4/8") from None


def plan_items(configs: list[str], budgets: list[float], done: set[tuple[float, str]],
               reference: bool) -> list[tuple[str, list[float]]]:
    """What to run, in order, as (config, budgets) per child: the reference first, then each config in
    the given order (a sweep config in one child, its budgets from the largest down; any other one
    child per budget), without what ``done`` already holds or an earlier entry named (entries may
    overlap: ``--again`` adds its own)."""
    items: list[tuple[str, list[float]]] = []
    planned = set(done)
    if reference and (0.0, "unoptimized") not in done:
        items.append(("unoptimized", [0.0]))
        planned.add((0.0, "unoptimized"))
    for entry in configs:
        config, own = split_config(entry)
        todo = list(dict.fromkeys(b for b in (budgets if own is None else own) if (b, config) not in planned))
        planned.update((b, config) for b in todo)
        if config in SWEEP_CONFIGS:
            if todo:
                # From the largest down; budget 0 is the whole GPU, the largest of all.
                items.append((config, sorted(todo, key=lambda b: math.inf if b <= 0 else b, reverse=True)))
        else:
            items += [(config, [b]) for b in todo]
    return items


def main() -> None:
    global ARGS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--budgets", default="8,12")
    p.add_argument("--configs", default="vramkit,vramkit-fp8,diffusers-leaf-stream,diffusers-leaf-stream-fp8",
                   help="comma-separated, in the order to run, each NAME or NAME@B1/B2 (its own budgets in "
                        "place of --budgets); 'suite' = every option the suite compares: "
                        + ",".join(SUITE))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--timeout", type=int, default=240,
                   help="seconds per configuration and budget (the first budget of a child includes its apply)")
    p.add_argument("--tiny", action="store_true", help="check the harness on the tiny CPU pipeline")
    p.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                   help="first run the unoptimized pipeline on the whole GPU (resident s/step and pinned "
                        "bandwidth: the inputs of L(B))")
    p.add_argument("--resume", metavar="JSON",
                   help="continue a run: keep that file's rows, skip the configurations it already measured "
                        "(ok, OOM or timeout; the reference too), append the rest (one run spread over several "
                        "calls on the same GPU; a file from another GPU is refused)")
    p.add_argument("--again", metavar="ENTRIES",
                   help="with --resume: measure these rows again (comma-separated NAME or NAME@B1/B2; "
                        "'unoptimized' is the reference), e.g. rows a throttled or shared GPU slowed; the rows "
                        "they replace move to the file's 'superseded' list, marked with this call's index")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="start no configuration later than a minute before this many seconds from the start "
                        "and cut any that runs past it (what it had not measured is recorded as 'cut' and runs "
                        "again on --resume), so that a time-limited call ends with its rows written")
    p.add_argument("--weights-cache",
                   help="where a fresh process on the GPU writes the random weights for this one to read "
                        "(default: /dev/shm where it has room and the cache is not kept, so that neither the "
                        "disk the options plan for nor their RAM holds it while they run; else .bench_cache/)")
    p.add_argument("--keep-weights-cache", action="store_true",
                   help="keep the weights cache once read (for the next call on the same machine); by default "
                        "it is deleted, so that the configurations measured see the disk free")
    p.add_argument("--log-dir", help="the children's output (default: a temporary folder; a crashed child's "
                   "last lines are in its row)")
    p.add_argument("--fork", action=argparse.BooleanOptionalAction, default=True,
                   help="fork each child from this process, which holds the weights (default); --no-fork "
                        "starts a fresh process per child instead (also the fallback where CUDA was "
                        "initialized here)")
    p.add_argument("--write-weights", help=argparse.SUPPRESS)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-budgets", help=argparse.SUPPRESS)
    p.add_argument("--child-rows", help=argparse.SUPPRESS)
    ARGS = p.parse_args()
    if ARGS.weights_cache is None:
        # Without forking every child reads the file, so it stays for the whole run: on the disk.
        ARGS.weights_cache = default_weights_cache(ARGS.keep_weights_cache or not ARGS.fork)
    if ARGS.write_weights:
        write_weights(ARGS.write_weights)
        return
    if ARGS.child:
        torch.set_num_threads(_THREADS)
        pipe = measured_pipeline()
        write_rows(ARGS.child_rows, lambda emit: measure_config(
            pipe, ARGS.child, [float(b) for b in ARGS.child_budgets.split(",")], emit))
        return
    # One thread here: this process never starts an OpenMP team that a forked child would inherit
    # without its threads. The children get _THREADS back.
    torch.set_num_threads(1)
    results: list[dict[str, Any]] = []
    commands: list[str] = []
    superseded: list[dict[str, Any]] = []
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"pipeline_{ARGS.size}{'_tiny' if ARGS.tiny else ''}.json")
    if ARGS.resume:
        if not os.path.exists(ARGS.resume):
            raise SystemExit(f"--resume {ARGS.resume}: no such file (a mistyped path would silently start over).")
        results, commands, superseded = resumed(ARGS.resume)
    budgets = [float(b) for b in ARGS.budgets.split(",")]
    configs = list(SUITE) if ARGS.configs == "suite" else ARGS.configs.split(",")
    unknown = [c for c in configs if split_config(c)[0] not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; known: {', '.join(CONFIGS)} (or 'suite')")
    this_call = len(commands) + 1  # this call's 1-based index in the file's commands
    again: set[tuple[float, str]] = set()
    if ARGS.again:
        if not ARGS.resume:
            raise SystemExit("--again measures rows of a resumed run again: give the file with --resume")
        entries = ARGS.again.split(",")
        if "unoptimized" in (split_config(e)[0] for e in entries) and not ARGS.reference:
            raise SystemExit("--again unoptimized measures the reference again: drop --no-reference")
        again, extra = measure_again(results, entries)
        # What is measured again runs even where --configs does not name it (plan_items drops what
        # both name).
        configs += extra
    done = {(r["budget_gib"], r["config"]) for r in results if r.get("status") in _FINAL} - again
    items = plan_items(configs, budgets, done, ARGS.reference)
    if ARGS.resume:
        log(f"resuming {ARGS.resume}: {len(done)} row(s) already measured, {sum(len(b) for _, b in items)} to go")
    # A crashed or cut row of a configuration that runs again is replaced, not kept beside it. A
    # final row named by --again stays until its new measurement is final too (a deadline or a
    # crash may come first).
    to_run = {(b, c) for c, bs in items for b in bs}
    results = [r for r in results if (r["budget_gib"], r["config"]) not in to_run - again]
    # Not under $OUT: the device tool brings back only a few files, and a folder of logs there once
    # cost a call its results.
    log_dir = ARGS.log_dir or tempfile.mkdtemp(prefix="bench_pipeline_logs_")
    os.makedirs(log_dir, exist_ok=True)
    fork = ARGS.fork
    if items and fork:
        pipe = measured_pipeline()
        if torch.cuda.is_initialized():
            log("CUDA was initialized in this process (an import?): forked children could not use it; "
                "starting a fresh process per child instead")
            fork = False
            del pipe
            if not ARGS.tiny and ARGS.weights_cache.startswith("/dev/shm/"):
                # Every child reads it now, so it stays for the run: not in RAM the options plan for.
                kept = default_weights_cache(keep=True)
                os.makedirs(os.path.dirname(kept), exist_ok=True)
                for suffix in ("", ".json"):  # the index last: a file without one is rebuilt
                    shutil.move(ARGS.weights_cache + suffix, kept + suffix)
                ARGS.weights_cache = kept
        elif not ARGS.tiny and not ARGS.keep_weights_cache:
            # Read, so no longer needed: its 31 GiB would otherwise sit on the disk the options plan
            # for (vramkit puts fp8 originals in its offload folder only where the disk has room).
            for name in (ARGS.weights_cache + ".json", ARGS.weights_cache):
                os.remove(name)
    elif items and not ARGS.tiny:
        cached_pipeline(ARGS.weights_cache, read=False)  # built once, read by each child
    for n, (config, item_budgets) in enumerate(items):
        elapsed = time.perf_counter() - _STARTED
        end_at = None
        if ARGS.deadline is not None:
            if elapsed + 60 > ARGS.deadline:
                left = [(b, c) for c, bs in items[n:] for b in bs]
                log(f"deadline: {len(left)} configuration(s) not started: " + ", ".join(f"{b:g} {c}" for b, c in left))
                break
            end_at = time.monotonic() + ARGS.deadline - elapsed
        log(f"{config} at {', '.join(f'{b:g}' for b in item_budgets)} GiB")
        t_item = time.perf_counter()
        log_path = os.path.join(log_dir, f"child_{ARGS.size}_{config}_{item_budgets[0]:g}.log")
        rows, outcome, current, how = run_child(config, item_budgets, fork, pipe if fork else None, ARGS.timeout,
                                                end_at, log_path)
        wall = time.perf_counter() - t_item
        for row in rows:
            row["child_wall_seconds"] = wall
            row["measured_by_command"] = this_call
        measured = {r["budget_gib"] for r in rows}
        # The budget in progress when the child ended; budgets after it never started.
        stopped_at = current if current is not None else next((b for b in item_budgets if b not in measured), None)
        for b in item_budgets:
            if b in measured:
                continue
            row = {"config": config, "budget_gib": b, "harness": "sweep" if len(item_budgets) > 1 else "fork"}
            if outcome == "cut":
                # Stopped by --deadline: not final, --resume runs it again.
                row.update(status="cut", error="the call's deadline came first")
            elif outcome == "timeout":
                # Past --timeout: final. The budgets after it were not run (the option's speed does not
                # depend on the budget, so they would take as long).
                row.update(status="timeout", timeout_s=ARGS.timeout)
                if b != stopped_at:
                    row["error"] = f"not run: timeout at {stopped_at:g} GiB in the same process"
            else:
                # Not final: run again on --resume.
                row.update(status="crashed", error=f"child {how}: " + (
                    _log_tail(log_path) if b == stopped_at else f"not run after it crashed at {stopped_at:g} GiB"))
            rows.append(row)
        for row in rows:
            key = (row["budget_gib"], row["config"])
            earlier = next((r for r in results if (r["budget_gib"], r["config"]) == key), None)
            if earlier is not None and row.get("status") not in _FINAL:
                log(f"  {key[0]:g} GiB {key[1]}: not measured again ({row.get('status')}); the earlier row stays")
                continue
            if earlier is not None:
                # Measured again: the row it replaces stays in the file, marked with this call.
                results.remove(earlier)
                superseded.append(dict(earlier, superseded_by_command=this_call))
            results.append(row)
        for row in rows:
            log(f"  {row['budget_gib']:g} GiB -> {row.get('status')} {row.get('seconds_per_step', '')}")
        log(f"  ({wall:.0f} s)")
        # Written after every child: a run cut short still leaves what it measured.
        write_payload(path, results, commands, superseded)
    write_payload(path, results, commands, superseded)  # also when the deadline or --resume left nothing to run
    print_table(results)
    print(f"wrote {path}")


ARGS: argparse.Namespace
#: When this process started: --deadline counts from here (imports and loading a resumed file included).
_STARTED = time.perf_counter()
if __name__ == "__main__":
    main()
