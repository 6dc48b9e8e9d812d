"""Where a replica's start-up time goes, logged once it is constructed.

``deployments/__init__.py`` imports this module before anything else of the package: the moment
it is imported splits a replica's start into Ray's worker start (process start to here), the imports (torch, diffusers,
...: here to the constructor) and the constructor itself (models loaded). ``serve run`` prints
the line; ``bench/bench_cold_start.py`` reads it to break a cold start down.
"""
from __future__ import annotations

import logging
import time

import psutil

IMPORTED_AT = time.time()
logger = logging.getLogger("ray.serve")


class StartupClock:
    """Started at the top of a constructor; ``log()`` at its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.constructor_at = time.time()

    def log(self) -> None:
        process_at = psutil.Process().create_time()
        now = time.time()
        logger.info("%s replica started in %.2f s: worker %.2f s, imports %.2f s, constructor "
                    "%.2f s", self.name, now - process_at, IMPORTED_AT - process_at,
                    self.constructor_at - IMPORTED_AT, now - self.constructor_at)
