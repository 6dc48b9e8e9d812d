"""Image to image over HTTP, through every dialect: native (JSON and streamed), A1111's
img2img and hires fix, OpenAI's edits and variations through the ``openai`` package. What the
pictures look like is judged by the built-in world's classifier."""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from tests.integration.conftest import png_pixels
from tools.tiny_shapes.world import Scene, classify, draw

RED_CIRCLE = draw(Scene("red", "circle", "blue"), np.random.default_rng(0))
YELLOW = "a yellow circle on a blue background"


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def centre_mask(size: int = 64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (16, 16, 48, 48))
    return mask


def colours(png: bytes) -> tuple[str, str]:
    return classify(Image.open(io.BytesIO(png)))


def test_native_img2img_redraws_in_the_prompts_colour_and_keeps_the_size(service):
    response = service.generate(prompt=YELLOW, seed=3, init_image=b64png(RED_CIRCLE),
                                strength=0.75)
    assert response.status_code == 200, response.text
    assert colours(response.content) == ("yellow", "blue")
    assert png_pixels(response.content).shape == (64, 64, 3)  # the init image's size
    assert int(response.headers["x-raydiance-steps-computed"]) + \
        int(response.headers["x-raydiance-steps-cached"]) == int(20 * 0.75)


def test_native_img2img_same_seed_same_bytes(service):
    body = {"prompt": YELLOW, "seed": 5, "init_image": b64png(RED_CIRCLE), "strength": 0.6}
    assert service.generate(**body).content == service.generate(**body).content


def test_native_strength_zero_returns_the_input_through_the_vae(service):
    response = service.generate(prompt=YELLOW, seed=1, init_image=b64png(RED_CIRCLE), strength=0)
    assert response.status_code == 200, response.text
    difference = np.abs(png_pixels(response.content).astype(int) - np.asarray(RED_CIRCLE))
    assert difference.mean() < 8
    assert colours(response.content) == ("red", "blue")


def test_native_inpainting_changes_the_centre_and_keeps_the_border(service):
    response = service.generate(prompt="a green circle on a blue background", seed=2,
                                init_image=b64png(RED_CIRCLE), mask=b64png(centre_mask()),
                                mask_blur=0, strength=1.0)
    assert response.status_code == 200, response.text
    assert colours(response.content)[0] == "green"
    border = np.asarray(centre_mask()) == 0
    difference = np.abs(png_pixels(response.content).astype(int) - np.asarray(RED_CIRCLE))
    assert difference[border].max() <= 2


def test_the_stream_takes_an_init_image(service):
    body = {"prompt": YELLOW, "seed": 3, "init_image": b64png(RED_CIRCLE), "strength": 0.5,
            "steps": 10}
    with service.client.stream("POST", "/v1/generate/stream", json=body) as response:
        events = [line for line in response.iter_lines() if line.startswith("event:")]
    assert events.count("event: step") == 5 and events[-1] == "event: image"


