"""The jobs API (``/v1/jobs``): submit a generation, watch it, cancel it, fetch its images by URL.

The jobs live in the JobQueue deployment (one replica, in Ray), so any Ingress replica answers
for any job; this module validates at submit time (the same 4xx as ``/v1/generate``), turns the
registry's views into answers with absolute URLs, and its faults into 503 with Retry-After.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle
from sse_starlette import EventSourceResponse, JSONServerSentEvent

from deployments.api.errors import ApiError, error_body, internal_error_body
from deployments.api.faults import translate
from deployments.api.generation import ServedModels
from deployments.api.native import GenerateRequest, to_generation
from deployments.api.protocol import PING_S, REQUEST_ERRORS, SERVER_ERRORS, declared
from deployments.messages import Decoded
from deployments.settings import JobSettings

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="a job's id")]
MAX_LISTED = 100
IMAGE_CACHE = "private, max-age=3600, immutable"  # a job's image never changes


def _not_found(job_id: str) -> ApiError:
    return ApiError("job_id", f"no job {job_id!r} (never submitted here, or expired)", status=404,
                    code="job_not_found")


class JobsClient:
    """The JobQueue's methods, their faults translated (a dead registry: 503, Retry-After)."""

    def __init__(self, handle: DeploymentHandle, settings: JobSettings) -> None:
        self.handle, self.settings = handle, settings

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except Exception as error:  # noqa: BLE001 - every failure gets its answer
            raise translate(error) from error

    def base_url(self, request: Request) -> str:
        """Where this server is, as the client reached it, or as configured."""
        return (self.settings.public_base_url or str(request.base_url)).rstrip("/")

    def image_urls(self, request: Request, view: dict[str, Any]) -> dict[str, Any]:
        """``view`` with each image's absolute URL."""
        if "images" in view:
            base = f"{self.base_url(request)}/v1/jobs/{view['id']}/images"
            view["images"] = [{"url": f"{base}/{n}", **image} for n, image in enumerate(view["images"])]
        return view

    async def keep(self, request: Request, images: list[Decoded], seeds: list[int]) -> list[str]:
        """URLs of ``images``, kept in the registry (the OpenAI API's ``response_format: url``)."""
        view = self.image_urls(request, await self.call("store_images", images, seeds))
        return [image["url"] for image in view["images"]]


class JobsApi:
    def __init__(self, jobs: JobsClient, models: ServedModels) -> None:
        self.jobs, self.models = jobs, models

    async def submit(self, body: GenerateRequest, request: Request,
                     response: Response) -> dict[str, Any]:
        generation = await asyncio.to_thread(to_generation, body, self.models)
        view = await self.jobs.call("submit", generation)
        if view is None:
            raise ApiError("request", f"more than {self.jobs.settings.max_queued} jobs are queued; "
                           "retry later", status=429, code="queue_full")
        response.headers["Location"] = f"{self.jobs.base_url(request)}/v1/jobs/{view['id']}"
        return view

    async def get(self, job_id: str, request: Request) -> dict[str, Any]:
        view = await self.jobs.call("get", job_id)
        if view is None:
            raise _not_found(job_id)
        return self.jobs.image_urls(request, view)

    async def listing(self, status: str | None, limit: int, request: Request) -> dict[str, Any]:
        views = await self.jobs.call("listing", status, limit)
        return {"jobs": [self.jobs.image_urls(request, view) for view in views]}

    async def cancel(self, job_id: str, request: Request) -> dict[str, Any]:
        view = await self.jobs.call("cancel", job_id)
        if view is None:
            raise _not_found(job_id)
        return self.jobs.image_urls(request, view)

    async def image(self, job_id: str, index: int) -> Response:
        png = await self.jobs.call("image", job_id, index)
        if png is None:
            raise ApiError("n", f"job {job_id!r} has no image {index} (unknown, expired, or not "
                           "finished)", status=404, code="image_not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": IMAGE_CACHE})

    async def preview(self, job_id: str) -> Response:
        png = await self.jobs.call("preview", job_id)
        if png is None:
            raise ApiError("job_id", f"job {job_id!r} has no preview (unknown, expired, or before "
                           "its first step)", status=404, code="preview_not_found")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    async def events(self, job_id: str, previews: bool, request: Request) -> EventSourceResponse:
        if await self.jobs.call("get", job_id) is None:
            raise _not_found(job_id)  # before the stream starts: a plain 404
        return EventSourceResponse(self._events(job_id, previews, request), ping=PING_S)

    async def _events(self, job_id: str, previews: bool,
                      request: Request) -> AsyncIterator[JSONServerSentEvent]:
        stream = self.jobs.handle.options(stream=True).events.remote(job_id, previews)
        try:
            async for name, data in stream:
                if name == "succeeded":
                    data = self.jobs.image_urls(request, {"id": job_id, **data})
                yield JSONServerSentEvent(data, event=name)
        except Exception as error:  # noqa: BLE001 - the stream has begun: say so in an event
            answer = translate(error)
            body = (error_body(answer.status or 503, answer.field, answer.message, answer.code)
                    if isinstance(answer, ApiError) else internal_error_body())
            yield JSONServerSentEvent(body, event="error")
        finally:
            stream.cancel()


