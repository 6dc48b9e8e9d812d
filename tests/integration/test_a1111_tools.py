"""The rest of the A1111 surface against the running app: the lists clients read when they
connect, png-info on an image the app just drew, extra-single-image, the webuiapi client, and
OpenAI's model names (Open WebUI with no image model chosen sends ``dall-e-2``)."""
from __future__ import annotations

import base64
import io
import json
from urllib.parse import urlparse

import openai
import pytest
import webuiapi
from PIL import Image

from tests.integration.conftest import png_pixels

PROMPT = "a blue square on a yellow background"


def txt2img(service, **body) -> dict:
    response = service.client.post("/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "steps": 3, "width": 64, "height": 64, **body})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("path,expected", [
    ("scripts", {"txt2img": [], "img2img": []}), ("script-info", []), ("prompt-styles", []),
    ("face-restorers", []),
    ("realesrgan-models", []), ("hypernetworks", []),
])
def test_lists_of_what_is_not_served_are_empty_in_a1111s_shape(service, path, expected):
    response = service.client.get(f"/sdapi/v1/{path}")
    assert response.status_code == 200 and response.json() == expected


def test_read_routes_and_refreshes(service):
    http = service.client
    upscalers = http.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert all(set(u) == {"name", "model_name", "model_path", "model_url", "scale"} for u in upscalers)
    assert [m["name"] for m in http.get("/sdapi/v1/latent-upscale-modes").json()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
        "Latent (nearest)", "Latent (nearest-exact)"]
    memory = http.get("/sdapi/v1/memory").json()
    assert memory["ram"]["used"] > 0 and "error" in memory["cuda"]  # the Ingress has no GPU
    flags = http.get("/sdapi/v1/cmd-flags").json()
    assert flags["api"] is True and flags["ckpt_dir"] == str(service.checkpoints_dir)
    for path in ("refresh-checkpoints", "refresh-loras"):
        response = http.post(f"/sdapi/v1/{path}")
        assert response.status_code == 200 and response.json() is None


def test_png_info_reads_back_what_txt2img_drew(service):
    result = txt2img(service, seed=1234, sampler_name="DPM++ 2M", negative_prompt="blurry")
    response = service.client.post("/sdapi/v1/png-info", json={"image": result["images"][0]})
    assert response.status_code == 200, response.text
    read = response.json()
    assert read["info"] == json.loads(result["info"])["infotexts"][0]
    parameters = read["parameters"]
    assert int(parameters["Seed"]) == 1234 and parameters["Steps"] == "3"
    assert parameters["Sampler"] == "DPM++ 2M" and parameters["Model"] == "tiny-shapes"
    assert (parameters["Size-1"], parameters["Size-2"]) == ("64", "64")
    assert parameters["Prompt"] == PROMPT and parameters["Negative prompt"] == "blurry"


def test_extra_single_image_doubles_with_lanczos(service):
    image = txt2img(service, seed=5)["images"][0]
    response = service.client.post("/sdapi/v1/extra-single-image", json={
        "image": f"data:image/png;base64,{image}", "upscaler_1": "Lanczos", "upscaling_resize": 2,
        "gfpgan_visibility": 0, "codeformer_visibility": 0, "codeformer_weight": 0})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert png_pixels(base64.b64decode(answer["image"])).shape == (128, 128, 3)
    assert "Lanczos" in answer["html_info"]
    too_big = service.client.post("/sdapi/v1/extra-single-image", json={
        "image": image, "upscaler_1": "Lanczos", "resize_mode": 1,
        "upscaling_resize_w": 8192, "upscaling_resize_h": 8192})
    assert too_big.status_code == 422 and too_big.json()["error"]["param"] == "upscaling_resize_w"


def test_openai_client_with_openais_model_name_generates(service):
    client = openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)
    result = client.images.generate(model="dall-e-2", prompt=PROMPT, size="64x64",
                                    response_format="b64_json", extra_body={"steps": 3})
    assert png_pixels(base64.b64decode(result.data[0].b64_json)).shape == (64, 64, 3)
    models = {m["id"]: m for m in service.client.get("/v1/models").json()["data"]}
    assert {models[name]["alias_of"] for name in ("dall-e-2", "dall-e-3", "gpt-image-1")} == {
        "tiny-shapes"}


def test_the_webuiapi_client(service):
    url = urlparse(service.url)
    api = webuiapi.WebUIApi(host=url.hostname, port=url.port)  # reads /sdapi/v1/scripts
    assert not api.has_controlnet
    result = api.txt2img(prompt=PROMPT, width=64, height=64, steps=3, seed=77,
                         sampler_name="Euler", cfg_scale=5)
    assert result.image.size == (64, 64) and result.info["seed"] == 77
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert api.get_latent_upscale_modes()[0] == {"name": "Latent"}
    info = api.png_info(result.image)
    assert int(info.parameters["Seed"]) == 77 and "Seed: 77" in info.info
    upscaled = api.extra_single_image(result.image, upscaler_1="Lanczos",
                                      upscaling_resize=2)
    assert upscaled.image.size == (128, 128) and "Lanczos" in upscaled.info
    assert api.refresh_checkpoints() is None
    embeddings = api.get_embeddings()  # the app's embeddings_dir (tests/integration/conftest.py)
    assert set(embeddings["loaded"]) == {"swapstyle", "tinystyle", "xlstyle"}
    assert set(embeddings["skipped"]) == {"evil"}
    assert set(api.get_memory()) == {"ram", "cuda"}
    assert isinstance(Image.open(io.BytesIO(base64.b64decode(upscaled.json["image"]))), Image.Image)
