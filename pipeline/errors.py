"""Errors the engine raises for bad models or bad requests; the API maps them to statuses.

They cross process boundaries: a stage replica raises one and Ray pickles it back to the Ingress
inside a ``RayTaskError``. Ray unpickles an exception by calling its class with what
``__reduce__`` gives; an error Ray cannot rebuild arrives as Ray's own wrapper holding only
text (a traceback, a pid, an address), and the caller would get a 500 in place of the field and
message. So every class here says how it is rebuilt, and tests round-trip each through Ray.
"""
from __future__ import annotations

from typing import Any


class RaydianceError(Exception):
    """Base of Raydiance's own errors: rebuilt from its message alone unless a subclass says."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.message,)


class ModelLoadError(RaydianceError):
    """A model folder or file that is missing or not something Raydiance can serve."""


class UnsafeWeightsError(ModelLoadError):
    """Weights in a pickle-based format (.ckpt, .pt, .bin, .pth): never unpickled. A model
    refused for them is one Raydiance cannot serve, as any other ``ModelLoadError``."""


class InvalidRequestError(RaydianceError, ValueError):
    """A request field the engine cannot honour; ``field`` names it for the caller."""

    def __init__(self, field: str, message: str) -> None:
        Exception.__init__(self, f"{field}: {message}")
        self.field = field
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.field, self.message)


class NotFoundError(InvalidRequestError):
    """A request names something (a model, a LoRA) that does not exist: the API answers 404.

    A subclass of ``InvalidRequestError``, so that code mapping request errors still catches it;
    check for this class first where the status differs.
    """


class MissingComponentError(RaydianceError):
    """A stage touched a model component it did not load (a bug: stages load what they run)."""
