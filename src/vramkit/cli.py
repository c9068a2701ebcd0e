"""The ``vramkit`` command line.

    vramkit plan --model flux-dev --vram 8GiB --size 1024x1024 [--ram 32GiB] [--batch 1]
                 [--quality auto|lossless] [--bandwidth 25GB/s] [--steps 28] [--json]
    vramkit plan --model flux-dev --vram cuda:0=12GiB,cuda:1=12GiB   (several GPUs; or --devices 2 --vram 12GiB)
    vramkit probe [--device cuda:0] [--json] [--no-measure]

``plan`` plans for the full-size architecture built on the meta device: no GPU and no weights are
needed. Bad input prints one line on stderr and exits with 2; an infeasible budget exits with 1.

Adding a subcommand: write ``_configure_x(parser)`` and ``_run_x(args) -> int`` and append a
:class:`Command` to :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NoReturn

from .errors import InvalidBudgetError, InvalidRequestError, PlanInfeasibleError, VramkitError

__all__ = ["main", "Command", "COMMANDS", "build_parser"]

#: RAM assumed for ``vramkit plan`` without ``--ram`` on a machine without a GPU (planning for
#: another machine): a typical workstation with a 8-24 GiB card.
ASSUMED_RAM = "64GiB"

_GiB = 1024**3


class UsageError(Exception):
    """Bad command-line input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, how to add its arguments and how to run it."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- plan -----------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    """``"1360x768"`` -> ``(width, height)``; one number means a square."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×*,]\s*(\d+))?\s*", text)
    if not m:
        raise UsageError(f"--size {text!r} is not WIDTHxHEIGHT (e.g. 1024x1024 or 1360x768)")
    width = int(m.group(1))
    height = int(m.group(2)) if m.group(2) else width
    return width, height


