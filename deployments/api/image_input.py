"""Images that callers send (init images, masks, images to upscale or read): decoded with Pillow
on the Ingress, checked before their pixels are, and sized as A1111 sizes them.

A1111 clients send base64 text, bare or as a ``data:image/png;base64,`` URL; the native API may
send the bytes themselves. Every refusal is an ``ApiError`` naming the caller's field: 413 for
more bytes than ``limits.max_input_bytes``, 422 for the rest (not base64, not an image Pillow
reads, a truncated file, an animation, more pixels than ``limits.max_input_pixels``, which is
read from the header before any pixel is decoded). URLs are not fetched.

A decoded image is fully loaded, turned upright by its EXIF orientation, and in mode RGB with
any transparency composited over white (A1111's default ``img2img_background_color``); a mask
is in mode L, taken from its alpha channel when it has a transparent one (as A1111's
``create_binary_mask``: alpha above 128 repaints), else from its grey levels.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from deployments.api.errors import ApiError
from deployments.settings import Limits

LANCZOS = Image.Resampling.LANCZOS
RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill",
                3: "Just resize (latent upscale)"}
"""A1111's ``resize_mode`` values (img2img); 3 is 0 here: there is no latent upscaling."""
_DATA_URL = re.compile(r"^data:[^,;]*(;[^,]*)?,", re.IGNORECASE)
_WHITE = (255, 255, 255)
_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "I", "I;16",
                    "I;16L", "I;16B", "I;16N", "F", "CMYK", "YCbCr", "HSV"})
"""Pixel modes Pillow converts to RGB, RGBA and L (not LAB, for one, which TIFF can hold)."""


def decode_image(data: str | bytes, field: str, limits: Limits, *,
                 keep_alpha: bool = False) -> Image.Image:
    """``data`` (bytes, or base64 text with or without a data URL prefix) as a loaded RGB image,
    upright; transparency composited over white, or with ``keep_alpha`` kept (mode RGBA, for
    ``transparency_mask``) where the image has any."""
    image = open_image(data, field, limits)
    if keep_alpha and _has_alpha(image):
        return _upright(image).convert("RGBA")
    return as_rgb(image)


def transparency_mask(image: Image.Image) -> Image.Image | None:
    """OpenAI's edit mask: where ``image`` is transparent is redrawn. Mode L, 255 where fully
    transparent, 0 where opaque, in between for partial alpha; None if nothing is transparent."""
    if not _has_alpha(image):
        return None
    alpha = image.convert("RGBA").getchannel("A")
    if alpha.getextrema() == (255, 255):
        return None
    return alpha.point(lambda value: 255 - value)


def as_rgb(image: Image.Image) -> Image.Image:
    """An opened image (``open_image``) upright, in mode RGB, transparency over white."""
    image = _upright(image)
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, _WHITE + (255,))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    return image.convert("RGB")


def decode_mask(data: str | bytes, field: str, limits: Limits) -> Image.Image:
    """``data`` as a loaded mode-L mask, upright: a transparent alpha channel's coverage
    (above 128: 255, else 0, as A1111), otherwise the image's grey levels (white: repaint)."""
    image = _upright(open_image(data, field, limits))
    if _has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda value: 255 if value > 128 else 0)
    return image.convert("L")


