"""The Ingress deployment: on each replica, one FastAPI app with the three dialects' routers.

The app is built per replica (``@serve.ingress()`` with ``__serve_build_asgi_app__``), after the
constructor, so each route reaches this replica's own objects through ``request.app.state``:
the fan-out over the stages, what the server serves, and each dialect's handler (A1111's
selected checkpoint and progress are per replica, as they are per server in A1111).
"""
from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel, PositiveFloat
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.embedding_library import EmbeddingLibrary
from pipeline.library import LoraLibrary

from deployments.api import a1111, a1111_tools, jobs, native, openai, page
from deployments.api.admission import BackpressureSettings
from deployments.api.auth import CorsSettings, install_access_control
from deployments.api.errors import install_error_handlers
from deployments.api.generation import ServedModels
from deployments.api.keys import AuthSettings
from deployments.api.middleware import install_guards, install_middleware
from deployments.api.readiness import Readiness
from deployments.api.serving import Serving, Stages
from deployments.settings import JobSettings, Limits, StageSettings
from deployments.startup import StartupClock

TEXT_BODY_BYTES = 1 << 20  # prompts are short; anything bigger is a mistake or an attack


def max_body_bytes(limits: Limits) -> int:
    """The body limit, on the bytes received: the text, and room for an init image and a mask
    of ``max_input_bytes`` each, in base64 (4/3 of their size) or as multipart files."""
    return TEXT_BODY_BYTES + 2 * (limits.max_input_bytes * 4 // 3 + 4)


class IngressSettings(BaseModel):
    stage: StageSettings  # where the models and LoRAs are (the Ingress reads metadata only)
    limits: Limits
    request_timeout_s: PositiveFloat = 300.0
    auth: AuthSettings | None = None
    cors: CorsSettings = CorsSettings()
    backpressure: BackpressureSettings = BackpressureSettings()
    model_aliases: dict[str, str] = {}  # alias -> served model (checked by the app builder)
    jobs: JobSettings = JobSettings()


def build_api(serving: Serving, models: ServedModels, settings: IngressSettings,
              job_queue: DeploymentHandle | None = None,
              readiness: Readiness | None = None) -> FastAPI:
    """The HTTP API over ``serving``, ``models`` and the ``job_queue``; OpenAPI at
    ``/openapi.json``, the page for people at ``/``.

    Its layers, outermost first: metrics, request id, error boundary (the 500s), CORS and the
    key check, admission (backpressure), the body limit, then FastAPI's own error handlers."""
    app = FastAPI(title="Raydiance", description="Stable Diffusion-family models on Ray Serve",
                  version="0.1.0")
    for router in (page.router, native.router, jobs.router, openai.router, a1111.router,
                   a1111_tools.router):
        app.include_router(router)
    job_client = None if job_queue is None else jobs.JobsClient(job_queue, settings.jobs)
    app.state.native = native.NativeApi(serving, models, readiness)
    app.state.jobs = jobs.JobsApi(job_client, models)
    app.state.openai = openai.OpenAIApi(serving, models, job_client)
    app.state.a1111 = a1111.A1111Api(serving, models)
    app.state.a1111_tools = a1111_tools.A1111Tools(models)
    install_error_handlers(app, settings.backpressure.retry_after_s)
    install_guards(app, max_body_bytes(settings.limits), settings.backpressure)
    install_access_control(app, settings.auth, settings.cors)
    install_middleware(app)
    return app


# Above backpressure.max_requests_in_flight: a request beyond that limit must reach the Ingress
# to be answered in JSON, not wait in the proxy's queue (GETs are not counted there).
@serve.deployment(name="Ingress", max_ongoing_requests=256)
@serve.ingress()
class Ingress:
    async def __init__(self, text_encoder: DeploymentHandle, denoiser: DeploymentHandle,
                       vae_decoder: DeploymentHandle, job_queue: DeploymentHandle,
                       settings: IngressSettings) -> None:
        clock = StartupClock("Ingress")
        stage = settings.stage
        self.serving = Serving(Stages(text_encoder, denoiser, vae_decoder), settings.request_timeout_s)
        self.models = ServedModels(stage.catalog(), stage.default_model, settings.limits,
                                   LoraLibrary(stage.loras_dir) if stage.loras_dir else None,
                                   settings.model_aliases,
                                   EmbeddingLibrary(stage.embeddings_dir) if stage.embeddings_dir
                                   else None)
        self.settings, self.job_queue = settings, job_queue
        self.readiness = Readiness(self.models.catalog.names())
        self._watch = asyncio.get_running_loop().create_task(self.readiness.watch())
        clock.log()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.serving, self.models, self.settings, self.job_queue, self.readiness)
