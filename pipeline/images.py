"""Image encoding for responses: PNG bytes with the generation parameters embedded.

The ``parameters`` text chunk is where AUTOMATIC1111 writes its generation info, so tools that
read A1111 PNGs (PNG Info tabs, image browsers) show Raydiance's parameters too.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image | np.ndarray, parameters: str | None = None) -> bytes:
    """``image`` (a PIL image, or (H, W, 3) uint8 RGB pixels) as PNG bytes."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image, mode="RGB")
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