def _api(request: Request) -> JobsApi:
    return request.app.state.jobs


def _answered_by(response: Response) -> None:
    """Says which Ingress replica answered (``x-raydiance-replica``, on the JSON answers): any
    of them answers for any job, and when one seems not to, this is what to look for in the
    logs."""
    try:
        response.headers["x-raydiance-replica"] = serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # not in a Serve replica (the API built in a test's process)
        pass


Api = Annotated[JobsApi, Depends(_api)]
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=SERVER_ERRORS,
                   dependencies=[Depends(_answered_by)])
NOT_FOUND = declared({404: "No such job (never submitted, or expired), or no such image or "
                     "preview yet", 422: "A malformed id or value (error.param)"})


@router.post("", status_code=202, responses={**REQUEST_ERRORS, 429: {"description": "queue full"}})
async def submit(body: GenerateRequest, request: Request, response: Response,
                 api: Api) -> dict[str, Any]:
    """Queues the generation ``/v1/generate`` would make; answers its id and queue position."""
    return await api.submit(body, request, response)


@router.get("", responses=declared({422: "An unknown status or a limit out of range"}))
async def listing(request: Request, api: Api,
                  status: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
                  limit: Annotated[int, Query(ge=1, le=MAX_LISTED)] = 20) -> dict[str, Any]:
    return await api.listing(status, limit, request)


@router.get("/{job_id}", responses=NOT_FOUND)
async def get(job_id: JobId, request: Request, api: Api) -> dict[str, Any]:
    return await api.get(job_id, request)


@router.delete("/{job_id}", responses=NOT_FOUND)
async def cancel(job_id: JobId, request: Request, api: Api) -> dict[str, Any]:
    return await api.cancel(job_id, request)


@router.get("/{job_id}/images/{n}", response_class=Response, responses=NOT_FOUND)
async def image(job_id: JobId, n: Annotated[int, Path(ge=0, le=1000)], api: Api) -> Response:
    return await api.image(job_id, n)


@router.get("/{job_id}/preview", response_class=Response, responses=NOT_FOUND)
async def preview(job_id: JobId, api: Api) -> Response:
    return await api.preview(job_id)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=NOT_FOUND)
async def events(job_id: JobId, request: Request, api: Api, previews: bool = False) -> EventSourceResponse:
    """Server-sent events: ``queued`` (position), ``running``, ``step`` (with ``preview``, a
    base64 PNG, if ``previews``), then ``succeeded`` (image URLs), ``failed`` or ``cancelled``."""
    return await api.events(job_id, previews, request)
