"""``vramkit doctor``: is this machine and environment ready for vramkit, and if not, what to do.

:func:`run_doctor` checks the versions of torch, diffusers, transformers, accelerate and the
optional quantization packages (and that they import together), CUDA and MPS, free VRAM and host
RAM, the pinned host-to-device bandwidth and the CUDA allocator's ``expandable_segments`` setting.
Each :class:`Finding` has a status (``ok``, ``warn``, ``fail`` or ``skipped``), what was found and
the fix. :func:`doctor_main` is the command: exit status 0 unless a check failed.

Nothing runs at import; CUDA is initialized only by :func:`run_doctor`, after the allocator
setting has been checked.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("vramkit")

__all__ = [
    "Finding",
    "DoctorReport",
    "run_doctor",
    "format_doctor",
    "doctor_main",
    "add_doctor_arguments",
    "doctor_from_args",
    "STATUSES",
]

#: Statuses of a finding, best to worst ("skipped": the check does not apply here, e.g. no GPU).
STATUSES = ("ok", "skipped", "warn", "fail")
_GIB = 1024**3
_BANDWIDTH_BYTES = 256 * 1024**2
#: Below this pinned host-to-device rate (bytes/s), streamed plans are slow (PCIe 3.0 x16 gives ~12 GB/s).
SLOW_BANDWIDTH = 10e9
#: Below this available host RAM, FLUX.1's bf16 weights (about 33 GB) cannot all stay in RAM.
LOW_RAM = 16 * _GIB
_QUANT_FIX = "pip install 'vramkit[quant]'"


@dataclass(frozen=True)
class Finding:
    """One check: ``status`` in :data:`STATUSES`, ``detail`` (what was found) and ``fix`` (what to
    do; empty when nothing)."""

    check: str
    status: str
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status, "detail": self.detail, "fix": self.fix}


@dataclass
class DoctorReport:
    """Every finding, in the order checked, and the versions found (``None``: not installed)."""

    findings: list[Finding] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """The worst status of any finding (``ok`` when there is none)."""
        return max((f.status for f in self.findings), key=STATUSES.index, default="ok")

    @property
    def exit_code(self) -> int:
        """0 unless a check failed."""
        return 1 if any(f.status == "fail" for f in self.findings) else 0

    @property
    def skipped(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "skipped"]

    def get(self, check: str) -> Finding | None:
        """The finding of ``check``, if it ran."""
        return next((f for f in self.findings if f.check == check), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "versions": dict(self.versions),
            "findings": [f.to_dict() for f in self.findings],
            "skipped": [f.check for f in self.skipped],
        }


# --- versions -----------------------------------------------------------------------------------

#: (distribution, import name, minimum version, required, what vramkit uses it for)
_PACKAGES: tuple[tuple[str, str, str, bool, str], ...] = (
    ("torch", "torch", "2.4", True, "everything"),
    ("diffusers", "diffusers", "0.36", True, "the FLUX pipelines and the hooks API"),
    ("transformers", "transformers", "4.50", True, "the CLIP and T5 text encoders"),
    ("accelerate", "accelerate", "1.0", True, "offloading and device placement"),
    ("bitsandbytes", "bitsandbytes", "0.45", False, "Quantize(backend='bitsandbytes')"),
    ("optimum-quanto", "optimum.quanto", "0.2.6", False, "Quantize(backend='quanto')"),
    ("torchao", "torchao", "0.10", False, "Quantize(backend='torchao')"),
)


def _installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_key(version: str) -> tuple[int, ...]:
    """``'2.13.0+cu130'`` -> ``(2, 13, 0)``; pre-release tags sort as their release."""
    parts = re.findall(r"\d+", version.split("+")[0].split("-")[0])[:3]
    return tuple(int(p) for p in parts)


def _at_least(version: str, minimum: str) -> bool:
    try:
        from packaging.version import InvalidVersion, Version
    except ImportError:
        return _version_key(version) >= _version_key(minimum)
    try:
        return Version(version).release >= Version(minimum).release
    except InvalidVersion:
        return _version_key(version) >= _version_key(minimum)


def _import_error(module: str) -> str | None:
    """``None`` if ``module`` imports, else the error in one line."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding (ImportError, OSError, RuntimeError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {first}"
    return None


