"""Parsing memory budgets and bandwidths given by people: ``"8GiB"``, ``"8GB"``, ``"7.5 GiB"``,
``"80%"`` (of a total), ``"25GB/s"`` or plain numbers of bytes.

Units: ``B``; decimal ``KB``/``MB``/``GB``/``TB`` (10**3 steps); binary ``KiB``/``MiB``/``GiB``/``TiB``
(2**10 steps) and the single letters ``K``/``M``/``G``/``T``, which are binary as in ``docker --memory``.
Case does not matter. A percentage needs ``total``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidBudgetError

__all__ = ["parse_budget", "parse_bandwidth", "parse_device_budgets", "device_key", "format_bytes", "UNITS"]

#: Multiplier of every accepted unit (lower case).
UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}

_SIZE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*%\s*$")

_HELP = "use bytes (8589934592) or a size like '8GiB', '8GB', '7.5 GiB', or a share of the device like '80%'"


def _number(value: float, original: object, what: str) -> int:
    if not math.isfinite(value):
        raise InvalidBudgetError(f"{what} {original!r} is not a finite number; {_HELP}.")
    if value <= 0:
        raise InvalidBudgetError(f"{what} {original!r} must be more than zero; {_HELP}.")
    n = int(value)
    if n <= 0:
        raise InvalidBudgetError(f"{what} {original!r} is less than one byte; {_HELP}.")
    return n


def parse_budget(value: int | float | str, total: int | None = None, *, what: str = "budget") -> int:
    """A memory budget in bytes from an int, a float or a string.

    >>> parse_budget("8GiB")
    8589934592
    >>> parse_budget("8GB")
    8000000000
    >>> parse_budget("50%", total=1000)
    500

    Raises :class:`~vramkit.errors.InvalidBudgetError` for zero, negative, non-numeric or
    unparseable values, and for a percentage without a ``total`` (or above 100%).
    """
    if isinstance(value, bool):
        raise InvalidBudgetError(f"{what} {value!r} is a bool, not a size; {_HELP}.")
    if isinstance(value, int):
        return _number(float(value), value, what) if value <= 0 else value
    if isinstance(value, float):
        return _number(value, value, what)
    if not isinstance(value, str):
        raise InvalidBudgetError(f"{what} must be an int or a string, got {type(value).__name__}; {_HELP}.")
    text = value.strip()
    if not text:
        raise InvalidBudgetError(f"{what} is empty; {_HELP}.")
    m = _PERCENT.match(text)
    if m:
        pct = float(m.group(1))
        if total is None:
            raise InvalidBudgetError(
                f"{what} {value!r} is a percentage, but the device total is not known here; give a size such as '8GiB'."
            )
        if pct <= 0:
            raise InvalidBudgetError(f"{what} {value!r} must be more than 0%; {_HELP}.")
        if pct > 100:
            raise InvalidBudgetError(f"{what} {value!r} is more than 100% of the device; give at most '100%'.")
        return _number(total * pct / 100.0, value, what)
    m = _SIZE.match(text)
    if not m:
        raise InvalidBudgetError(f"could not parse {what} {value!r}; {_HELP}.")
    unit = m.group(2).lower()
    if unit not in UNITS:
        raise InvalidBudgetError(
            f"unknown unit {m.group(2)!r} in {what} {value!r}; use B, KB/MB/GB/TB (10**3) or KiB/MiB/GiB/TiB (2**10)."
        )
    return _number(float(m.group(1)) * UNITS[unit], value, what)


def parse_bandwidth(value: int | float | str) -> float:
    """Host-to-device bandwidth in bytes per second: ``25e9``, ``"25GB/s"``, ``"25 GB"``, ``"23.3GiB/s"``.

    Raises :class:`~vramkit.errors.InvalidBudgetError` for zero, negative or unparseable values.
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower().endswith("/s"):
            text = text[:-2]
        elif text.lower().endswith("ps"):
            text = text[:-2]
        if "%" in text:
            raise InvalidBudgetError(f"bandwidth {value!r} cannot be a percentage; give e.g. '25GB/s'.")
        return float(parse_budget(text, what="bandwidth"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidBudgetError(f"bandwidth must be a number of bytes/s or a string like '25GB/s', got {value!r}.")
    if not math.isfinite(float(value)) or value <= 0:
        raise InvalidBudgetError(f"bandwidth {value!r} must be a positive number of bytes per second.")
    return float(value)


def format_bytes(n: int | float) -> str:
    """``8589934592`` -> ``'8.00 GiB'`` (MiB below one GiB)."""
    if abs(n) >= 1024**3:
        return f"{n / 1024**3:.2f} GiB"
    return f"{n / 1024**2:.0f} MiB"


def device_key(key: Any) -> str:
    """A CUDA device named by ``"cuda:1"``, ``1``, ``"1"`` or ``torch.device("cuda", 1)``, as ``"cuda:1"``.

    Raises :class:`~vramkit.errors.InvalidBudgetError` for anything else (another device type, a
    CUDA device without an index, a negative index)."""
    if isinstance(key, bool):
        raise InvalidBudgetError(f"vram key {key!r} is not a device; use 'cuda:0', 'cuda:1', ... or 0, 1, ...")
    if isinstance(key, str) and key.strip().isdigit():
        key = int(key)  # "1" as on a command line
    if isinstance(key, int):
        index = key
    else:
        import torch

        try:
            dev = torch.device(key)
        except (RuntimeError, TypeError):
            raise InvalidBudgetError(
                f"vram key {key!r} is not a device; use 'cuda:0', 'cuda:1', ... or 0, 1, ..."
            ) from None
        if dev.type != "cuda":
            raise InvalidBudgetError(
                f"vram key {key!r}: per-device budgets are for CUDA devices; use 'cuda:0', 'cuda:1', ..."
            )
        if dev.index is None:
            raise InvalidBudgetError(f"vram key {key!r} names no device index; use 'cuda:0', 'cuda:1', ...")
        index = dev.index
    if index < 0:
        raise InvalidBudgetError(f"vram key {key!r}: a device index is 0 or more.")
    return f"cuda:{index}"


def parse_device_budgets(
    value: Mapping[Any, int | float | str],
    *,
    totals: Mapping[str, int] | None = None,
    visible: int | None = None,
) -> dict[str, int]:
    """Per-device VRAM budgets in bytes, by ``"cuda:N"``, from a mapping such as
    ``{"cuda:0": "12GiB", "cuda:1": "12GiB"}`` (keys may also be ints or ``torch.device``).

    ``totals`` (device -> bytes) resolves percentages and caps each budget at its device's size;
    ``visible`` (the number of CUDA devices here, ``None`` when planning for another machine)
    rejects devices that do not exist. Raises :class:`~vramkit.errors.InvalidBudgetError` for an
    empty mapping, an unknown or duplicated device, and a non-positive or unparseable value.
    """
    if not isinstance(value, Mapping):
        raise InvalidBudgetError(f"per-device vram must be a mapping like {{'cuda:0': '12GiB'}}, got {value!r}.")
    if not value:
        raise InvalidBudgetError("vram={} names no device; give e.g. {'cuda:0': '12GiB', 'cuda:1': '12GiB'}.")
    out: dict[str, int] = {}
    for key, amount in value.items():
        name = device_key(key)
        if name in out:
            raise InvalidBudgetError(f"vram names {name} twice (as {key!r} and an earlier key); give each device once.")
        if visible is not None and int(name.split(":")[1]) >= visible:
            raise InvalidBudgetError(
                f"vram names {name}, but this machine has {visible} CUDA device(s) (cuda:0..cuda:{visible - 1}); "
                "check CUDA_VISIBLE_DEVICES or plan for another machine without a GPU here (vramkit plan)."
            )
        total = (totals or {}).get(name)
        n = parse_budget(amount, total=total, what=f"vram for {name}")
        if total and n > total:
            raise InvalidBudgetError(
                f"vram for {name} {amount!r} is more than the device's {format_bytes(total)}; "
                "give at most its size (or a share like '90%')."
            )
        out[name] = n
    return out
