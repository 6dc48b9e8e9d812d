"""One ``@serve.batch`` batch, run as the few forwards it really is, each request failing alone.

A batch of a batched stage (TextEncoder, VAEDecoder) mixes requests that cannot share a forward
(other models, LoRA sets, latent shapes). ``run_grouped`` runs one call per compatible group and
hands each request its own result. A group's call fails as a whole when any one of its requests
breaks it (a prompt the tokenizer refuses, a PNG text that cannot be written), so a group that
fails is run again one request at a time: only the requests that fail alone get an error, the
others their result. That costs one more pass over the group, once; the group's own failure is
logged, never dropped. ``@serve.batch`` hands a returned exception to its caller as a value:
``raise_if_error`` raises it there.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
Run = Callable[[list[Item]], Sequence[Result]]

logger = logging.getLogger("ray.serve")


def run_grouped(items: Sequence[Item], key: Callable[[Item], Hashable],
                run: Run) -> list[Result | Exception]:
    """``run`` once per group of ``items`` with the same ``key`` (first-seen order); the results
    in the items' order, an exception in the place of each item that failed."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        groups[key(item)].append(index)
    results: dict[int, Result | Exception] = {}
    for indices in groups.values():
        outputs = _run_isolated([items[i] for i in indices], run)
        results.update(zip(indices, outputs, strict=True))
    return [results[index] for index in range(len(items))]


def _run_isolated(group: list[Item], run: Run) -> list[Result | Exception]:
    """``run(group)``; if that raises, each item run alone, so that one item's failure is its own."""
    try:
        outputs = list(run(group))
    except Exception as error:  # noqa: BLE001 - handed back to the requests it belongs to
        if len(group) == 1:
            return [error]
        logger.warning("a batch of %d failed (%s: %s); running each of its requests alone",
                       len(group), type(error).__name__, error, exc_info=error)
        return [_run_one(item, run) for item in group]
    if len(outputs) != len(group):  # a bug in ``run``: never hand out results by guesswork
        raise RuntimeError(f"{len(group)} requests got {len(outputs)} results")
    return outputs


def _run_one(item: Item, run: Run) -> Result | Exception:
    try:
        (output,) = run([item])
    except Exception as error:  # noqa: BLE001 - this request's own failure, for its caller
        return error
    return output


def raise_if_error(result: Result | BaseException) -> Result:
    """A batched call's own result, or its own exception raised."""
    if isinstance(result, BaseException):
        raise result
    return result
