"""Memory model: what the machine offers (:mod:`~vramkit.memory.probe`), budgets people give
(:mod:`~vramkit.memory.budget`), the exact FLUX architectures on the meta device
(:mod:`~vramkit.memory.architectures`), exact weight bytes and the per-stage activation and time
model (:mod:`~vramkit.memory.estimator`) and its measured constants (:mod:`~vramkit.memory.calibration`).

Importing this package probes nothing and builds nothing.
"""

from __future__ import annotations

from .budget import format_bytes, parse_bandwidth, parse_budget
from .calibration import Calibration
from .estimator import FORMATS, ComponentSizes, ParamStats, component_sizes
from .probe import ASSUMED_BANDWIDTH, DeviceProbe, probe

__all__ = [
    "ASSUMED_BANDWIDTH",
    "Calibration",
    "ComponentSizes",
    "DeviceProbe",
    "FORMATS",
    "ParamStats",
    "component_sizes",
    "format_bytes",
    "parse_bandwidth",
    "parse_budget",
    "probe",
]
