"""Ingress: the HTTP API (native, OpenAI Images, AUTOMATIC1111) and the fan-out over the stages.

The Ingress never touches a tensor: it validates, then chains DeploymentResponses
(``decode(denoise(encode(...)))``) so that embeddings and latents go replica to replica through
Ray's object store, and awaits only the finished PNGs.

No ``from __future__ import annotations`` here: Serve's class-based FastAPI views resolve the
route methods' annotations in Ray's own module, where string annotations name nothing.
"""
import asyncio
import base64
import dataclasses
from functools import partial
from typing import Callable
import json
import time
from typing import Any

from fastapi import Body, FastAPI
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from pipeline.denoise import DenoiseParams
from pipeline.errors import InvalidRequestError, ModelLoadError, NotFoundError, RaydianceError
from pipeline.library import LoraLibrary
from pipeline.samplers import SAMPLERS
from pipeline.seeds import MAX_SEED

from deployments.api_models import (
    A1111_SCHEDULERS,
    ApiError,
    GenerateRequest,
    OpenAIImage,
    OpenAIImageRequest,
    OpenAIImagesResponse,
    Resolved,
    Txt2ImgRequest,
    Txt2ImgResponse,
    from_native,
    from_openai,
    from_txt2img,
    resolve,
)
from deployments.http_errors import error_body, install_error_handlers
from deployments.messages import Decoded, EncodeRequest, StepProgress
from deployments.metrics import install_http_metrics
from deployments.settings import Limits, StageSettings

STAGE_TIMINGS = ("encode", "denoise", "decode")
OnStep = Callable[[int, int, int], None]  # (image index, steps done, steps in all)

MAX_BODY_BYTES = 1 << 20  # prompts are short; anything bigger is a mistake or an attack

api = FastAPI(title="Raydiance", description="Stable Diffusion-family models on Ray Serve",
              version="0.1.0")
install_error_handlers(api, max_body_bytes=MAX_BODY_BYTES)
install_http_metrics(api)  # added last, so it wraps the body limit: every answer is counted


class IngressSettings(BaseModel):
    stage: StageSettings  # where the models and LoRAs are (the Ingress reads metadata only)
    limits: Limits
    request_timeout_s: float = 300.0


def _step_headers(images: list[Decoded]) -> dict[str, str]:
    """UNet steps run and skipped by First Block Cache, summed over the request's images."""
    return {"x-raydiance-steps-computed": str(sum(d.steps_computed for d in images)),
            "x-raydiance-steps-cached": str(sum(d.steps_cached for d in images))}


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def _root_cause(error: BaseException) -> BaseException:
    """The user exception inside Ray's wrappers (RayTaskError.cause, possibly nested)."""
    while getattr(error, "cause", None) is not None and error.cause is not error:
        error = error.cause
    return error