def _configure_plan(p: argparse.ArgumentParser) -> None:
    from .memory.architectures import PIPELINE_MODELS

    p.add_argument("--model", required=True, help="one of: " + ", ".join(PIPELINE_MODELS))
    p.add_argument(
        "--vram",
        action="append",
        help="GPU memory budget: bytes, 8GiB, 8GB, 7.5 GiB, or 80%% of this GPU; per device for several GPUs: "
        "cuda:0=12GiB,cuda:1=12GiB (or repeat --vram cuda:1=12GiB)",
    )
    p.add_argument("--devices", type=int, default=None, help="plan across this many GPUs, each with the --vram budget")
    p.add_argument("--ram", help="host RAM budget (default: available RAM here; 64GiB assumed without a GPU)")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT, multiples of 16 (default 1024x1024)")
    p.add_argument("--batch", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--quality", default="auto", choices=("auto", "lossless"), help="lossless: bit-identical output")
    p.add_argument("--bandwidth", help="pinned host-to-device bandwidth, e.g. 25GB/s (default: measured, or 25GB/s)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model's)")
    p.add_argument("--true-cfg", action="store_true", help="a negative-prompt pass every step")
    p.add_argument("--calibration", help="calibration JSON written by benchmarks/calibrate.py")
    p.add_argument(
        "--compile", action="store_true", help="also torch.compile the transformer's blocks (the plan says which mode)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _vram_arg(values: list[str] | None, devices: int | None) -> str | dict[str, str] | None:
    """``--vram`` (repeatable) and ``--devices`` as a ``vram=`` argument: one budget, or a mapping of
    devices to budgets (``cuda:0=12GiB,cuda:1=12GiB``; ``--devices 2 --vram 12GiB``)."""
    if devices is not None and devices < 1:
        raise UsageError(f"--devices {devices}: must be at least 1")
    if not values:
        if devices is not None:
            raise UsageError("--devices needs --vram, the budget of each device (e.g. --devices 2 --vram 12GiB)")
        return None
    items = [item.strip() for v in values for item in v.split(",") if item.strip()]
    named = [item for item in items if "=" in item]
    if not named:
        if len(items) != 1:
            raise UsageError(f"--vram given {len(items)} budgets without devices; name them: cuda:0=12GiB,cuda:1=12GiB")
        if devices is None:
            return items[0]
        return {f"cuda:{i}": items[0] for i in range(devices)}
    if len(named) != len(items):
        raise UsageError("--vram mixes a plain budget with per-device ones; name every device (cuda:0=12GiB,...)")
    if devices is not None:
        raise UsageError("--devices goes with one plain --vram budget; per-device budgets already name the devices")
    out: dict[str, str] = {}
    from .memory.budget import device_key

    for item in named:
        key, _, amount = item.partition("=")
        name = device_key(key.strip())
        if name in out:
            raise InvalidBudgetError(f"--vram names {name} twice; give each device once.")
        out[name] = amount.strip()
    return out


def _run_plan(args: argparse.Namespace) -> int:
    from .memory.architectures import PIPELINE_MODELS
    from .memory.budget import parse_bandwidth, parse_budget
    from .memory.calibration import Calibration
    from .memory.probe import probe
    from .planner import Request, budget_for, budget_for_devices, plan_for, probe_devices, spec_from_model
    from .planner.spec import validate_size

    if args.model not in PIPELINE_MODELS:
        raise UsageError(f"unknown model {args.model!r}; use one of: {', '.join(PIPELINE_MODELS)}")
    width, height = _parse_size(args.size)
    validate_size(height, width)
    if args.batch < 1:
        raise InvalidRequestError(f"--batch {args.batch}: must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise InvalidRequestError(f"--steps {args.steps}: must be at least 1")
    # Check every budget before the (slower) model build, so bad input fails fast.
    found = probe(measure_bandwidth=args.bandwidth is None)
    vram = _vram_arg(args.vram, args.devices)
    if vram is None and not found.is_gpu:
        raise UsageError("no GPU found here: give --vram (e.g. --vram 8GiB) to plan for a GPU")
    if isinstance(vram, str):
        parse_budget(vram, total=found.total_vram or None, what="--vram")
    ram = args.ram
    notes: list[str] = []
    if ram is None and not found.is_gpu:
        ram = ASSUMED_RAM
        notes.append(f"no GPU here, so the host RAM of the target is assumed: {ASSUMED_RAM} (give --ram)")
    if ram is not None:
        parse_budget(ram, total=found.ram_total or None, what="--ram")
    if args.bandwidth is not None:
        parse_bandwidth(args.bandwidth)
    pm = PIPELINE_MODELS[args.model]
    request = Request(
        height=height,
        width=width,
        batch_size=args.batch,
        max_sequence_length=args.max_sequence_length or pm.max_sequence_length,
        num_inference_steps=args.steps or pm.num_inference_steps,
        true_cfg=bool(args.true_cfg),
    )
    calibration = Calibration.load(args.calibration) if args.calibration else None
    started = time.perf_counter()
    spec = spec_from_model(args.model)
    if isinstance(vram, dict):
        import torch

        # On a machine without CUDA the plan is for another machine: any cuda:N is accepted.
        cuda = torch.cuda.is_available()
        budget, budget_notes = budget_for_devices(
            probe_devices(measure_bandwidth=args.bandwidth is None) if cuda else [],
            vram=vram,
            ram=ram,
            bandwidth=args.bandwidth,
            visible=torch.cuda.device_count() if cuda else None,
            host=found,
        )
    else:
        budget, budget_notes = budget_for(found, vram=vram, ram=ram, bandwidth=args.bandwidth)
    if notes:  # the RAM budget was assumed, not given
        budget_notes = [n.replace("(given)", "(assumed)") if n.startswith("RAM budget") else n for n in budget_notes]
    budget = replace(budget, notes=tuple(notes + budget_notes))
    try:
        plan = plan_for(spec, request, budget, args.quality, calibration=calibration, compile=args.compile)
    except PlanInfeasibleError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "minimum_vram": exc.minimum_vram, "minimum_ram": exc.minimum_ram}))
        raise
    elapsed = time.perf_counter() - started
    if args.json:
        p = plan.predicted
        assert p is not None
        out: dict[str, Any] = {
            "model": args.model,
            "predicted_peak_vram": int(p.peak_vram),
            "predicted_peak_ram": int(p.peak_ram),
            "predicted_seconds_per_step": float(p.seconds_per_step),
            "predicted_seconds_per_image": float(p.seconds_per_image),
            "lossless": plan.lossless,
            "steps": [
                {
                    "strategy": s.strategy.name,
                    "component": s.component,
                    "reason": s.reason,
                    "config": s.strategy.to_dict(),
                    "lossless": s.lossless,
                    "reversible": s.reversible,
                }
                for s in plan.steps
            ],
            "rejected": [r.to_dict() for r in plan.rejected],
            "request": plan.request,
            "notes": plan.notes,
            "planning_seconds": round(elapsed, 3),
            "plan": plan.to_dict(),
        }
        print(json.dumps(out, indent=2))
    else:
        print(f"{pm.name}: {pm.description}")
        print(plan.explain())
    return 0


