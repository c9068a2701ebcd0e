"""See the memory: a per-stage profiler of pipeline calls (:func:`profile`), its text/HTML/JSON
report and PNG timeline, ``vramkit doctor`` (:mod:`vramkit.profiling.doctor`) and a progress bar
helper that honours the pipeline's progress bar settings (:func:`progress`).

Nothing is measured, imported (matplotlib, tqdm) or started at import time.
"""

from __future__ import annotations

from ._profiler import STAGE_KINDS, ComponentRecord, Profiler, StageRecord, profile
from .doctor import DoctorReport, Finding, doctor_main, format_doctor, run_doctor
from .progress import progress

__all__ = [
    "profile",
    "Profiler",
    "StageRecord",
    "ComponentRecord",
    "STAGE_KINDS",
    "progress",
    "run_doctor",
    "format_doctor",
    "doctor_main",
    "DoctorReport",
    "Finding",
]
