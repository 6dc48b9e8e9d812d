"""Images callers send: decoded, checked and sized as A1111 does (``deployments.api.image_input``),
on real PNG, JPEG and GIF bytes made here with Pillow."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from deployments.api.errors import ApiError
from deployments.api.image_input import (decode_image, decode_mask, open_image, resize_image,
                                         transparency_mask)
from deployments.settings import Limits

LIMITS = Limits()


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def refusal(data, limits: Limits = LIMITS, field: str = "init_image") -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(data, field, limits)
    assert caught.value.field == field
    return caught.value


def solid(colour, size=(32, 24), mode="RGB") -> Image.Image:
    return Image.new(mode, size, colour)


@pytest.mark.parametrize("format", ["PNG", "JPEG", "GIF", "WEBP", "BMP"])
def test_each_format_decodes_to_rgb_at_its_size(format):
    image = decode_image(encoded(solid((200, 40, 40)), format), "init_image", LIMITS)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert np.abs(np.asarray(image)[12, 16].astype(int) - (200, 40, 40)).max() <= 12


def test_base64_bare_with_a_data_url_with_line_breaks_and_without_padding_all_decode():
    data = encoded(solid((1, 2, 3)))
    text = base64.b64encode(data).decode()
    for sent in (text, f"data:image/png;base64,{text}", base64.encodebytes(data).decode(),
                 text.rstrip("="), f"  {text}\n", data):
        image = decode_image(sent, "image", LIMITS)
        assert image.getpixel((0, 0)) == (1, 2, 3)


def test_transparency_is_composited_over_white_and_kept_when_asked():
    image = solid((255, 0, 0, 255), mode="RGBA")
    image.putpixel((0, 0), (255, 0, 0, 0))
    data = encoded(image)
    flat = decode_image(data, "image", LIMITS)
    assert flat.mode == "RGB" and flat.getpixel((0, 0)) == (255, 255, 255)
    assert flat.getpixel((5, 5)) == (255, 0, 0)
    kept = decode_image(data, "image", LIMITS, keep_alpha=True)
    assert kept.mode == "RGBA" and kept.getpixel((0, 0))[3] == 0
    mask = transparency_mask(kept)
    assert mask.mode == "L" and mask.getpixel((0, 0)) == 255 and mask.getpixel((5, 5)) == 0
    assert transparency_mask(decode_image(encoded(solid((1, 2, 3))), "image", LIMITS,
                                          keep_alpha=True)) is None


def test_exif_orientation_is_applied():
    image = solid((0, 0, 255), size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    assert decode_image(encoded(image, "JPEG", exif=exif), "image", LIMITS).size == (20, 40)


def test_a_mask_is_grey_or_its_alpha_coverage():
    grey = decode_mask(encoded(solid(200, mode="L")), "mask", LIMITS)
    assert grey.mode == "L" and grey.getpixel((0, 0)) == 200
    rgb = decode_mask(encoded(solid((255, 255, 255))), "mask", LIMITS)
    assert rgb.mode == "L" and rgb.getpixel((0, 0)) == 255
    painted = solid((0, 0, 0, 0), mode="RGBA")
    painted.putpixel((1, 1), (0, 0, 0, 200))
    painted.putpixel((2, 2), (0, 0, 0, 100))
    alpha = decode_mask(encoded(painted), "mask", LIMITS)
    assert (alpha.getpixel((1, 1)), alpha.getpixel((2, 2)), alpha.getpixel((0, 0))) == (255, 0, 0)


def test_an_animated_gif_is_refused_and_a_still_one_is_not():
    frames = [solid((255, 0, 0)), solid((0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    error = refusal(buffer.getvalue())
    assert error.status is None and error.code == "animated_image" and "animated" in error.message
    assert decode_image(encoded(frames[0], "GIF"), "init_image", LIMITS).size == (32, 24)
    first = open_image(buffer.getvalue(), "image", LIMITS, allow_animated=True)
    assert first.size == (32, 24)


def test_truncated_bytes_garbage_and_bad_base64_are_refused_naming_the_field():
    data = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)))
    assert refusal(data[: len(data) // 2]).code == "invalid_image"
    assert refusal(b"not an image at all").code == "invalid_image"
    assert refusal("%%% not base64 %%%").code == "invalid_image"
    assert refusal("").code == "invalid_image"
    assert "not fetched" in refusal("https://example.com/cat.png").message
    assert "mode LAB" in refusal(encoded(Image.new("LAB", (8, 8)), "TIFF")).message


def test_too_many_bytes_is_413_before_decoding():
    limits = Limits(max_input_bytes=2048)
    data = encoded(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)))
    assert len(data) > 2048
    for sent in (data, base64.b64encode(data).decode()):
        error = refusal(sent, limits, field="mask")
        assert error.status == 413 and error.code == "too_large" and "2048" in error.message


def test_too_many_pixels_is_refused_from_the_header():
    limits = Limits(max_input_pixels=64 * 64)
    assert decode_image(encoded(solid((0, 0, 0), size=(64, 64))), "image", limits).size == (64, 64)
    error = refusal(encoded(solid((0, 0, 0), size=(65, 64))), limits)
    assert error.code == "too_many_pixels" and "65x64" in error.message
    # a 5000x5000 PNG cut after its header: refused for its size, not for being truncated
    header = encoded(solid((0, 0, 0), size=(5000, 5000)))[:200]
    assert refusal(header).code == "too_many_pixels"


def test_pillows_decompression_bomb_check_becomes_the_same_refusal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert refusal(encoded(solid((0, 0, 0), size=(64, 64)))).code == "too_many_pixels"


def stripes() -> Image.Image:
    """128x64: red, green, green, blue quarters from left to right."""
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:96] = (0, 255, 0)
    pixels[:, 96:] = (0, 0, 255)
    return Image.fromarray(pixels)


def colour(image: Image.Image, xy) -> tuple[int, ...]:
    return tuple(int(round(c / 255)) * 255 for c in image.getpixel(xy))


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("size", [(64, 64), (96, 40), (40, 96)])
def test_every_resize_mode_gives_the_size_asked_for(mode, size):
    assert resize_image(stripes(), *size, mode).size == size


def test_just_resize_stretches_crop_cuts_the_sides_and_fill_stretches_the_edges():
    stretched = resize_image(stripes(), 64, 64, 0)
    assert colour(stretched, (2, 32)) == (255, 0, 0) and colour(stretched, (61, 32)) == (0, 0, 255)
    assert np.array_equal(np.asarray(resize_image(stripes(), 64, 64, 3)), np.asarray(stretched))
    cropped = resize_image(stripes(), 64, 64, 1)  # scaled to 128x64, its centre 64 columns kept
    assert colour(cropped, (2, 32)) == (0, 255, 0) and colour(cropped, (61, 32)) == (0, 255, 0)
    filled = resize_image(stripes(), 64, 64, 2)  # scaled to 64x32 at y 16..48, bands above and below
    assert colour(filled, (2, 32)) == (255, 0, 0) and colour(filled, (61, 32)) == (0, 0, 255)
    for y in (0, 8, 55, 63):  # the bands: the edge rows stretched, so the same stripes
        assert colour(filled, (2, y)) == (255, 0, 0) and colour(filled, (32, y)) == (0, 255, 0)


def test_fill_leaves_no_line_unpainted_and_keeps_a_masks_mode():
    filled = np.asarray(resize_image(solid((9, 200, 9), size=(64, 32)), 64, 65, 2))  # A1111: row 64 black
    assert (filled[:, :, 1] > 150).all()
    mask = resize_image(solid(255, size=(64, 32), mode="L"), 64, 64, 1)
    assert mask.mode == "L"
    with pytest.raises(ValueError):
        resize_image(stripes(), 64, 64, 4)
