"""Image encoding for responses: PNG bytes with the generation parameters embedded.

The ``parameters`` text chunk is where AUTOMATIC1111 writes its generation info, so tools that
read A1111 PNGs (PNG Info tabs, image browsers) show Raydiance's parameters too.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Mapping

import numpy as np
from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image | np.ndarray, parameters: str | None = None,
               texts: Mapping[str, str] | None = None) -> bytes:
    """``image`` (a PIL image, or (H, W, 3) uint8 RGB pixels) as PNG bytes, with ``parameters``
    and any other ``texts`` as text chunks."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="RGB")
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    for key, value in (texts or {}).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def png_base64(pixels: np.ndarray) -> str:
    """(H, W, 3) uint8 RGB as base64 PNG text: how JSON answers carry a step preview."""
    return base64.b64encode(encode_png(pixels)).decode("ascii")
