"""The fan-out over the stages: one ``Generation`` in, one decoded PNG per image out.

What passes through the Ingress: the request going out (prompt, parameters) and the PNGs coming
back, plus, when progress is wanted, a ``StepProgress`` per step and each image's final
``Denoised`` (its latents are small), handed on to the VAEDecoder. The prompt's conditioning never comes here: the TextEncoder's answer goes to
the Denoiser as a chained DeploymentResponse, and so do the latents when no progress is wanted.

Faults (``deployments.api.faults``): a stage replica that dies answers 503 with Retry-After,
except where a second try is safe and cheap. The TextEncoder and the VAEDecoder are idempotent
and fast, so a call that a dead replica of theirs lost is made once more (Serve routes it to a
live replica); a Denoiser's call is not: a retry would redo the whole denoising on the replicas
that just lost a peer, and a request that killed its replica (say, out of memory) would kill a
second one. The client, told 503 and when to retry, decides.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipeline.request_params import DenoiseParams

from deployments.api.errors import current_request_id
from deployments.api.faults import is_fault, translate
from deployments.api.generation import Generation
from deployments.messages import Decoded, Denoised, EncodeRequest, StepProgress

logger = logging.getLogger("ray.serve")
OnStep = Callable[[int, StepProgress], None]  # (image index, that image's progress)
T = TypeVar("T")


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

    async def generate(self, generation: Generation, on_step: OnStep | None = None,
                       previews: bool = False) -> list[Decoded]:
        """One ``Decoded`` per seed of ``generation.seeds()``; ``on_step`` hears of every step,
        with the image's look so far if ``previews``. A stage's failure is raised as the answer
        it deserves (``faults.translate``)."""
        calls = StageCalls(self.stages.holding(generation.model), previews)
        try:
            return await asyncio.wait_for(calls.generate(generation, on_step), self.timeout_s)
        except BaseException as error:
            # Translate first: cancelling a call whose assignment failed raises that failure again.
            translated = translate(error)
            calls.cancel()  # a caller gone, timed out or failed: stop the stages' work too
            if translated is error:
                raise
            raise translated from error


class StageCalls:
    """The stage calls made for one request: kept, so that all of them can be cancelled."""

    def __init__(self, stages: Stages, previews: bool = False) -> None:
        self.stages, self.previews = stages, previews
        self.made: list[DeploymentResponse] = []

    def _kept(self, response: T) -> T:
        if isinstance(response, DeploymentResponse):
            self.made.append(response)
        return response

    def cancel(self) -> None:
        for response in self.made:
            try:
                response.cancel()  # a no-op once done
            except Exception:  # noqa: BLE001 - the call's own failure, already answered
                pass

    async def generate(self, generation: Generation, on_step: OnStep | None) -> list[Decoded]:
        """Every image; once more if the TextEncoder's replica was lost (no image got further)."""
        request = EncodeRequest(generation.model, generation.prompt, generation.negative_prompt,
                                generation.loras, generation.embeddings, generation.clip_skip)
        # an init image is encoded once, by the VAE stage, for every seed: replica to replica
        init = (None if generation.source is None
                else self._kept(self.stages.vae_decoder.encode.remote(generation.source)))
        encoded = self._kept(self.stages.text_encoder.encode.remote(request))
        try:
            return await _all(self._images(encoded, init, generation, on_step))
        except Exception as error:
            if not is_fault(error) or not await _fails_by_fault(encoded):
                raise
            _log_retry("TextEncoder", error)
        encoded = self._kept(self.stages.text_encoder.encode.remote(request))
        return await _all(self._images(encoded, init, generation, on_step))

    def _images(self, encoded: DeploymentResponse, init: DeploymentResponse | None,
                generation: Generation, on_step: OnStep | None) -> list[Awaitable[Decoded]]:
        return [self._image(encoded, init, generation, seed, index, on_step)
                for index, seed in enumerate(generation.seeds())]

    async def _image(self, encoded: DeploymentResponse, init: DeploymentResponse | None,
                     generation: Generation, seed: int, index: int,
                     on_step: OnStep | None) -> Decoded:
        g = generation
        params = DenoiseParams(width=g.width, height=g.height, steps=g.steps,
                               guidance_scale=g.guidance_scale, seed=seed, sampler=g.sampler,
                               schedule=g.scheduler, cache=g.cache, strength=g.strength)
        report = None if on_step is None else (lambda progress: on_step(index, progress))
        denoised = await self._denoised(encoded, params, init, report)
        if g.hires is not None:  # the first pass upscaled by the VAE stage, then redrawn
            hires = g.hires
            upscaled = self._kept(self.stages.vae_decoder.upscale.remote(
                denoised, hires.width, hires.height, hires.upscaler))
            second = dataclasses.replace(params, width=hires.width, height=hires.height,
                                         steps=hires.steps, sampler=hires.sampler,
                                         strength=hires.strength)
            denoised = await self._denoised(encoded, second, upscaled, report)
        return await self._decoded(denoised, generation.infotext(seed), init)

    async def _denoised(self, encoded: DeploymentResponse, params: DenoiseParams,
                        init: DeploymentResponse | None,
                        report: Callable[[StepProgress], None] | None
                        ) -> DeploymentResponse | Denoised:
        """The Denoiser's answer: a response passed on replica to replica (the latents never
        come here), or, when progress is reported, the ``Denoised`` read from its stream."""
        if report is None:
            return self._kept(self.stages.denoiser.denoise.remote(encoded, params, init))
        return await self._reported_denoise(encoded, params, init, report)

    async def _reported_denoise(self, encoded: DeploymentResponse, params: DenoiseParams,
                                init: DeploymentResponse | None,
                                on_step: Callable[[StepProgress], None]) -> Denoised:
        """The Denoiser's progress stream read: a ``StepProgress`` per step, then the
        ``Denoised``, handed on to the VAEDecoder."""
        stream = self.stages.denoiser.options(stream=True).denoise_stream.remote(
            encoded, params, init, self.previews)
        denoised = None
        try:
            async for item in stream:
                if isinstance(item, StepProgress):
                    on_step(item)
                else:
                    denoised = item
        finally:
            stream.cancel()  # a no-op once it ended; stops the Denoiser if we were cancelled
        if denoised is None:
            raise RuntimeError("the Denoiser's stream ended without its result")
        return denoised

    async def _decoded(self, denoised: DeploymentResponse | Denoised, infotext: str,
                       init: DeploymentResponse | None) -> Decoded:
        """The VAEDecoder's PNG; once more if its replica was lost while the latents are safe."""
        try:
            return await self._kept(self.stages.vae_decoder.decode.remote(denoised, infotext, init))
        except Exception as error:
            if not is_fault(error) or await _fails_by_fault(denoised):
                raise  # not a lost replica, or the Denoiser's loss: no retry
            _log_retry("VAEDecoder", error)
        return await self._kept(self.stages.vae_decoder.decode.remote(denoised, infotext, init))


async def _all(images: Iterable[Awaitable[T]]) -> list[T]:
    """Every result, in order; on the first failure the others stop waiting."""
    tasks = [asyncio.ensure_future(image) for image in images]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op for those done


async def _fails_by_fault(response: DeploymentResponse | object) -> bool:
    """Whether a call's answer is a fault (its replica lost). Read only on a failure path: the
    answer then comes to the Ingress (conditioning or latents, at most a few MB)."""
    if not isinstance(response, DeploymentResponse):
        return False  # a value in hand: nothing of it was lost
    try:
        await response
    except Exception as error:  # noqa: BLE001 - classified, not handled
        return is_fault(error)
    return False


def _log_retry(stage: str, error: BaseException) -> None:
    logger.warning("request %s: a %s replica was lost (%s); trying once more on another",
                   current_request_id(), stage, type(error).__name__, exc_info=error)
