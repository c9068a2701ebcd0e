"""A progress bar for vramkit's own long-running work (applying a plan, packing blocks, quantizing),
drawn like diffusers draws its bars (``tqdm.auto``) and silenced the same way: a pipeline whose
progress bar is disabled (``pipe.set_progress_bar_config(disable=True)``) gets no vramkit bars either.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["progress", "DEFAULT_DELAY"]

T = TypeVar("T")

#: Seconds before a bar appears: work that finishes sooner never shows one.
DEFAULT_DELAY = 2.0


def _pipe_config(pipe: Any) -> dict[str, Any]:
    config = getattr(pipe, "_progress_bar_config", None) if pipe is not None else None
    return dict(config) if isinstance(config, dict) else {}


def progress(
    iterable: Iterable[T] | None = None,
    desc: str | None = None,
    total: int | None = None,
    *,
    pipe: Any = None,
    disable: bool | None = None,
    delay: float = DEFAULT_DELAY,
    **tqdm_kwargs: Any,
) -> Any:
    """Wrap ``iterable`` in a ``tqdm.auto`` bar (a notebook widget in Jupyter, text elsewhere).

    Args:
        iterable: what to iterate; ``None`` for a manual bar (``bar.update(n)``, ``with`` block).
        desc: the bar's label, e.g. ``"vramkit: packing transformer blocks"``.
        total: number of items, when ``len(iterable)`` does not tell.
        pipe: a diffusers pipeline: its ``set_progress_bar_config(...)`` settings apply
            (``disable=True`` there silences this bar too).
        disable: force the bar off (``True``) or on (``False``); ``None`` follows ``pipe``.
        delay: seconds before the bar appears, so short work never prints one (default 2).
        tqdm_kwargs: anything else ``tqdm`` accepts (``unit``, ``leave``, ...).

    Returns:
        The ``tqdm`` object: iterate it, or use it as a context manager and call ``update``.
    """
    from tqdm.auto import tqdm
    from tqdm.std import tqdm as std_tqdm  # the notebook bar takes **kwargs and passes them on to this one

    kwargs = _pipe_config(pipe)
    kwargs.update(tqdm_kwargs)
    if disable is not None:
        kwargs["disable"] = disable
    if desc is not None:
        kwargs["desc"] = desc
    if total is not None:
        kwargs["total"] = total
    if delay and "delay" not in kwargs and "delay" in inspect.signature(std_tqdm.__init__).parameters:
        kwargs["delay"] = delay
    return tqdm(iterable, **kwargs)
