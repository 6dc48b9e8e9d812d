"""One ``@serve.batch`` batch, run as the few forwards it really is.

A batch of a batched stage (TextEncoder, VAEDecoder) mixes requests that cannot share a forward
(other models, LoRA sets, latent shapes). ``run_grouped`` runs one call per compatible group and
hands each request its own result; a group that fails fails its own requests only, so one bad
request never fails its batch-mates. ``@serve.batch`` hands a returned exception to its caller
as a value: ``raise_if_error`` raises it there.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


def run_grouped(items: Sequence[Item], key: Callable[[Item], Hashable],
                run: Callable[[list[Item]], Sequence[Result]]) -> list[Result | Exception]:
    """``run`` once per group of ``items`` with the same ``key`` (first-seen order); the results
    in the items' order, a group's exception in the place of each of its items."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item)].append(index)
    results: dict[int, Result | Exception] = {}
    for indices in groups.values():
        try:
            outputs: Sequence[Result | Exception] = run([items[i] for i in indices])
        except Exception as error:  # noqa: BLE001 - handed back to the requests it belongs to
            outputs = [error] * len(indices)
        results.update(zip(indices, outputs, strict=True))
    return [results[index] for index in range(len(items))]


def raise_if_error(result: Result | BaseException) -> Result:
    """A batched call's own result, or its group's exception raised."""
    if isinstance(result, BaseException):
        raise result
    return result
