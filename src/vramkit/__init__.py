"""vramkit: run FLUX pipelines on any GPU memory budget, as fast as the hardware allows.

>>> import vramkit
>>> plan = vramkit.optimize(pipe)          # plan for the free VRAM and apply
>>> print(plan.explain())
>>> vramkit.restore(pipe)                  # undo
>>> pipe = vramkit.load("/models/FLUX.1-dev", vram="8GiB", ram="16GiB")  # low RAM: load into a plan
"""

from __future__ import annotations

import logging

from . import errors, loading, lora, profiling, strategies
from .api import applied_plan, optimize, plan, restore
from .pipeline_loading import load
from .plan import Plan, PlanStep, Predicted, Rejected, StagePrediction
from .profiling import profile

__version__ = "0.1.0"

logging.getLogger("vramkit").addHandler(logging.NullHandler())

__all__ = [
    "load",
    "optimize",
    "plan",
    "restore",
    "applied_plan",
    "Plan",
    "PlanStep",
    "Predicted",
    "Rejected",
    "StagePrediction",
    "errors",
    "strategies",
    "lora",
    "loading",
    "profile",
    "profiling",
    "__version__",
]
