"""The fan-out over the stages: one ``Generation`` in, one decoded PNG per image out.

What passes through the Ingress: the request going out (prompt, parameters) and the PNGs coming
back, plus, when progress is wanted, a ``StepProgress`` per step and each image's final
``Denoised``, whose latents stay in Ray's object store as a reference the Ingress hands on to the
VAEDecoder unread. The prompt's conditioning never comes here: the TextEncoder's answer goes to
the Denoiser as a chained DeploymentResponse, and so do the latents when no progress is wanted.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipeline.denoise import DenoiseParams
from pipeline.errors import RaydianceError

from deployments.api.errors import ApiError, caller_mistake
from deployments.api.generation import Generation
from deployments.messages import Decoded, EncodeRequest, StepProgress

logger = logging.getLogger("ray.serve")
OnStep = Callable[[int, StepProgress], None]  # (image index, that image's progress)


@dataclass(frozen=True)
class Stages:
    text_encoder: DeploymentHandle
    denoiser: DeploymentHandle
    vae_decoder: DeploymentHandle

    def holding(self, model: str) -> Stages:
        """Each stage keeps a few models per replica; multiplexing routes to one that holds ours."""
        return Stages(*(handle.options(multiplexed_model_id=model)
                        for handle in (self.text_encoder, self.denoiser, self.vae_decoder)))


class Serving:
    """Encode once, then denoise and decode each image, within ``timeout_s``; if the caller goes
    away or the time runs out, the stages' work for the request is cancelled too."""

    def __init__(self, stages: Stages, timeout_s: float) -> None:
        self.stages, self.timeout_s = stages, timeout_s

    async def generate(self, generation: Generation, on_step: OnStep | None = None) -> list[Decoded]:
        """One ``Decoded`` per seed of ``generation.seeds()``; ``on_step`` hears of every step."""
        stages = self.stages.holding(generation.model)
        encoded = stages.text_encoder.encode.remote(EncodeRequest(
            generation.model, generation.prompt, generation.negative_prompt, generation.loras))
        images = [_image(stages, encoded, generation, seed, index, on_step)
                  for index, seed in enumerate(generation.seeds())]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*images), self.timeout_s))
        except BaseException as error:
            for response in (encoded, *images):
                if isinstance(response, DeploymentResponse):
                    response.cancel()  # a caller gone or timed out: stop the stages' work too
            translated = _translate(error)
            if translated is error:
                raise
            raise translated from error


def _image(stages: Stages, encoded: DeploymentResponse, generation: Generation, seed: int,
           index: int, on_step: OnStep | None) -> Awaitable[Decoded]:
    """One image's denoise and decode: a chained DeploymentResponse, or with ``on_step`` a
    coroutine that reads the Denoiser's progress stream."""
    params = DenoiseParams(width=generation.width, height=generation.height, steps=generation.steps,
                           guidance_scale=generation.guidance_scale, seed=seed,
                           sampler=generation.sampler, cache=generation.cache)
    if on_step is None:
        return stages.vae_decoder.decode.remote(stages.denoiser.denoise.remote(encoded, params),
                                                generation.infotext(seed))
    return _reporting_image(stages, encoded, params, generation.infotext(seed),
                            lambda progress: on_step(index, progress))


async def _reporting_image(stages: Stages, encoded: DeploymentResponse, params: DenoiseParams,
                           infotext: str, on_step: Callable[[StepProgress], None]) -> Decoded:
    stream = stages.denoiser.options(stream=True).denoise_stream.remote(encoded, params)
    denoised = None
    try:
        async for item in stream:
            if isinstance(item, StepProgress):
                on_step(item)
            else:
                denoised = item  # its latents: an object reference, handed on unread
    finally:
        stream.cancel()  # a no-op once it ended; stops the Denoiser if we were cancelled
    return await stages.vae_decoder.decode.remote(denoised, infotext)


def _root_cause(error: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError.cause, possibly nested)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


def _translate(error: BaseException) -> BaseException:
    """A stage's failure as the HTTP answer it deserves; anything else unchanged (a 500)."""
    cause = _root_cause(error)
    mistake = caller_mistake(cause)  # e.g. a LoRA file removed since the request was checked
    if mistake is not None:
        return mistake
    if isinstance(error, asyncio.TimeoutError):
        return ApiError("request", "timed out; the server is busy, retry later", status=503,
                        code="timeout")
    if isinstance(cause, BackPressureError):
        return ApiError("request", "the server is at capacity, retry later", status=503,
                        code="overloaded")
    if isinstance(cause, RaydianceError):  # the message may hold a path: the log gets it
        logger.error("a stage failed: %r", cause)
        return ApiError("model", f"{type(cause).__name__}; see the server log", status=500,
                        code="model_error")
    return error