# --- probe ----------------------------------------------------------------------------------------


def _configure_probe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="device to probe (default: cuda, else mps, else cpu)")
    p.add_argument("--no-measure", action="store_true", help="do not measure the bandwidth (cached or assumed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _run_probe(args: argparse.Namespace) -> int:
    from .memory.budget import format_bytes
    from .memory.probe import probe

    try:
        found = probe(args.device, measure_bandwidth=not args.no_measure)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequestError(f"cannot probe device {args.device!r}: {exc}") from None
    if args.json:
        print(json.dumps(found.to_dict(), indent=2))
        return 0
    rows = [
        ("device", f"{found.device} ({found.name})"),
        ("VRAM total", format_bytes(found.total_vram)),
        ("VRAM free", format_bytes(found.free_vram)),
        ("RAM total", format_bytes(found.ram_total)),
        ("RAM available", format_bytes(found.ram_available)),
        ("pinned limit", format_bytes(found.pinned_limit)),
        ("h2d bandwidth", f"{found.h2d_bandwidth / 1e9:.1f} GB/s ({found.bandwidth_source})"),
    ]
    if found.offload_free is not None:
        rows.append(("offload free", format_bytes(found.offload_free)))
    for label, value in rows:
        print(f"{label:<14} {value}")
    for note in found.notes:
        print(f"note: {note}")
    return 0


#: The subcommands, in help order. Append a Command to add one.
def _configure_doctor(p: argparse.ArgumentParser) -> None:
    from .profiling.doctor import add_doctor_arguments

    add_doctor_arguments(p)


def _run_doctor(args: argparse.Namespace) -> int:
    from .profiling.doctor import doctor_from_args

    return doctor_from_args(args)


COMMANDS: tuple[Command, ...] = (
    Command("plan", "plan a FLUX pipeline for a memory budget (no GPU or weights needed)", _configure_plan, _run_plan),
    Command("probe", "show the GPU, host RAM and bandwidth this machine offers", _configure_probe, _run_probe),
    Command(
        "doctor",
        "check versions, GPU, free memory, pinned bandwidth and allocator settings",
        _configure_doctor,
        _run_doctor,
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser with one subparser per command."""
    parser = _Parser(prog="vramkit", description="Run FLUX pipelines on any GPU memory budget.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


_VALUE_OPTIONS = ("--vram", "--ram", "--bandwidth", "--size", "--batch", "--steps")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--vram -8GiB`` -> ``--vram=-8GiB``, so a negative size is reported as such rather than
    as a missing argument."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in _VALUE_OPTIONS and i + 1 < len(argv) and re.match(r"-\.?\d", argv[i + 1]):
            out.append(f"{arg}={argv[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``vramkit`` command line; return the exit status (0 ok, 1 infeasible, 2 bad input)."""
    logging.getLogger("vramkit").setLevel(logging.WARNING)
    parser = build_parser()
    try:
        args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return 2
        return int(args._run(args))
    except UsageError as exc:
        print(f"vramkit: error: {exc}", file=sys.stderr)
        return 2
    except (InvalidBudgetError, InvalidRequestError) as exc:
        print(f"vramkit: error: {exc}", file=sys.stderr)
        return 2
    except PlanInfeasibleError as exc:
        print(f"vramkit: infeasible: {exc}", file=sys.stderr)
        return 1
    except VramkitError as exc:
        print(f"vramkit: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