def _package_findings(report: DoctorReport, check_imports: bool) -> None:
    torch_version = _installed_version("torch")
    for dist, module, minimum, required, purpose in _PACKAGES:
        version = _installed_version(dist)
        report.versions[dist] = version
        install = f"pip install -U '{dist}>={minimum}'"
        if version is None:
            if required:
                report.findings.append(
                    Finding(dist, "fail", f"not installed (vramkit needs it for {purpose})", install)
                )
            else:
                report.findings.append(
                    Finding(dist, "ok", f"not installed (optional: only {purpose} needs it)", _QUANT_FIX)
                )
            continue
        if not _at_least(version, minimum):
            report.findings.append(
                Finding(
                    dist,
                    "fail" if required else "warn",
                    f"{version} is older than the {minimum} vramkit needs (for {purpose})",
                    install,
                )
            )
            continue
        error = _import_error(module) if check_imports else None
        if error is not None:
            fix = (
                f"install a {dist} built for torch {torch_version} (or a torch it supports): pip install -U {dist}"
                if dist != "torch"
                else "reinstall torch: see https://pytorch.org/get-started/locally/"
            )
            report.findings.append(
                Finding(
                    dist,
                    "fail" if required else "warn",
                    f"{version} is installed but does not import with torch {torch_version}: {error}",
                    fix,
                )
            )
            continue
        report.findings.append(Finding(dist, "ok", f"{version}" + ("" if check_imports else " (import not checked)")))


def _diffusers_hooks_finding(report: DoctorReport) -> None:
    version = report.versions.get("diffusers")
    if version is None or not _at_least(version, "0.36"):
        report.findings.append(
            Finding("diffusers_hooks", "skipped", "needs diffusers >= 0.36, see the diffusers finding")
        )
        return
    try:
        hooks = importlib.import_module("diffusers.hooks")
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        report.findings.append(
            Finding(
                "diffusers_hooks",
                "fail",
                f"diffusers.hooks does not import: {type(exc).__name__}: {exc}",
                "pip install -U 'diffusers>=0.36' 'transformers>=4.50' 'accelerate>=1.0'",
            )
        )
        return
    missing = [n for n in ("HookRegistry", "ModelHook", "apply_group_offloading") if not hasattr(hooks, n)]
    if missing:
        report.findings.append(
            Finding(
                "diffusers_hooks",
                "fail",
                f"diffusers {version} lacks {', '.join(missing)} in diffusers.hooks",
                "pip install -U 'diffusers>=0.36'",
            )
        )
    else:
        report.findings.append(
            Finding("diffusers_hooks", "ok", "diffusers.hooks has HookRegistry and group offloading")
        )


def _flux_finding(report: DoctorReport) -> None:
    """diffusers, transformers and torch together: the FLUX classes vramkit drives must import."""
    if any(report.versions.get(d) is None for d in ("diffusers", "transformers")):
        report.findings.append(Finding("flux_classes", "skipped", "diffusers or transformers is not installed"))
        return
    try:
        diffusers = importlib.import_module("diffusers")
        transformers = importlib.import_module("transformers")
        for owner, names in (
            (diffusers, ("FluxPipeline", "FluxTransformer2DModel", "AutoencoderKL")),
            (transformers, ("CLIPTextModel", "T5EncoderModel")),
        ):
            for name in names:
                getattr(owner, name)
    except Exception as exc:  # noqa: BLE001 - any failure to import the classes is the finding
        report.findings.append(
            Finding(
                "flux_classes",
                "fail",
                f"the FLUX classes do not import together: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                "pip install -U 'diffusers>=0.36' 'transformers>=4.50' 'accelerate>=1.0' (matching versions)",
            )
        )
        return
    report.findings.append(Finding("flux_classes", "ok", "FluxPipeline, the FLUX transformer, CLIP and T5 import"))


# --- devices ------------------------------------------------------------------------------------


def _device_findings(report: DoctorReport, torch: Any) -> bool:
    """CUDA and MPS findings; whether CUDA is usable."""
    cuda_build = torch.version.cuda
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = []
        for i in range(count):
            major, minor = torch.cuda.get_device_capability(i)
            names.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
        report.findings.append(Finding("cuda", "ok", f"CUDA {cuda_build}: " + "; ".join(names)))
        cuda = True
    elif cuda_build:
        report.findings.append(
            Finding(
                "cuda",
                "warn",
                f"torch is built for CUDA {cuda_build} but sees no GPU: vramkit runs on the CPU",
                "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES",
            )
        )
        cuda = False
    else:
        report.findings.append(
            Finding(
                "cuda",
                "warn",
                f"torch {torch.__version__} is a CPU-only build: no GPU, vramkit runs on the CPU",
                "on a machine with an NVIDIA GPU, install a CUDA build of torch "
                "(https://pytorch.org/get-started/locally/)",
            )
        )
        cuda = False
    mps = getattr(torch.backends, "mps", None)
    if sys.platform != "darwin" or mps is None:
        report.findings.append(Finding("mps", "skipped", "not macOS: Apple's MPS does not apply"))
    elif mps.is_available():
        report.findings.append(Finding("mps", "ok", "Apple MPS is available"))
    else:
        report.findings.append(
            Finding(
                "mps",
                "warn",
                "macOS, but MPS is not available",
                "use macOS 12.3+ on Apple silicon with an arm64 Python",
            )
        )
    return cuda


