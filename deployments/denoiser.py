"""Denoiser: conditioning in, final latents out, through the step-batching engine.

One ``pipeline.engine.DenoiseEngine`` per replica: every request this replica holds is denoised
in shared UNet forwards, step by step, each with its own sampler and First Block Cache;
requests share a forward only with the same model and LoRA set; a request's LoRA files are
read when it arrives (``ModelStore.read_loras``) and the engine puts its set's adapters on the
UNet before each forward. The deployment only loads models and translates
between stage messages and engine calls; when a caller goes away, Serve cancels the call and
the engine drops the request before its next step.

What leaves this replica: ``denoise`` returns a ``Denoised`` holding the latents, for an Ingress
that chains it into ``VAEDecoder.decode`` (replica to replica). ``denoise_stream`` yields a
``StepProgress`` per step to its caller (the Ingress, the JobQueue), then the ``Denoised``,
which the caller passes on to the VAEDecoder.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable

from ray import serve

from pipeline.request_params import DenoiseParams

from deployments.messages import Denoised, Encoded, StepProgress
from deployments.metrics import EngineMetrics
from deployments.replica import StageReplica
from deployments.reporting import Report, ReportingTask
from deployments.settings import DenoiserKnobs, StageSettings
from deployments.startup import StartupClock

if TYPE_CHECKING:
    from pipeline.engine.request import OnStep
    from pipeline.init_image import InitImage
    from pipeline.model import DiffusionModel

logger = logging.getLogger("ray.serve")


@serve.deployment(name="Denoiser", max_ongoing_requests=32)
class Denoiser(StageReplica):
    async def __init__(self, settings: StageSettings, knobs: DenoiserKnobs) -> None:
        clock = StartupClock("Denoiser")
        from pipeline.engine import DenoiseEngine  # torch: see deployments.replica
        from pipeline.unet.compiled import CompileOptions

        self.compiled_models = frozenset(settings.compiled_models)
        self.compile_options = CompileOptions(mode=knobs.compile_mode, cache_dir=knobs.compile_cache_dir,
                                              max_rows=knobs.max_batch_rows)
        super().__init__(settings, components=("unet",), prepare=self._compile)
        clock.imported()
        self.engine = DenoiseEngine(max_batch_rows=knobs.max_batch_rows, observer=EngineMetrics(),
                                    activate_adapters=self.store.activate_loras,
                                    read_adapters=self.store.read_loras)
        await self.store.start()
        clock.log()

    async def denoise(self, encoded: Encoded, params: DenoiseParams,
                      init: InitImage | None = None) -> Denoised:
        """From noise, or from ``init`` (the VAE stage's encoding of an init image)."""
        return await self._denoise(encoded, params, init)

    async def denoise_stream(self, encoded: Encoded, params: DenoiseParams,
                             init: InitImage | None = None, previews: bool = False
                             ) -> AsyncIterator[StepProgress | Denoised]:
        """``denoise`` for a caller that shows progress (``handle.options(stream=True)``): yields
        a ``StepProgress`` after every step (with the image's look so far if ``previews``), then
        the ``Denoised``.
        Closing the stream (the caller went away) drops the request before its next step."""
        def work(report: Report[StepProgress]) -> Awaitable[Denoised]:
            return self._denoise(encoded, params, init, previews=previews,
                                 on_step=lambda *step: report(StepProgress(*step)))

        async with ReportingTask(work) as task:
            async for progress in task.reports():
                yield progress
            denoised = task.result()
        yield denoised

    async def _denoise(self, encoded: Encoded, params: DenoiseParams, init: InitImage | None,
                       on_step: OnStep | None = None, previews: bool = False) -> Denoised:
        model = await self.get_model(encoded.model)
        result = await self.engine.submit(model, encoded.conditioning, params,
                                          adapters=encoded.loras, on_step=on_step, init=init,
                                          previews=previews)
        timings = {**encoded.timings, "queue": result.queued_s * 1000,
                   "denoise": result.denoise_s * 1000}
        return Denoised(encoded.model, result.latents.float().numpy(), timings,
                        steps_computed=result.steps_computed, steps_cached=result.steps_cached)

    def _compile(self, model: DiffusionModel) -> None:
        """A model configured with ``compile: true``: its UNet compiled and warmed over the
        engine's batch sizes as it loads (at replica start for the default model), the time
        logged; inductor's cache (``compile_cache_dir``) makes a restart's compile quick."""
        from pipeline.unet.compiled import compile_unet

        if model.name in self.compiled_models:
            model.unet_parts = compile_unet(model.unet, self.compile_options, name=model.name,
                                            log=logger.info)

    def stage_stats(self) -> dict[str, Any]:
        """This replica's engine counters, for tests and operators: forwards and rows run,
        seconds spent in forwards, requests in flight and cancelled."""
        return {"forwards": self.engine.forwards, "rows": self.engine.rows,
                "busy_s": self.engine.busy_s, "active": len(self.engine.active),
                "cancelled": self.engine.cancelled}
