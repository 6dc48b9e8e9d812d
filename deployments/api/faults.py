"""What a stage's failure means to the caller, once Ray has carried it back to the Ingress.

A stage's own exception arrives wrapped in ``RayTaskError`` (nested once per stage it passed
through); its cause decides the answer:

- the caller's mistake (``InvalidRequestError``, ``NotFoundError``): 4xx naming the field;
- a model file that a replica could not load (``ModelLoadError``, pickled weights included):
  the same 4xx naming ``model`` as when the Ingress finds it unusable from its header: the file
  is the problem, retrying will not help and another model will;
- a fault (a replica or node lost, a worker killed, an object lost with its node, a stage or
  the request timing out, a stage's queue full): 503 with Retry-After, never a 500: none is a bug;
- anything else is a bug: left as it is, for the error boundary's generic 500 and the log.
"""
from __future__ import annotations

import logging

from ray.exceptions import (LocalRayletDiedError, NodeDiedError, ObjectLostError,
                            OutOfMemoryError, RayActorError, RayTaskError, TaskCancelledError,
                            WorkerCrashedError)
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError,
                                  RayServeException, ReplicaUnavailableError)

from deployments.api.errors import ApiError, caller_mistake, current_request_id

logger = logging.getLogger("ray.serve")

FAULTS: tuple[type[BaseException], ...] = (
    RayActorError,  # ActorDiedError, ActorUnavailableError: a replica lost or unreachable
    ReplicaUnavailableError, DeploymentUnavailableError,  # Serve's words for the same
    WorkerCrashedError, NodeDiedError, LocalRayletDiedError, OutOfMemoryError,  # Ray's OOM killer
    ObjectLostError,  # an argument's or result's object gone with its node
    TaskCancelledError,  # cancelled by Ray or Serve (a replica stopping), not by this request
    TimeoutError,  # the request's deadline, or a stage's own (latents that never arrived)
)
"""Failures that are no bug and no fault of the request's: answered 503, retry later."""


def root_cause(error: BaseException) -> BaseException:
    """The exception a stage raised, out of Ray's wrappers: one ``RayTaskError`` per stage it
    crossed, and Serve's ``RayServeException`` around a call whose argument (an upstream
    stage's answer) was lost with its replica."""
    while True:
        if isinstance(error, RayTaskError) and error.cause is not None and error.cause is not error:
            error = error.cause
        elif type(error) is RayServeException and error.__cause__ is not None:
            error = error.__cause__
        else:
            return error


def is_fault(error: BaseException) -> bool:
    return isinstance(root_cause(error), (*FAULTS, BackPressureError))


def translate(error: BaseException) -> BaseException:
    """``error`` as the HTTP answer it deserves (an ``ApiError``); a bug unchanged (a 500)."""
    cause = root_cause(error)
    mistake = caller_mistake(cause)  # a LoRA or a checkpoint that a stage could not load
    if mistake is not None:
        return mistake
    if isinstance(cause, BackPressureError):
        return _unavailable(error, "overloaded", "the server is at capacity; retry later",
                            cause.status_code)
    if isinstance(cause, TimeoutError):
        return _unavailable(error, "timeout", "timed out; the server is busy, retry later")
    if isinstance(cause, FAULTS):
        return _unavailable(error, "stage_unavailable", "a part of the server is restarting or "
                            "unreachable; retry later")
    return error


def _unavailable(error: BaseException, code: str, message: str, status: int = 503) -> ApiError:
    logger.warning("request %s: answered %d %s after %s", current_request_id(), status, code,
                   type(root_cause(error)).__name__, exc_info=error)
    return ApiError("request", message, status=status, code=code)