def _alloc_conf() -> tuple[str | None, str]:
    """The allocator configuration string in effect and the variable it came from."""
    for var in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        value = os.environ.get(var)
        if value:
            return value, var
    return None, "PYTORCH_CUDA_ALLOC_CONF"


def _expandable_finding(report: DoctorReport, cuda: bool, initialized_before: bool) -> None:
    value, var = _alloc_conf()
    options = {}
    for part in (value or "").split(","):
        key, _, val = part.partition(":")
        options[key.strip()] = val.strip()
    enabled = options.get("expandable_segments", "").lower() == "true"
    fix = (
        "export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before starting Python (or set "
        "os.environ['PYTORCH_CUDA_ALLOC_CONF'] at the very top of the script): it must be set before CUDA initializes"
    )
    shown = f"{var}={value!r}" if value else f"{var} is not set"
    if not cuda:
        report.findings.append(
            Finding("expandable_segments", "skipped", f"no CUDA device: only the CUDA allocator reads it ({shown})")
        )
        return
    if enabled:
        detail = f"{shown}: expandable segments on (less fragmentation on a tight budget)"
        if initialized_before:
            detail += "; CUDA was already initialized in this process, so it holds only if it was set before that"
        report.findings.append(Finding("expandable_segments", "ok", detail))
        return
    detail = (
        f"{shown}: without expandable segments the caching allocator fragments, so reserved VRAM can exceed "
        "allocated VRAM by gigabytes on a tight budget"
    )
    if initialized_before:
        detail += (
            ". CUDA is already initialized in this process: setting it now has no effect here; set it before "
            "the first CUDA call (restart the Python process or notebook kernel)"
        )
    report.findings.append(Finding("expandable_segments", "warn", detail, fix))


def _vram_finding(report: DoctorReport, torch: Any, cuda: bool) -> None:
    if not cuda:
        report.findings.append(Finding("vram", "skipped", "no CUDA device: no VRAM to measure"))
        return
    parts = []
    busy = False
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        parts.append(f"cuda:{i} {free / _GIB:.1f} GiB free of {total / _GIB:.1f} GiB")
        busy = busy or free < total / 2
    if busy:
        report.findings.append(
            Finding(
                "vram",
                "warn",
                "; ".join(parts) + " (other processes hold over half of it)",
                "free the GPU (nvidia-smi lists the processes) or give vramkit.optimize(pipe, vram=...) "
                "the budget you can spare",
            )
        )
    else:
        report.findings.append(Finding("vram", "ok", "; ".join(parts)))


def _ram_finding(report: DoctorReport) -> None:
    from ..memory.probe import host_memory

    total, available, notes = host_memory()
    detail = f"{available / _GIB:.1f} GiB available of {total / _GIB:.1f} GiB" + (
        f" ({'; '.join(notes)})" if notes else ""
    )
    if available < LOW_RAM:
        report.findings.append(
            Finding(
                "ram",
                "warn",
                detail + ": FLUX.1's bf16 weights take about 33 GB, so plans must quantize or keep weights on the GPU",
                "free host memory, raise the container's memory limit, or use "
                "quantized storage (vramkit plans it when RAM is short)",
            )
        )
    else:
        report.findings.append(Finding("ram", "ok", detail))


def _bandwidth_finding(report: DoctorReport, cuda: bool, measure: bool) -> None:
    if not cuda:
        report.findings.append(Finding("h2d_bandwidth", "skipped", "no CUDA device: no host-to-device copy to measure"))
        return
    if not measure:
        report.findings.append(Finding("h2d_bandwidth", "skipped", "not measured (--no-bandwidth)"))
        return
    from ..memory.probe import measure_h2d_bandwidth

    try:
        rate = measure_h2d_bandwidth("cuda", nbytes=_BANDWIDTH_BYTES)
    except RuntimeError as exc:
        report.findings.append(
            Finding(
                "h2d_bandwidth",
                "warn",
                f"a 256 MiB pinned copy failed: {str(exc).splitlines()[0]}",
                "page-locking may be limited: raise the memlock limit (ulimit -l unlimited; in Docker "
                "--ulimit memlock=-1) and check free host RAM",
            )
        )
        return
    detail = f"pinned host-to-device {rate / 1e9:.1f} GB/s (256 MiB copy)"
    if rate < SLOW_BANDWIDTH:
        report.findings.append(
            Finding(
                "h2d_bandwidth",
                "warn",
                detail + ": streamed and offloaded plans will be slow",
                "check the GPU's PCIe link (nvidia-smi -q | grep -A2 'Link Width'), the slot it sits in, "
                "and that the GPU is not behind a shared switch",
            )
        )
    else:
        report.findings.append(Finding("h2d_bandwidth", "ok", detail))


