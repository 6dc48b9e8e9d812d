"""The rest of the AUTOMATIC1111 API that clients call besides generating: the lists they read
when they connect (webuiapi reads ``/sdapi/v1/scripts`` when constructed), upscaling one image
(``/extra-single-image``, with A1111's built-in None, Lanczos and Nearest upscalers), reading an
image's generation info (``/png-info``), and the no-op refreshes.

Shapes are A1111's (``modules/api/models.py``, ``modules/api/api.py``). What Raydiance has none
of (face restorers, RealESRGAN, hypernetworks, styles, scripts) is listed empty, not refused, so
a client's start-up reads succeed. Image work runs off the event loop (``asyncio.to_thread``).
"""
from __future__ import annotations

import asyncio
import base64
import html
import os
from typing import Annotated, Any, Literal

import psutil
from fastapi import APIRouter, Depends, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from pipeline.images import encode_png

from deployments.api.embeddings import a1111_embeddings
from deployments.api.errors import ApiError
from deployments.api.generation import ServedModels
from deployments.api.image_input import LANCZOS, as_rgb, open_image
from deployments.api.infotext import parse_infotext, quote, read_image_info
from deployments.api.protocol import MAX_SIDE, REQUEST_ERRORS, SERVER_ERRORS, ImageData, Name
from deployments.settings import Limits

LATENT_UPSCALE_MODES = ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                        "Latent (bicubic antialiased)", "Latent (nearest)", "Latent (nearest-exact)")
"""A1111's ``shared.latent_upscale_modes`` (its hires fix's; listed for clients, not used here)."""
UPSCALERS: dict[str, Image.Resampling | None] = {
    "None": None, "Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
"""A1111's built-in upscalers (``modules/upscaler.py``), by name: the resampling each does."""
MAX_UPSCALE = 8.0  # A1111's "Resize" slider's maximum
UpscaleFactor = Annotated[float, Field(gt=0, le=MAX_UPSCALE, allow_inf_nan=False,
                                       description="resize_mode 0: by how much (A1111: up to 8)")]
TargetSide = Annotated[int, Field(ge=1, le=MAX_SIDE, description="resize_mode 1: pixels")]
Visibility = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


class ExtrasSingleImageRequest(BaseModel):
    """POST /sdapi/v1/extra-single-image (A1111's ``ExtrasSingleImageRequest``). Face restoration
    (gfpgan_*, codeformer_*) and ``upscale_first`` are accepted and ignored: none is served."""

    model_config = ConfigDict(extra="ignore")

    image: ImageData
    resize_mode: Literal[0, 1] = Field(0, description="0: by upscaling_resize; 1: to "
                                       "upscaling_resize_w x upscaling_resize_h")
    upscaling_resize: UpscaleFactor = 2.0
    upscaling_resize_w: TargetSide = 512
    upscaling_resize_h: TargetSide = 512
    upscaling_crop: bool = True
    upscaler_1: Name = Field("None", description="None, Lanczos or Nearest")
    upscaler_2: Name = Field("None", description="None, Lanczos or Nearest, blended in at "
                             "extras_upscaler_2_visibility")
    extras_upscaler_2_visibility: Visibility = 0.0


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class PngInfoRequest(BaseModel):
    """POST /sdapi/v1/png-info: any image Pillow reads (A1111 reads JPEG and WebP EXIF too)."""

    model_config = ConfigDict(extra="ignore")

    image: ImageData


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


def _upscaler(name: str, field: str) -> tuple[str, Image.Resampling | None]:
    """The upscaler ``name`` means (case aside): its own name and its resampling."""
    for known, resample in UPSCALERS.items():
        if name.strip().lower() == known.lower():
            return known, resample
    raise ApiError(field, f"{name!r} is not served; choose one of {', '.join(UPSCALERS)}")


def _target(body: ExtrasSingleImageRequest, image: Image.Image,
            limits: Limits) -> tuple[float, tuple[int, int], dict[str, str]]:
    """The factor, the size A1111's ``Upscaler.upscale`` makes (each side rounded down to a
    multiple of 8) and the info it records; refused beyond ``max_input_pixels``."""
    if body.resize_mode == 1:
        scale = max(body.upscaling_resize_w / image.width, body.upscaling_resize_h / image.height)
        info, field = {"Postprocess upscale to":
                       f"{body.upscaling_resize_w}x{body.upscaling_resize_h}"}, "upscaling_resize_w"
    else:
        scale, field = body.upscaling_resize, "upscaling_resize"
        info = {"Postprocess upscale by": f"{scale:g}"}
    size = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
    final = (body.upscaling_resize_w, body.upscaling_resize_h) if (
        body.resize_mode == 1 and body.upscaling_crop) else size
    if min(size) < 8:
        raise ApiError(field, f"{image.width}x{image.height} scaled by {scale:g} is under 8 "
                       "pixels on a side")
    for width, height in (size, final):  # the upscaled image, then what is cropped from it
        if width * height > limits.max_input_pixels:
            raise ApiError(field, f"{width}x{height} is above this server's limit of "
                           f"{limits.max_input_pixels} pixels")
    return scale, size, info


def _upscaled(image: Image.Image, resample: Image.Resampling, scale: float,
              size: tuple[int, int]) -> Image.Image:
    """A1111's built-in upscaler: ``resample`` by ``scale``, then Lanczos to ``size``."""
    scaled = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))),
                          resample=resample)
    return scaled if scaled.size == size else scaled.resize(size, resample=LANCZOS)


