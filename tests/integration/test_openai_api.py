"""The OpenAI Images API, driven by the official ``openai`` client."""
from __future__ import annotations

import base64

import openai
import pytest

from tests.integration.conftest import png_pixels


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_images_generate_returns_pngs_of_the_requested_size(client):
    result = client.images.generate(model="tiny-shapes", prompt="a yellow triangle on a black background",
                                    n=2, size="64x64", response_format="b64_json")
    assert len(result.data) == 2
    images = [base64.b64decode(item.b64_json) for item in result.data]
    for image in images:
        assert image.startswith(b"\x89PNG")
        assert png_pixels(image).shape == (64, 64, 3)
    assert images[0] != images[1]  # n images get n seeds


def test_defaults_model_size_and_format(client):
    result = client.images.generate(prompt="a white circle on a purple background", size="128x64",
                                    extra_body={"steps": 4})
    (item,) = result.data
    assert png_pixels(base64.b64decode(item.b64_json)).shape == (64, 128, 3)


@pytest.mark.parametrize("kwargs,error,field", [
    ({"response_format": "gif_link"}, openai.BadRequestError, "response_format"),
    ({"n": 9}, openai.BadRequestError, "n"),
    ({"n": 0}, openai.BadRequestError, "n"),
    ({"size": "65x64"}, openai.BadRequestError, "size"),
    ({"size": "huge"}, openai.BadRequestError, "size"),
    ({"size": "1024x1024"}, openai.BadRequestError, "size"),
    ({"model": "no-such-model"}, openai.NotFoundError, "model"),
])
def test_bad_requests_raise_the_clients_errors_naming_the_field(client, kwargs, error, field):
    with pytest.raises(error) as raised:
        client.images.generate(prompt="a red square on a green background", **kwargs)
    assert raised.value.body["param"] == field
    assert raised.value.body["message"].startswith(f"{field}:")
    # and the service keeps serving
    ok = client.images.generate(prompt="a red square on a green background", size="64x64",
                                extra_body={"steps": 2})
    assert len(ok.data) == 1