def _offload_finding(report: DoctorReport) -> None:
    from ..memory.probe import default_offload_folder, files_nbytes, offload_free_bytes, stale_offload_files

    folder = default_offload_folder()
    free = offload_free_bytes(folder)
    stale = stale_offload_files(folder)
    where = f"{folder} ({'exists' if folder.exists() else 'created when first needed'})"
    if free is None:
        report.findings.append(Finding("offload_folder", "skipped", f"{where}: free space not readable"))
        return
    detail = f"{where}: {free / _GIB:.1f} GiB free"
    if stale:
        size = files_nbytes(stale)
        report.findings.append(
            Finding(
                "offload_folder",
                "warn",
                detail + f", of which {size / _GIB:.1f} GiB in {len(stale)} offload file(s) left by a process "
                "that was killed",
                "nothing to do if vramkit will stream from disk again (it deletes them before writing); "
                f"else delete {folder}/*.vramkit-offload files that no running process uses",
            )
        )
    else:
        report.findings.append(Finding("offload_folder", "ok", detail))


def run_doctor(*, measure_bandwidth: bool = True, check_imports: bool = True) -> DoctorReport:
    """Run every check and return the findings (see the module docstring).

    Args:
        measure_bandwidth: time a 256 MiB pinned host-to-device copy when CUDA is available.
        check_imports: import each installed package to prove it works with this torch.
    """
    report = DoctorReport()
    report.findings.append(Finding("python", "ok", f"{platform.python_version()} ({sys.executable})"))
    try:
        import torch
    except ImportError as exc:
        report.versions["torch"] = _installed_version("torch")
        report.findings.append(Finding("torch", "fail", f"does not import: {exc}", "pip install torch"))
        return report
    initialized_before = bool(torch.cuda.is_initialized())
    _package_findings(report, check_imports)
    report.versions["vramkit"] = _installed_version("vramkit")
    _diffusers_hooks_finding(report)
    _flux_finding(report)
    cuda = _device_findings(report, torch)
    _expandable_finding(report, cuda, initialized_before)
    _vram_finding(report, torch, cuda)
    _ram_finding(report)
    _bandwidth_finding(report, cuda, measure_bandwidth)
    _offload_finding(report)
    return report


def format_doctor(report: DoctorReport) -> str:
    """The findings as text: one line each, the fix under it, then a summary naming what was skipped."""
    width = max((len(f.check) for f in report.findings), default=0)
    lines = ["vramkit doctor"]
    for f in report.findings:
        lines.append(f"  {'[' + f.status + ']':<9} {f.check.ljust(width)}  {f.detail}")
        if f.fix and f.status in ("warn", "fail"):
            lines.append(f"  {'':<9} {''.ljust(width)}  fix: {f.fix}")
    counts = {s: sum(1 for f in report.findings if f.status == s) for s in STATUSES}
    summary = ", ".join(f"{counts[s]} {s}" for s in ("ok", "warn", "fail", "skipped"))
    lines.append(f"summary: {summary}")
    if report.skipped:
        lines.append("skipped: " + "; ".join(f"{f.check} ({f.detail})" for f in report.skipped))
    lines.append("result: " + ("FAIL: fix the failed checks above" if report.exit_code else "ready"))
    return "\n".join(lines)


def add_doctor_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``vramkit doctor``'s options to ``parser`` (a subcommand's parser, say)."""
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--no-bandwidth", action="store_true", help="skip the 256 MiB pinned host-to-device copy")
    parser.add_argument(
        "--no-imports", action="store_true", help="do not import the installed packages to check they work"
    )
    return parser


def doctor_from_args(args: argparse.Namespace, write: Callable[[str], Any] | None = None) -> int:
    """Run the doctor for parsed :func:`add_doctor_arguments` options; write the output; exit status."""
    out = write if write is not None else sys.stdout.write
    # Packages imported by the checks may print; keep stdout for the findings (valid JSON with --json).
    with contextlib.redirect_stdout(sys.stderr):
        report = run_doctor(measure_bandwidth=not args.no_bandwidth, check_imports=not args.no_imports)
    if args.json:
        out(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out(format_doctor(report) + "\n")
    return report.exit_code


def doctor_main(argv: Sequence[str] | None = None) -> int:
    """``vramkit doctor [--json] [--no-bandwidth] [--no-imports]``: print the findings; 0 unless a check failed."""
    parser = add_doctor_arguments(
        argparse.ArgumentParser(prog="vramkit doctor", description="Check that this machine is ready for vramkit.")
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    return doctor_from_args(args)