def upscale(body: ExtrasSingleImageRequest, limits: Limits) -> ExtrasSingleImageResponse:
    """What A1111's extras tab does with upscaling alone (``postprocessing_upscale.py``): the
    image (RGB) at the size asked for, its own PNG text kept and ``postprocessing`` added."""
    opened = open_image(body.image, "image", limits)
    parameters, items = read_image_info(opened)
    image = as_rgb(opened)
    (name, first), (name_2, second) = (_upscaler(body.upscaler_1, "upscaler_1"),
                                       _upscaler(body.upscaler_2, "upscaler_2"))
    info: dict[str, str] = {}
    if first is not None:
        scale, size, info = _target(body, image, limits)
        upscaled = _upscaled(image, first, scale, size)
        if second is not None and body.extras_upscaler_2_visibility > 0:
            upscaled = Image.blend(upscaled, _upscaled(image, second, scale, size),
                                   body.extras_upscaler_2_visibility)
        if body.resize_mode == 1 and body.upscaling_crop:
            width, height = body.upscaling_resize_w, body.upscaling_resize_h
            cropped = Image.new("RGB", (width, height))
            cropped.paste(upscaled, box=(width // 2 - upscaled.width // 2,
                                         height // 2 - upscaled.height // 2))
            upscaled, info["Postprocess crop to"] = cropped, f"{width}x{height}"
        info["Postprocess upscaler"] = name
        if second is not None and body.extras_upscaler_2_visibility > 0:
            info["Postprocess upscaler 2"] = name_2
        image = upscaled
    infotext = ", ".join(f"{key}: {quote(value)}" for key, value in info.items())
    texts = {key: value for key, value in items.items() if isinstance(value, str)}
    if parameters:
        texts["parameters"] = parameters
    if infotext:
        texts["postprocessing"] = infotext
    return ExtrasSingleImageResponse(html_info=_plaintext_to_html(infotext),
                                     image=base64.b64encode(encode_png(image, texts=texts)).decode("ascii"))


def png_info(body: PngInfoRequest, limits: Limits) -> PngInfoResponse:
    """The image's generation info, its other text, and the info parsed (A1111's ``pnginfoapi``)."""
    image = open_image(body.image, "image", limits, allow_animated=True)
    info, items = read_image_info(image)
    return PngInfoResponse(info=info or "", items=items, parameters=parse_infotext(info or ""))


def _plaintext_to_html(text: str) -> str:
    """A1111's ``ui_common.plaintext_to_html``."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def memory() -> dict[str, Any]:
    """A1111's ``/memory``: this process's RAM (``free`` is the machine's total less it, as
    A1111 counts) and its CUDA device's memory, or ``{"error": ...}`` where it has none."""
    try:
        rss, total = psutil.Process(os.getpid()).memory_info().rss, psutil.virtual_memory().total
        ram: dict[str, Any] = {"free": total - rss, "used": rss, "total": total}
    except Exception as error:  # noqa: BLE001 - A1111 answers the error in place of the figures
        ram = {"error": str(error)}
    return {"ram": ram, "cuda": _cuda_memory()}


def _cuda_memory() -> dict[str, Any]:
    """The Ingress is placed with no GPU (``deployments.placement``): the figures A1111 gives
    here belong to the stage replicas, which ``/metrics`` reports."""
    return {"error": "unavailable: the Ingress replica that answered has no GPU (the "
                     "models are held by the TextEncoder, Denoiser and VAEDecoder replicas)"}


class A1111Tools:
    def __init__(self, models: ServedModels) -> None:
        self.models = models

    async def extra_single_image(self, body: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        return await asyncio.to_thread(upscale, body, self.models.limits)

    async def png_info(self, body: PngInfoRequest) -> PngInfoResponse:
        return await asyncio.to_thread(png_info, body, self.models.limits)

    def cmd_flags(self) -> dict[str, Any]:
        """The few of A1111's command-line flags that say something true of this server."""
        loras, embeddings = self.models.loras, self.models.embeddings
        return {"api": True, "nowebui": True, "ckpt_dir": self.models.catalog.checkpoints_dir,
                "lora_dir": str(loras.folder) if loras is not None else None,
                "embeddings_dir": str(embeddings.folder) if embeddings is not None else None,
                "hypernetwork_dir": None, "disable_safe_unpickle": False}


def _tools(request: Request) -> A1111Tools:
    return request.app.state.a1111_tools


Tools = Annotated[A1111Tools, Depends(_tools)]
router = APIRouter(prefix="/sdapi/v1", responses=SERVER_ERRORS)


@router.get("/upscalers")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
            for name in UPSCALERS]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, Any]]:
    return [{"name": name} for name in LATENT_UPSCALE_MODES]


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse,
             responses=REQUEST_ERRORS)
