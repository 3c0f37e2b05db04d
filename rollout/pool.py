"""A bounded thread pool that returns results in order and never swallows an exception."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def pool(fn: Callable[[T], R], items: Sequence[T], workers: int) -> list[R]:
    """fn over items with at most `workers` threads, results in order. Exceptions propagate (after
    the running calls finish): a kill-switch stop or a crash is never swallowed."""
    if not items:
        return []
    if len(items) == 1 or workers <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="rollout") as ex:
        return list(ex.map(fn, items))
