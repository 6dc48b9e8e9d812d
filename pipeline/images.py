"""Image encoding for responses: PNG bytes with the generation parameters embedded.

The ``parameters`` text chunk is where AUTOMATIC1111 writes its generation info, so tools that
read A1111 PNGs (PNG Info tabs, image browsers) show Raydiance's parameters too.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, PngImagePlugin


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels, mode="RGB")


def encode_png(image: Image.Image | np.ndarray, parameters: str | None = None) -> bytes:
    if isinstance(image, np.ndarray):
        image = to_pil(image)
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(image: Image.Image | np.ndarray, parameters: str | None = None) -> str:
    return base64.b64encode(encode_png(image, parameters)).decode("ascii")