async def extra_single_image(body: ExtrasSingleImageRequest, tools: Tools) -> ExtrasSingleImageResponse:
    return await tools.extra_single_image(body)


@router.post("/png-info", response_model=PngInfoResponse, responses=REQUEST_ERRORS)
async def png_info_route(body: PngInfoRequest, tools: Tools) -> PngInfoResponse:
    return await tools.png_info(body)


@router.post("/refresh-checkpoints")
async def refresh_checkpoints() -> None:
    """A no-op that answers null: the checkpoints folder is listed afresh on every read."""


@router.post("/refresh-loras")
async def refresh_loras() -> None:
    """A no-op that answers null: the loras folder is listed afresh on every read."""


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    """No scripts (webuiapi reads this when constructed, to see which extensions are there)."""
    return {"txt2img": [], "img2img": []}


@router.get("/script-info")
async def script_info() -> list[dict[str, Any]]:
    return []


@router.get("/cmd-flags")
async def cmd_flags(tools: Tools) -> dict[str, Any]:
    return tools.cmd_flags()


@router.get("/memory")
async def memory_route() -> dict[str, Any]:
    return await asyncio.to_thread(memory)


@router.get("/embeddings")
async def embeddings(tools: Tools) -> dict[str, dict[str, Any]]:
    """A1111's shape (``{"loaded": {name: {step, sd_checkpoint, sd_checkpoint_name, shape,
    vectors}}, "skipped": {...}}``), from the embeddings folder (``deployments.api.embeddings``)."""
    return await a1111_embeddings(tools.models)


@router.get("/prompt-styles")
async def prompt_styles() -> list[dict[str, Any]]:
    return []


@router.get("/face-restorers")
async def face_restorers() -> list[dict[str, Any]]:
    return []


@router.get("/realesrgan-models")
async def realesrgan_models() -> list[dict[str, Any]]:
    return []


@router.get("/hypernetworks")
async def hypernetworks() -> list[dict[str, Any]]:
    return []
