"""Parsing memory budgets and bandwidths given by people: ``"8GiB"``, ``"8GB"``, ``"7.5 GiB"``,
``"80%"`` (of a total), ``"25GB/s"`` or plain numbers of bytes.

Units: ``B``; decimal ``KB``/``MB``/``GB``/``TB`` (10**3 steps); binary ``KiB``/``MiB``/``GiB``/``TiB``
(2**10 steps) and the single letters ``K``/``M``/``G``/``T``, which are binary as in ``docker --memory``.
Case does not matter. A percentage needs ``total``.
"""

from __future__ import annotations

import math
import re

from ..errors import InvalidBudgetError

__all__ = ["parse_budget", "parse_bandwidth", "format_bytes", "UNITS"]

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
