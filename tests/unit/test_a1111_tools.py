"""The rest of the A1111 surface (``deployments.api.a1111_tools``) in-process: infotext read back
as A1111 parses it, upscaling as its extras tab does, and every route's status and shape."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.api.a1111_tools import ExtrasSingleImageRequest, upscale
from deployments.api.errors import ApiError
from deployments.api.generation import ServedModels
from deployments.api.infotext import parse_infotext, quote, unquote
from deployments.api.ingress import IngressSettings, build_api
from deployments.settings import Limits, StageSettings
from pipeline.images import encode_png
from tools.tiny_shapes import MODEL_DIR

INFOTEXT = ("a red circle\non a blue background\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M "
            "Karras, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny-shapes, Note: \"a, b: c\"")


def b64_png(image: Image.Image, parameters: str | None = None) -> str:
    return base64.b64encode(encode_png(image, parameters)).decode()


def answer_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_infotext_is_parsed_as_a1111_parses_it():
    parsed = parse_infotext(INFOTEXT)
    assert parsed["Prompt"] == "a red circle\non a blue background"
    assert parsed["Negative prompt"] == "blurry"
    assert (parsed["Steps"], parsed["Sampler"], parsed["CFG scale"], parsed["Seed"]) == (
        "3", "DPM++ 2M Karras", "7.5", "42")
    assert (parsed["Size-1"], parsed["Size-2"], parsed["Model"]) == ("64", "48", "tiny-shapes")
    assert parsed["Note"] == "a, b: c" and parsed["Clip skip"] == "1"
    assert parse_infotext("just a prompt")["Prompt"] == "just a prompt"
    assert parse_infotext("")["Prompt"] == ""
    assert unquote(quote("x, y")) == "x, y" and quote("plain") == "plain"


def test_lanczos_doubles_and_keeps_the_images_parameters():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    body = ExtrasSingleImageRequest(image=b64_png(image, INFOTEXT), upscaler_1="Lanczos")
    result = upscale(body, Limits())
    out = answer_image(result.image)
    assert out.size == (128, 128) and out.mode == "RGB"
    expected = image.resize((128, 128), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(expected))
    assert out.info["parameters"] == INFOTEXT
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert result.html_info == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"


def test_upscale_to_a_size_crops_and_rounds_as_a1111():
    image = Image.new("RGB", (64, 32), (0, 200, 0))
    body = ExtrasSingleImageRequest(image=b64_png(image), resize_mode=1, upscaling_resize_w=100,
                                    upscaling_resize_h=100, upscaler_1="nearest")
    assert answer_image(upscale(body, Limits()).image).size == (100, 100)
    uncropped = body.model_copy(update={"upscaling_crop": False})  # scale 100/32, sides floor to 8s
    assert answer_image(upscale(uncropped, Limits()).image).size == (200, 96)
    unchanged = upscale(ExtrasSingleImageRequest(image=b64_png(image)), Limits())  # upscaler None
    assert answer_image(unchanged.image).size == (64, 32) and unchanged.html_info == "<p></p>"


@pytest.mark.parametrize("update,field", [
    ({"upscaling_resize": 8.0}, "upscaling_resize"),
    ({"resize_mode": 1, "upscaling_resize_w": 4096, "upscaling_resize_h": 4096}, "upscaling_resize_w"),
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1"),
    ({"image": "bm90IGFuIGltYWdl"}, "image"),
])
def test_upscale_refusals_name_the_field(update, field):
    body = ExtrasSingleImageRequest(image=b64_png(Image.new("RGB", (512, 512))), upscaler_1="Lanczos")
    with pytest.raises(ApiError) as caught:
        upscale(body.model_copy(update=update), Limits())
    assert caught.value.field == field


@pytest.fixture(scope="module")
def client() -> TestClient:
    stage = StageSettings(model_paths={"tiny-shapes": str(MODEL_DIR)}, default_model="tiny-shapes",
                          accelerator="cpu")
    models = ServedModels(stage.catalog(), "tiny-shapes", Limits(), None)
    return TestClient(build_api(None, models, IngressSettings(stage=stage, limits=Limits())))


@pytest.mark.parametrize("path,expected", [
    ("scripts", {"txt2img": [], "img2img": []}), ("script-info", []), ("prompt-styles", []),
    ("embeddings", {"loaded": {}, "skipped": {}}), ("face-restorers", []),
    ("realesrgan-models", []), ("hypernetworks", []),
])
def test_the_empty_lists_have_a1111s_shapes(client, path, expected):
    assert client.get(f"/sdapi/v1/{path}").json() == expected


def test_the_read_routes(client):
    upscalers = client.get("/sdapi/v1/upscalers").json()
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest"]
    assert set(upscalers[0]) == {"name", "model_name", "model_path", "model_url", "scale"}
    modes = [m["name"] for m in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes and len(modes) == 6
    memory = client.get("/sdapi/v1/memory").json()
    assert memory["ram"]["used"] > 0 and memory["ram"]["total"] >= memory["ram"]["used"]
    assert "error" in memory["cuda"] or "system" in memory["cuda"]
    assert client.get("/sdapi/v1/cmd-flags").json()["api"] is True
    for path in ("refresh-checkpoints", "refresh-loras"):
        response = client.post(f"/sdapi/v1/{path}")
        assert response.status_code == 200 and response.json() is None


def test_png_info_and_extras_over_http(client):
    image = b64_png(Image.new("RGB", (64, 48)), INFOTEXT)
    info = client.post("/sdapi/v1/png-info", json={"image": f"data:image/png;base64,{image}"}).json()
    assert info["info"] == INFOTEXT and info["items"] == {} and info["parameters"]["Seed"] == "42"
    extras = client.post("/sdapi/v1/extra-single-image", json={
        "image": image, "upscaler_1": "Lanczos", "upscaling_resize": 2, "gfpgan_visibility": 0.5,
        "codeformer_visibility": 0, "upscale_first": False})
    assert extras.status_code == 200 and answer_image(extras.json()["image"]).size == (128, 96)
    refused = client.post("/sdapi/v1/png-info", json={"image": "garbage!"})
    assert refused.status_code == 422 and refused.json()["error"]["param"] == "image"


def test_a_crop_to_fit_cannot_hide_a_huge_upscale():
    """1x64 to 64x64, cropped: the image upscaled on the way is 64x4096, over a 64x64 limit."""
    body = ExtrasSingleImageRequest(image=b64_png(Image.new("RGB", (1, 64))), resize_mode=1,
                                    upscaling_resize_w=64, upscaling_resize_h=64, upscaler_1="Lanczos")
    with pytest.raises(ApiError, match="64x4096"):
        upscale(body, Limits(max_input_pixels=64 * 64))