def open_image(data: str | bytes, field: str, limits: Limits, *,
               allow_animated: bool = False) -> Image.Image:
    """``data`` opened and fully loaded as Pillow reads it (mode, ``info`` and EXIF untouched;
    an animation's first frame where ``allow_animated``), after the checks above."""
    raw = _raw_bytes(data, field, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            _check_pixels(image, field, limits)
            if not allow_animated and _is_animated(image):
                raise ApiError(field, f"an animated image ({image.format}, {image.n_frames} "
                               "frames); send a single still image", code="animated_image")
            image.load()
        if image.mode not in _MODES:
            raise ApiError(field, f"pixels in mode {image.mode}, which this server does not "
                           "convert; send RGB, RGBA, greyscale or palette images", code="invalid_image")
    except ApiError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ApiError(field, f"more pixels than this server's limit of {limits.max_input_pixels}",
                       code="too_many_pixels") from None
    except UnidentifiedImageError:
        raise ApiError(field, "not an image this server can read (PNG, JPEG, WebP, GIF, BMP, "
                       "TIFF...)", code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as error:
        # what Pillow raises for a truncated or corrupt file while decoding it
        raise ApiError(field, f"a corrupt or truncated image ({error})", code="invalid_image") from None
    return image


def resize_image(image: Image.Image, width: int, height: int, resize_mode: int) -> Image.Image:
    """``image`` at ``width`` x ``height`` as A1111's ``images.resize_image`` does (Lanczos; its
    mode kept): 0 and 3 stretch it; 1 scales it to cover and crops the centre; 2 scales it to fit,
    centres it and fills the bands on either side with its edge rows (or columns) stretched."""
    if width < 1 or height < 1:
        raise ValueError(f"size {width}x{height}: each side must be at least 1")
    if resize_mode in (0, 3):
        return image.resize((width, height), resample=LANCZOS)
    if resize_mode not in (1, 2):
        raise ValueError(f"resize_mode {resize_mode}: one of {sorted(RESIZE_MODES)}")
    ratio, source_ratio = width / height, image.width / image.height
    wider = ratio > source_ratio if resize_mode == 1 else ratio < source_ratio
    taller = ratio <= source_ratio if resize_mode == 1 else ratio >= source_ratio
    scaled_w = width if wider else max(1, image.width * height // image.height)
    scaled_h = height if taller else max(1, image.height * width // image.width)
    scaled = image.resize((scaled_w, scaled_h), resample=LANCZOS)
    result = Image.new(image.mode, (width, height))
    left, top = width // 2 - scaled_w // 2, height // 2 - scaled_h // 2
    result.paste(scaled, box=(left, top))
    if resize_mode == 2:
        _fill_edges(result, scaled, left, top)
    return result


def _fill_edges(result: Image.Image, scaled: Image.Image, left: int, top: int) -> None:
    """A1111's fill: the bands beside ``scaled`` (pasted at ``left``, ``top``) painted with its
    first and last rows (or columns) stretched, through the same zero-height (or zero-width)
    ``box`` it resizes with. Unlike A1111, the far band is sized to what remains, so an odd
    difference leaves no unpainted line."""
    width, height = result.size
    after_h, after_w = height - top - scaled.height, width - left - scaled.width
    if top > 0 or after_h > 0:
        for size, box, at in (((width, top), (0, 0, width, 0), (0, 0)),
                              ((width, after_h), (0, scaled.height, width, scaled.height),
                               (0, top + scaled.height))):
            if size[1] > 0:
                result.paste(scaled.resize(size, box=box), box=at)
    elif left > 0 or after_w > 0:
        for size, box, at in (((left, height), (0, 0, 0, height), (0, 0)),
                              ((after_w, height), (scaled.width, 0, scaled.width, height),
                               (left + scaled.width, 0))):
            if size[0] > 0:
                result.paste(scaled.resize(size, box=box), box=at)


def _raw_bytes(data: str | bytes, field: str, limits: Limits) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
    elif isinstance(data, str):
        raw = _from_base64(data, field, limits)
    else:
        raise ApiError(field, "an image must be base64 text or bytes", code="invalid_image")
    if not raw:
        raise ApiError(field, "empty: no image sent", code="invalid_image")
    _check_bytes(len(raw), field, limits)
    return raw


def _from_base64(text: str, field: str, limits: Limits) -> bytes:
    text = text.strip()
    if text.lower().startswith(("http://", "https://")):
        raise ApiError(field, "URLs are not fetched; send the image itself, base64-encoded",
                       code="invalid_image")
    prefix = _DATA_URL.match(text)
    if prefix:
        if "base64" not in (prefix.group(1) or "").lower():
            raise ApiError(field, "a data URL must be base64 (data:image/png;base64,...)",
                           code="invalid_image")
        text = text[prefix.end():]
    text = "".join(text.split())  # line breaks, as base64.encodebytes writes them
    _check_bytes(len(text) * 3 // 4 - 2, field, limits)  # before decoding: 4 characters, 3 bytes
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(field, "not valid base64 (nor a data:image/...;base64, URL)",
                       code="invalid_image") from None


def _check_bytes(count: int, field: str, limits: Limits) -> None:
    if count > limits.max_input_bytes:
        raise ApiError(field, f"{count} bytes; this server takes images of at most "
                       f"{limits.max_input_bytes} bytes", status=413, code="too_large")


def _check_pixels(image: Image.Image, field: str, limits: Limits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ApiError(field, f"an image of {width}x{height} pixels", code="invalid_image")
    if width * height > limits.max_input_pixels:
        raise ApiError(field, f"{width}x{height} is {width * height} pixels; this server takes "
                       f"at most {limits.max_input_pixels}", code="too_many_pixels")


def _is_animated(image: Image.Image) -> bool:
    """More than one frame; a camera's MPO JPEG (the photo, then previews) is a still photo."""
    return bool(getattr(image, "is_animated", False)) and image.format != "MPO"


def _upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (a broken EXIF block is ignored)."""
    try:
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - malformed EXIF must not refuse a readable image
        return image


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa") or (
        image.mode in ("P", "L", "RGB") and "transparency" in image.info)