@pytest.mark.parametrize("body,field", [
    ({"init_image": "not base64!"}, "init_image"),
    ({"init_image": base64.b64encode(b"GIF89a nonsense").decode()}, "init_image"),
    ({"mask": "AAAA"}, "mask"),  # a mask without an image
    ({"init_image": b64png(RED_CIRCLE), "strength": 1.5}, "strength"),
])
def test_bad_init_images_are_refused_naming_the_field(service, body, field):
    response = service.generate(prompt=YELLOW, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == field


def test_a1111_img2img_with_include_init_images(service):
    response = service.client.post("/sdapi/v1/img2img", json={
        "prompt": YELLOW, "init_images": [b64png(RED_CIRCLE)], "denoising_strength": 0.75,
        "seed": 4, "steps": 20, "width": 64, "height": 64, "include_init_images": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert len(answer["images"]) == 2  # the result, then the init image
    assert colours(base64.b64decode(answer["images"][0])) == ("yellow", "blue")
    assert answer["parameters"]["denoising_strength"] == 0.75
    assert json.loads(answer["info"])["denoising_strength"] == 0.75


def test_a1111_inpainting_and_its_mask_field(service):
    response = service.client.post("/sdapi/v1/img2img", json={
        "prompt": "a green circle on a blue background", "init_images": [b64png(RED_CIRCLE)],
        "mask": b64png(centre_mask()), "mask_blur": 0, "inpainting_fill": 1,
        "denoising_strength": 1.0, "seed": 2, "steps": 20, "width": 64, "height": 64})
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    assert colours(base64.b64decode(image))[0] == "green"
    assert response.json()["parameters"]["mask"] is None  # not echoed back


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_a1111_hires_fix_64_to_128(service, upscaler):
    response = service.client.post("/sdapi/v1/txt2img", json={
        "prompt": "a purple square on a white background", "seed": 6, "steps": 12,
        "width": 64, "height": 64, "enable_hr": True, "hr_scale": 2, "hr_upscaler": upscaler,
        "denoising_strength": 0.6})
    assert response.status_code == 200, response.text
    (image,) = response.json()["images"]
    png = base64.b64decode(image)
    assert png_pixels(png).shape == (128, 128, 3)
    assert colours(png) == ("purple", "white")


def test_a1111_hires_fix_beyond_the_limits_names_the_field(service):
    response = service.client.post("/sdapi/v1/txt2img", json={
        "prompt": YELLOW, "width": 256, "height": 256, "enable_hr": True, "hr_scale": 2})
    assert response.status_code == 422 and response.json()["error"]["param"] == "hr_scale"


def test_openai_edit_and_variation_through_the_openai_package(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    edited = client.images.edit(image=("red.png", b64decode_png(RED_CIRCLE), "image/png"),
                                prompt=YELLOW, n=2, size="64x64",
                                extra_body={"seed": 3})
    assert len(edited.data) == 2
    assert all(colours(base64.b64decode(d.b64_json)) == ("yellow", "blue") for d in edited.data)
    varied = client.images.create_variation(image=("red.png", b64decode_png(RED_CIRCLE),
                                                   "image/png"), n=1, size="64x64")
    assert png_pixels(base64.b64decode(varied.data[0].b64_json)).shape == (64, 64, 3)


def test_openai_edit_with_a_transparent_mask_keeps_the_opaque_part(service):
    mask = RED_CIRCLE.convert("RGBA")
    mask.putalpha(Image.eval(centre_mask(), lambda value: 255 - value))  # centre transparent
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    edited = client.images.edit(image=("red.png", b64decode_png(RED_CIRCLE), "image/png"),
                                mask=("mask.png", b64decode_png(mask), "image/png"),
                                prompt="a green circle on a blue background", size="64x64",
                                extra_body={"seed": 2})
    png = base64.b64decode(edited.data[0].b64_json)
    border = np.asarray(centre_mask()) == 0
    assert np.abs(png_pixels(png).astype(int) - np.asarray(RED_CIRCLE))[border].max() <= 2
    assert colours(png)[0] == "green"


def test_openai_edit_without_an_image_is_a_400_naming_it(service):
    response = service.client.post("/v1/images/edits", data={"prompt": YELLOW})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"


def b64decode_png(image: Image.Image) -> bytes:
    return base64.b64decode(b64png(image))


def test_webuiapi_img2img_and_inpainting(service):
    url = httpx.URL(service.url)
    api = webuiapi.WebUIApi(host=url.host, port=url.port)
    result = api.img2img(images=[RED_CIRCLE], prompt=YELLOW, denoising_strength=0.75, seed=3,
                         steps=20, width=64, height=64, cfg_scale=5)
    assert classify(result.image) == ("yellow", "blue")
    inpainted = api.img2img(images=[RED_CIRCLE], mask_image=centre_mask(), mask_blur=0,
                            inpainting_fill=1, prompt="a green circle on a blue background",
                            denoising_strength=1.0, seed=2, steps=20, width=64, height=64,
                            cfg_scale=5)
    assert classify(inpainted.image)[0] == "green"
    border = np.asarray(centre_mask()) == 0
    pixels = np.asarray(inpainted.image.convert("RGB")).astype(int)
    assert np.abs(pixels - np.asarray(RED_CIRCLE))[border].max() <= 2


def test_img2img_alone_or_amid_txt2img_requests_draws_the_same(service):
    image = {"prompt": YELLOW, "seed": 9, "init_image": b64png(RED_CIRCLE), "strength": 0.6,
             "steps": 20}
    alone = service.generate(**image)
    others = [{"prompt": "a green square on a white background", "seed": 40 + i, "steps": 20}
              for i in range(5)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda body: service.generate(**body), [image, *others]))
    assert all(response.status_code == 200 for response in together)
    difference = np.abs(png_pixels(together[0].content).astype(int)
                        - png_pixels(alone.content).astype(int))
    assert difference.max() <= 1  # batched GEMMs may round the last bit apart
