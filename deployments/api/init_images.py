"""Image to image at the edge: what a dialect's init-image fields ask for, turned into the
``SourceImage`` the VAE stage encodes, all with Pillow on the Ingress (no tensors here).

As A1111 does: the image is sized to the request (``resize_mode``); the mask is resized the same
way, inverted if asked, blurred (``mask_blur``), and with ``inpainting_fill`` "fill" the masked
area starts from the blurred surroundings instead of the original pixels.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from pipeline.request_params import InpaintingFill, SourceImage

from deployments.api.generation import Generation
from deployments.api.image_input import resize_image

FILLS: tuple[InpaintingFill, ...] = ("fill", "original", "latent noise", "latent nothing")
"""A1111's ``inpainting_fill`` values 0-3, in its order."""


@dataclass(frozen=True)
class InitRequest:
    """A dialect's init-image fields, its images already decoded (``image_input``)."""

    image: Image.Image
    strength: float = 0.75
    mask: Image.Image | None = None  # white: repaint
    resize_mode: int = 0
    mask_blur: int = 4
    invert_mask: bool = False
    fill: InpaintingFill = "original"


def with_init(generation: Generation, init: InitRequest) -> Generation:
    """``generation`` starting from ``init``'s image (sized to it) at ``init.strength``."""
    size = (generation.width, generation.height)
    image = resize_image(init.image, *size, init.resize_mode)
    mask = None if init.mask is None else _prepared_mask(init, size)
    if mask is not None and init.fill == "fill":
        image = _fill_masked(image, mask)
    source = SourceImage(generation.model, np.asarray(image.convert("RGB")),
                         None if mask is None else np.asarray(mask), init.fill)
    return dataclasses.replace(generation, source=source, strength=init.strength)


def image_size(image: Image.Image) -> tuple[int, int]:
    """An init image's own size on the 8-pixel grid: the size of the answer when the request
    names none."""
    return max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)


def _prepared_mask(init: InitRequest, size: tuple[int, int]) -> Image.Image:
    mask = resize_image(init.mask.convert("L"), *size, init.resize_mode).convert("L")
    if init.invert_mask:
        mask = ImageOps.invert(mask)
    if init.mask_blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(init.mask_blur))
    return mask


def _fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with ever less blurred copies of what surrounds
    it, so that it starts from the neighbouring colours rather than from what was there."""
    keep = ImageOps.invert(mask.point(lambda v: 255 if v > 0 else 0))
    filled = Image.new("RGBA", image.size)
    filled.paste(image.convert("RGBA"), mask=keep)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = filled.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            filled.alpha_composite(blurred)
    return filled.convert("RGB")
