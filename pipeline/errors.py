"""Errors the engine raises for bad models or bad requests; the API maps them to statuses."""
from __future__ import annotations


class RaydianceError(Exception):
    """Base of Raydiance's own errors."""


class UnsafeWeightsError(RaydianceError):
    """Weights in a pickle-based format (.ckpt, .pt, .bin, .pth): never unpickled."""


class ModelLoadError(RaydianceError):
    """A model folder or file that is missing or not something Raydiance can serve."""


class InvalidRequestError(RaydianceError, ValueError):
    """A request field the engine cannot honour; ``field`` names it for the caller."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFoundError(InvalidRequestError):
    """A request names something (a model, a LoRA) that does not exist: the API answers 404.

    A subclass of ``InvalidRequestError``, so that code mapping request errors still catches it;
    check for this class first where the status differs.
    """


class MissingComponentError(RaydianceError):
    """A stage touched a model component it did not load (a bug: stages load what they run)."""
