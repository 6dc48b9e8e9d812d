"""Deciding which requests take the next step: plain Python over records, no tensors."""
from __future__ import annotations

from pipeline.engine.request import ActiveRequest


def pick_step_group(active: list[ActiveRequest], max_batch_rows: int) -> list[ActiveRequest]:
    """The requests whose rows go into the next UNet forward.

    The request that has waited longest since its last step chooses the batch key (so no key
    starves); then every request with that key joins in the same order, while rows fit.
    A request whose rows alone exceed ``max_batch_rows`` still runs, alone.
    """
    live = [r for r in active if not r.cancelled and not r.done]
    if not live:
        return []
    live.sort(key=lambda r: (r.last_stepped, r.id))
    key = live[0].batch_key
    group, rows = [], 0
    for candidate in live:
        if candidate.batch_key != key:
            continue
        if group and rows + candidate.rows > max_batch_rows:
            break
        group.append(candidate)
        rows += candidate.rows
    return group
