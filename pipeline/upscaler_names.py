"""The hires fix's upscalers by their A1111 names: what the API validates a request's
``hr_upscaler`` against without importing torch (the upscaling itself is ``pipeline.upscale``).
"""
from __future__ import annotations

from PIL import Image

from pipeline.errors import InvalidRequestError

LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's latent modes: torch's interpolation and whether it antialiases."""
PIXEL_UPSCALERS: dict[str, Image.Resampling] = {
    "None": Image.Resampling.LANCZOS,  # A1111's "None": a plain resize
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
UPSCALERS: tuple[str, ...] = (*LATENT_UPSCALE_MODES, *PIXEL_UPSCALERS)


def canonical_upscaler(name: str, field: str = "hr_upscaler") -> str:
    """The A1111 spelling of ``name`` (case-insensitive), or InvalidRequestError naming ``field``."""
    for known in UPSCALERS:
        if known.lower() == name.strip().lower():
            return known
    raise InvalidRequestError(field, f"unknown upscaler {name!r}; choose one of {', '.join(UPSCALERS)}")
