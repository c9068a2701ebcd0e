"""The :class:`Plan`: an ordered list of strategy steps, each with its reason, plus what the planner
predicted for it and the alternatives it rejected. JSON-safe through :meth:`Plan.to_dict`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .strategies.base import Strategy, strategy_from_dict

__all__ = ["Plan", "PlanStep", "Predicted", "StagePrediction", "Rejected"]

_GIB = 1024**3


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / _GIB:.2f} GiB"


@dataclass(frozen=True)
class PlanStep:
    """One strategy applied to one component (``component`` is ``None`` for pipeline-wide steps)."""

    strategy: Strategy
    component: str | None
    reason: str
    lossless: bool
    reversible: bool

    @property
    def name(self) -> str:
        return self.strategy.name

    def to_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy.name,
            "config": self.strategy.to_dict(),
            "component": self.component,
            "reason": self.reason,
            "lossless": self.lossless,
            "reversible": self.reversible,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanStep:
        return cls(
            strategy=strategy_from_dict(data["config"]),
            component=data["component"],
            reason=data["reason"],
            lossless=bool(data["lossless"]),
            reversible=bool(data["reversible"]),
        )


@dataclass(frozen=True)
class StagePrediction:
    """Predicted peak memory (bytes) and time (seconds) of one stage: ``text_encoding``,
    ``denoising_step`` or ``vae_decode`` (and ``load`` for one-off moves). In a plan across several
    GPUs, ``devices`` has each device's peak and ``vram`` is the largest of them."""

    vram: int
    ram: int
    seconds: float
    devices: dict[str, int] = field(default_factory=dict)  # per-device VRAM of a several-GPU plan

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vram": int(self.vram), "ram": int(self.ram), "seconds": float(self.seconds)}
        if self.devices:  # absent for one-device plans, whose JSON stays as it was
            out["devices"] = {k: int(v) for k, v in self.devices.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StagePrediction:
        return cls(
            vram=int(data["vram"]),
            ram=int(data["ram"]),
            seconds=float(data["seconds"]),
            devices={k: int(v) for k, v in data.get("devices", {}).items()},
        )


@dataclass(frozen=True)
class Predicted:
    """What the planner predicts for a plan: peaks over the whole call and per stage, and time."""

    peak_vram: int
    peak_ram: int
    seconds_per_step: float
    seconds_per_image: float
    num_inference_steps: int
    stages: dict[str, StagePrediction] = field(default_factory=dict)

    @property
    def peak_vram_by_device(self) -> dict[str, int]:
        """Each device's peak over the stages (empty for a one-device plan)."""
        out: dict[str, int] = {}
        for st in self.stages.values():
            for dev, v in st.devices.items():
                out[dev] = max(out.get(dev, 0), v)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_vram": int(self.peak_vram),
            "peak_ram": int(self.peak_ram),
            "seconds_per_step": float(self.seconds_per_step),
            "seconds_per_image": float(self.seconds_per_image),
            "num_inference_steps": int(self.num_inference_steps),
            "stages": {k: v.to_dict() for k, v in self.stages.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Predicted:
        return cls(
            peak_vram=int(data["peak_vram"]),
            peak_ram=int(data["peak_ram"]),
            seconds_per_step=float(data["seconds_per_step"]),
            seconds_per_image=float(data["seconds_per_image"]),
            num_inference_steps=int(data["num_inference_steps"]),
            stages={k: StagePrediction.from_dict(v) for k, v in data.get("stages", {}).items()},
        )


@dataclass(frozen=True)
class Rejected:
    """An alternative the planner considered and why it lost."""

    description: str
    reason: str
    predicted_peak_vram: int | None = None
    predicted_seconds_per_step: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "reason": self.reason,
            "predicted_peak_vram": self.predicted_peak_vram,
            "predicted_seconds_per_step": self.predicted_seconds_per_step,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rejected:
        return cls(
            description=data["description"],
            reason=data["reason"],
            predicted_peak_vram=data.get("predicted_peak_vram"),
            predicted_seconds_per_step=data.get("predicted_seconds_per_step"),
        )


@dataclass
class Plan:
    """An ordered set of strategy steps with reasons; what ``vramkit.optimize`` applies.

    ``predicted`` is filled by the planner (``None`` for a plan of hand-picked strategies),
    ``rejected`` lists the alternatives the planner considered, ``request`` the request and budget
    it was made for, and ``notes`` anything else worth saying (e.g. why a step was skipped).
    """

    steps: list[PlanStep] = field(default_factory=list)
    predicted: Predicted | None = None
    rejected: list[Rejected] = field(default_factory=list)
    request: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def lossless(self) -> bool:
        """True when no step changes the numerics of the output."""
        return all(step.lossless for step in self.steps)

    @property
    def strategies(self) -> list[Strategy]:
        return [step.strategy for step in self.steps]

    def explain(self) -> str:
        """A readable account of the plan: every step and why, what changes numerics, predictions."""
        lines: list[str] = []
        if self.request:
            req = ", ".join(f"{k}={v}" for k, v in self.request.items() if v is not None)
            lines.append(f"vramkit plan for {req}")
        else:
            lines.append("vramkit plan")
        if not self.steps:
            lines.append("  (no steps: the pipeline runs as it is)")
        for i, step in enumerate(self.steps, 1):
            where = step.component or "pipeline"
            tags = []
            if not step.lossless:
                tags.append("changes numerics")
            if not step.reversible:
                tags.append("irreversible")
            tag = f" [{', '.join(tags)}]" if tags else ""
            lines.append(f"  {i}. {step.strategy.describe()} on {where}{tag}")
            lines.append(f"     why: {step.reason}")
        lines.append(
            "  output: bit-identical to the unoptimized pipeline"
            if self.lossless
            else "  output: some steps change numerics (marked above)"
        )
        if self.predicted is not None:
            p = self.predicted
            lines.append(
                f"  predicted: peak VRAM {_fmt_bytes(p.peak_vram)}, peak RAM {_fmt_bytes(p.peak_ram)}, "
                f"{p.seconds_per_step:.3f} s/step, {p.seconds_per_image:.1f} s/image ({p.num_inference_steps} steps)"
            )
            by_device = p.peak_vram_by_device
            if by_device:
                lines.append(
                    "  peak VRAM per device: " + ", ".join(f"{d} {_fmt_bytes(v)}" for d, v in by_device.items())
                )
            if p.stages:
                devs = list(by_device)
                head = "".join(f" {d:>10}" for d in devs) if devs else f" {'VRAM':>10}"
                lines.append(f"    {'stage':<16}{head} {'RAM':>10} {'seconds':>9}")
                for name, st in p.stages.items():
                    cols = (
                        "".join(f" {_fmt_bytes(st.devices.get(d)):>10}" for d in devs)
                        if devs
                        else f" {_fmt_bytes(st.vram):>10}"
                    )
                    lines.append(f"    {name:<16}{cols} {_fmt_bytes(st.ram):>10} {st.seconds:>9.3f}")
        if self.rejected:
            lines.append(f"  rejected alternatives ({len(self.rejected)}):")
            for r in self.rejected[:10]:
                lines.append(f"    - {r.description}: {r.reason}")
            if len(self.rejected) > 10:
                lines.append(f"    ... and {len(self.rejected) - 10} more (Plan.rejected)")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()

    def _repr_html_(self) -> str:
        import html

        return "<pre>" + html.escape(self.explain()) + "</pre>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [s.to_dict() for s in self.steps],
            "predicted": self.predicted.to_dict() if self.predicted else None,
            "rejected": [r.to_dict() for r in self.rejected],
            "request": dict(self.request),
            "notes": list(self.notes),
            "lossless": self.lossless,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        return cls(
            steps=[PlanStep.from_dict(s) for s in data.get("steps", [])],
            predicted=Predicted.from_dict(data["predicted"]) if data.get("predicted") else None,
            rejected=[Rejected.from_dict(r) for r in data.get("rejected", [])],
            request=dict(data.get("request", {})),
            notes=list(data.get("notes", [])),
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))
