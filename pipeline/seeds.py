"""Seeds: -1 or absent means random, as in AUTOMATIC1111; otherwise the seed is the image."""
from __future__ import annotations

import secrets

MAX_SEED = 2**32 - 1


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return secrets.randbelow(MAX_SEED + 1)
    return seed
