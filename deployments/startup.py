"""Where a replica's start-up time goes, logged once it is constructed.

``deployments/__init__.py`` imports this module before anything else of the package: the moment
it is imported splits a replica's start into Ray's worker start (process start to here), the
imports (here until the constructor has imported torch, diffusers, ...) and the rest of the
constructor (models loaded). ``serve run`` prints the line;
``bench/bench_cold_start.py`` reads it to break a cold start down.
"""
from __future__ import annotations

import importlib
import logging
import time

import psutil

IMPORTED_AT = time.time()
logger = logging.getLogger("ray.serve")


class StartupClock:
    """Started at the top of a constructor; ``imported()`` once it has imported the stage's
    heavy modules (torch, diffusers: not at module level, see ``deployments.replica``);
    ``log()`` at its end."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.constructor_at = self.imported_at = time.time()

    def imported(self, *modules: str) -> None:
        """Imports ``modules`` now, those the stage's methods import where they use them, so
        that no request pays for a first import; then marks the imports' end."""
        for name in modules:
            importlib.import_module(name)
        self.imported_at = time.time()

    def log(self) -> None:
        process_at = psutil.Process().create_time()
        now = time.time()
        logger.info("%s replica started in %.2f s: worker %.2f s, imports %.2f s, constructor "
                    "%.2f s", self.name, now - process_at, IMPORTED_AT - process_at,
                    self.imported_at - IMPORTED_AT, now - self.imported_at)