@serve.deployment(name="Ingress", max_ongoing_requests=64)
@serve.ingress(api)
class Ingress:
    def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                 vae_decoder: DeploymentHandle, settings: IngressSettings) -> None:
        self.text_encoder, self.denoiser, self.vae_decoder = text_encoder, denoiser, vae_decoder
        self.settings = settings
        self.default_model = settings.stage.default_model
        self.catalog = settings.stage.catalog()
        self.loras = LoraLibrary(settings.stage.loras_dir) if settings.stage.loras_dir else None
        self.a1111_jobs: list[tuple[list[int], int]] = []  # txt2img in flight: steps done per image
        # A1111 keeps one selected checkpoint per server; so does each Ingress replica here.
        self.a1111_options: dict[str, Any] = {
            "sd_model_checkpoint": self.default_model, "sd_checkpoint_hash": None,
            "samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1,
        }

    # --- the DAG ------------------------------------------------------------------------------

    async def _run(self, job: Resolved, on_step: OnStep | None = None) -> list[tuple[int, Decoded]]:
        """Encode once, then denoise and decode each image; returns (seed, PNG) per image.

        Without ``on_step`` the three calls are chained, so embeddings and latents go replica to
        replica. With it, each image's denoising streams its steps here (``on_step(image, done,
        total)``) and its latents come back through this replica on their way to the decoder.
        """
        # Each stage keeps a few models per replica; multiplexing routes to one that holds ours.
        text_encoder, denoiser, vae_decoder = (
            handle.options(multiplexed_model_id=job.model)
            for handle in (self.text_encoder, self.denoiser, self.vae_decoder))
        encoded = text_encoder.encode.remote(
            EncodeRequest(job.model, job.prompt, job.negative_prompt, job.loras))
        seeds = [(job.seed + i) % (MAX_SEED + 1) for i in range(job.count)]
        responses = []
        for index, seed in enumerate(seeds):
            params = DenoiseParams(job.width, job.height, job.steps, job.guidance_scale, seed,
                                   job.sampler, job.cache)
            if on_step is None:
                latents = denoiser.denoise.remote(encoded, params)
                responses.append(vae_decoder.decode.remote(latents, job.infotext(seed)))
            else:
                responses.append(self._reporting_image(denoiser, vae_decoder, encoded, params,
                                                       job.infotext(seed), partial(on_step, index)))
        try:
            decoded = await asyncio.wait_for(asyncio.gather(*responses), self.settings.request_timeout_s)
        except BaseException as error:
            for response in [encoded, *responses]:
                if isinstance(response, DeploymentResponse):
                    response.cancel()  # a caller gone or timed out: stop the stages' work too
            translated = self._translate(error)
            if translated is error:
                raise
            raise translated from error
        return list(zip(seeds, decoded))

    @staticmethod
    async def _reporting_image(denoiser: DeploymentHandle, vae_decoder: DeploymentHandle,
                               encoded: DeploymentResponse, params: DenoiseParams,
                               infotext: str, on_step: Callable[[int, int], None]) -> Decoded:
        stream = denoiser.options(stream=True).denoise_stream.remote(encoded, params)
        denoised = None
        try:
            async for item in stream:
                if isinstance(item, StepProgress):
                    on_step(item.step, item.steps)
                else:
                    denoised = item
        finally:
            stream.cancel()  # a no-op once it ended; stops the Denoiser if we were cancelled
        return await vae_decoder.decode.remote(denoised, infotext)

    @staticmethod
    def _translate(error: BaseException) -> BaseException:
        cause = _root_cause(error)
        if isinstance(cause, NotFoundError):  # e.g. a LoRA file removed since the request was checked
            return ApiError(cause.field, cause.message, status=404, code="not_found")
        if isinstance(cause, InvalidRequestError):
            return ApiError(cause.field, cause.message)
        if isinstance(error, asyncio.TimeoutError):
            return ApiError("request", "timed out; the server is busy, retry later", status=503,
                            code="timeout")
        if isinstance(cause, BackPressureError):
            return ApiError("request", "the server is at capacity, retry later", status=503,
                            code="overloaded")
        if isinstance(cause, RaydianceError):
            return ApiError("model", str(cause), status=500, code="model_error")
        return error

    def _resolve(self, generation) -> Resolved:
        return resolve(generation, self.catalog, self.default_model, self.settings.limits, self.loras)

    # --- native ---------------------------------------------------------------------------------

    @api.post("/v1/generate", response_class=Response,
              responses={200: {"content": {"image/png": {}}}})
    async def generate(self, body: GenerateRequest) -> Response:
        start = time.perf_counter()
        job = self._resolve(from_native(body))
        ((seed, decoded),) = await self._run(job)
        timings = {**decoded.timings, "total": (time.perf_counter() - start) * 1000}
        headers = {
            **_step_headers([decoded]),
            "x-raydiance-seed": str(seed), "x-raydiance-model": job.model,
            "x-raydiance-width": str(job.width), "x-raydiance-height": str(job.height),
            "x-raydiance-steps": str(job.steps), "x-raydiance-sampler": job.sampler,
            "x-raydiance-guidance-scale": f"{job.guidance_scale:g}",
            "server-timing": ", ".join(f"{k};dur={v:.1f}" for k, v in timings.items()),
        }
        headers.update({f"x-raydiance-{k}-ms": f"{v:.1f}" for k, v in timings.items()})
        return Response(decoded.png, media_type="image/png", headers=headers)

    @api.post("/v1/generate/stream", responses={200: {"content": {"text/event-stream": {}}}})
    async def generate_stream(self, body: GenerateRequest) -> StreamingResponse:
        """``/v1/generate`` as server-sent events: ``step`` after every denoising step
        (``{"step", "steps"}``), then ``image`` (``{"seed", "png_base64", "steps_computed",
        "steps_cached", "timings"}``), or ``error`` (the JSON error body) if it fails once
        streaming has begun. A bad request is refused before streaming, as ``/v1/generate``."""
        job = self._resolve(from_native(body))
        return StreamingResponse(self._events(job), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-raydiance-seed": str(job.seed)})

    async def _events(self, job: Resolved):
        events: asyncio.Queue[tuple[str, dict] | None] = asyncio.Queue()
        run = asyncio.ensure_future(self._run(job, on_step=lambda image, step, steps: events.put_nowait(
            ("step", {"step": step, "steps": steps}))))
        run.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield _sse(*event)
            try:
                images = run.result()
            except ApiError as error:
                yield _sse("error", error_body(error.status or 422, error.field, error.message, error.code))
                return
            except Exception as error:  # noqa: BLE001 - the stream has begun: report, don't raise
                yield _sse("error", error_body(500, None, f"internal error: {type(error).__name__}",
                                               "internal_error"))
                return
            for seed, decoded in images:
                yield _sse("image", {"seed": seed, "png_base64": base64.b64encode(decoded.png).decode(),
                                     "steps_computed": decoded.steps_computed,
                                     "steps_cached": decoded.steps_cached, "timings": decoded.timings})
        finally:
            run.cancel()  # the client went away: the Denoiser drops the request at its next step

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        data = [{"id": info.name, "object": "model", "created": 0, "owned_by": "raydiance",
                 "family": info.family, "native_size": info.native_size,
                 "default": info.name == self.default_model}
                for info in self.catalog.describe_all()]
        return {"object": "list", "data": data}

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "default_model": self.default_model}

    # --- OpenAI Images API ------------------------------------------------------------------------

    @api.post("/v1/images/generations", response_model=OpenAIImagesResponse)
    async def openai_generations(self, body: OpenAIImageRequest,
                                 response: Response) -> OpenAIImagesResponse:
        job = self._resolve(from_openai(body))
        images = await self._run(job)
        response.headers.update(_step_headers([d for _, d in images]))
        data = [OpenAIImage(b64_json=base64.b64encode(d.png).decode("ascii")) for _, d in images]
        return OpenAIImagesResponse(created=int(time.time()), data=data,
                                    size=f"{job.width}x{job.height}")

    # --- AUTOMATIC1111 ----------------------------------------------------------------------------

    @api.post("/sdapi/v1/txt2img", response_model=Txt2ImgResponse)
    async def txt2img(self, body: Txt2ImgRequest) -> Txt2ImgResponse:
        job = self._resolve(from_txt2img(body, self.a1111_options["sd_model_checkpoint"]))
        done = [0] * job.count  # steps done per image, for GET /sdapi/v1/progress
        self.a1111_jobs.append((done, job.steps))
        try:
            images = await self._run(job, on_step=lambda image, step, _: done.__setitem__(image, step))
        finally:
            self.a1111_jobs.remove((done, job.steps))
        seeds = [seed for seed, _ in images]
        info = {
            "prompt": job.prompt, "all_prompts": [job.prompt] * job.count,
            "negative_prompt": job.negative_prompt or "",
            "all_negative_prompts": [job.negative_prompt or ""] * job.count,
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * job.count,
            "width": job.width, "height": job.height, "sampler_name": job.sampler,
            "cfg_scale": job.guidance_scale, "steps": job.steps, "batch_size": body.batch_size,
            "n_iter": body.n_iter, "sd_model_name": job.model, "sd_model_hash": None,
            "infotexts": [job.infotext(seed) for seed in seeds], "job_timestamp":
            time.strftime("%Y%m%d%H%M%S"), "version": "raydiance",
            "steps_computed": [d.steps_computed for _, d in images],
            "steps_cached": [d.steps_cached for _, d in images],
            "cache": dataclasses.asdict(job.cache),
        }
        return Txt2ImgResponse(images=[base64.b64encode(d.png).decode("ascii") for _, d in images],
                               parameters=body.model_dump(mode="json"), info=json.dumps(info))

    @api.get("/sdapi/v1/sd-models")
    async def sd_models(self) -> list[dict[str, Any]]:
        return [{"title": info.name, "model_name": info.name, "hash": None, "sha256": None,
                 "filename": info.path, "config": None} for info in self.catalog.describe_all()]

    @api.get("/sdapi/v1/samplers")
    async def samplers(self) -> list[dict[str, Any]]:
        return [{"name": name, "aliases": [], "options": {}} for name in SAMPLERS]

    @api.get("/sdapi/v1/schedulers")
    async def schedulers(self) -> list[dict[str, Any]]:
        return [{"name": key, "label": label, "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for key, label in A1111_SCHEDULERS.items()]

    @api.get("/sdapi/v1/upscalers")
    async def upscalers(self) -> list[dict[str, Any]]:
        return []

    @api.get("/sdapi/v1/sd-vae")
    async def sd_vae(self) -> list[dict[str, Any]]:
        return []

    @api.get("/sdapi/v1/loras")
    async def a1111_loras(self) -> list[dict[str, Any]]:
        """What A1111's Lora extension lists; clients build ``<lora:name:weight>`` tags from it."""
        return [{"name": name, "alias": name, "path": str(self.loras.resolve(name)), "metadata": {}}
                for name in self._lora_names()]

    @api.get("/v1/loras")
    async def native_loras(self) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "lora"} for name in self._lora_names()]}

    def _lora_names(self) -> list[str]:
        return self.loras.names() if self.loras is not None else []

    @api.get("/sdapi/v1/options")
    async def get_options(self) -> dict[str, Any]:
        return dict(self.a1111_options)

    @api.post("/sdapi/v1/options")
    async def set_options(self, body: dict[str, Any] = Body(...)) -> None:
        """Open WebUI posts back the whole options object with one key changed: unknown keys
        are accepted and ignored; only the checkpoint is checked and kept."""
        model = body.get("sd_model_checkpoint")
        if model is not None:
            try:
                self.catalog.describe(model)
            except NotFoundError as error:
                raise ApiError("sd_model_checkpoint", error.message, status=404,
                               code="model_not_found") from None
            except (InvalidRequestError, ModelLoadError) as error:
                raise ApiError("sd_model_checkpoint", str(error)) from None
            self.a1111_options["sd_model_checkpoint"] = model
        return None

    @api.get("/sdapi/v1/progress")
    async def progress(self) -> dict[str, Any]:
        """Step progress of the txt2img requests in flight on this Ingress replica."""
        total = sum(steps * len(done) for done, steps in self.a1111_jobs)
        finished = sum(sum(done) for done, _ in self.a1111_jobs)
        latest_done, latest_steps = self.a1111_jobs[-1] if self.a1111_jobs else ([0], 0)
        return {"progress": finished / total if total else 0.0, "eta_relative": 0.0,
                "current_image": None, "textinfo": None,
                "state": {"skipped": False, "interrupted": False, "job": "",
                          "job_count": len(self.a1111_jobs), "job_timestamp": "0", "job_no": 0,
                          "sampling_step": max(latest_done), "sampling_steps": latest_steps}}
