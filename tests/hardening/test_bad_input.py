"""A battery of bad requests over every dialect, against the real app: each gets its status and a
JSON error naming its field, none reaches a stage, and the service goes on serving.

Bodies are sent as the JSON text ``json.dumps`` writes (ASCII, so a lone surrogate travels as the
escape ``\\ud800``, as a client would send it); a ``str`` or ``bytes`` body is sent as it is.
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

GOOD = {"prompt": "a green square on a white background", "steps": 2, "seed": 1}  # every dialect's
LONE = "a red \ud800 circle"
NUL = "a red \x00 circle"
LONG = "a " * 151  # 302 characters: the test limit is 300
TOO_DEEP = '{"prompt": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"  # beyond json's recursion
HUGE_INT = '{"prompt": "x", "steps": 1' + "0" * 5000 + "}"  # beyond Python's 4300 int digits


def _deep(levels: int) -> Any:
    nested: Any = "bottom"
    for _ in range(levels):
        nested = {"a": nested}
    return nested


def _with(base: dict, **fields: Any) -> dict:
    return {**base, **fields}


NATIVE_CASES = [
    # (body, status, field)
    (_with(GOOD, prompt=LONE), 422, "prompt"),
    (_with(GOOD, prompt=NUL), 422, "prompt"),
    (_with(GOOD, negative_prompt=LONE), 422, "negative_prompt"),
    (_with(GOOD, model="tiny\udfff"), 422, "model"),
    (_with(GOOD, sampler="Euler\ud800"), 422, "sampler"),
    (_with(GOOD, loras=[{"name": "a_kohya\ud83d"}]), 422, "loras.0.name"),
    (_with(GOOD, loras=[{"name": "a_\x00kohya"}]), 422, "loras.0.name"),
    (_with(GOOD, guidance_scale=1e9), 422, "guidance_scale"),
    (_with(GOOD, guidance_scale=30.5), 422, "guidance_scale"),
    (_with(GOOD, guidance_scale="NaN"), 422, "guidance_scale"),
    (_with(GOOD, guidance_scale="inf"), 422, "guidance_scale"),
    (_with(GOOD, guidance_scale="-Infinity"), 422, "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": -Infinity}', 422, "guidance_scale"),
    (_with(GOOD, seed="inf"), 422, "seed"),
    (_with(GOOD, seed=1.5), 422, "seed"),
    (_with(GOOD, steps="NaN"), 422, "steps"),
    (_with(GOOD, steps=10**6), 422, "steps"),
    (_with(GOOD, width=0), 422, "width"),
    (_with(GOOD, height=-8), 422, "height"),
    (_with(GOOD, width="64px"), 422, "width"),
    (_with(GOOD, prompt=42), 422, "prompt"),
    (_with(GOOD, prompt=["a", "b"]), 422, "prompt"),
    (_with(GOOD, loras="a_kohya"), 422, "loras"),
    (_with(GOOD, loras=[{"name": "a_kohya", "weight": 1e30}]), 422, "loras.0.weight"),
    (_with(GOOD, loras=[{"name": "a_kohya", "weight": "NaN"}]), 422, "loras.0.weight"),
    (_with(GOOD, loras=[{"name": "a_kohya", "weight": -10.5}]), 422, "loras.0.weight"),
    (_with(GOOD, loras=[{"name": "nope"}]), 404, "loras"),
    (_with(GOOD, loras=[{"name": "../a_kohya"}]), 422, "loras"),
    (_with(GOOD, loras=[{"name": f"l{i}"} for i in range(9)]), 422, "loras"),
    (_with(GOOD, model="sd-9000"), 404, "model"),
    (_with(GOOD, model="m" * 201), 422, "model"),
    (_with(GOOD, prompt=LONG), 413, "prompt"),
    (_with(GOOD, extra=_deep(300)), 422, "extra"),
    (_with(GOOD, cache=_deep(300)), 422, "cache.a"),
    (_with(GOOD, cache={"threshold": "NaN"}), 422, "cache.threshold"),
    ("[]", 422, "body"),
    ('"a red circle"', 422, "body"),
    (TOO_DEEP, 400, "body"),
    (HUGE_INT, 400, "body"),
]

STREAM_CASES = [
    (_with(GOOD, prompt=LONE), 422, "prompt"),
    (_with(GOOD, guidance_scale=1e9), 422, "guidance_scale"),
    (_with(GOOD, model="sd-9000"), 404, "model"),
    (_with(GOOD, loras=[{"name": "a_kohya", "weight": 1e30}]), 422, "loras.0.weight"),
    (_with(GOOD, prompt=LONG), 413, "prompt"),
]

OPENAI_CASES = [
    (_with(GOOD, size="0x0"), 400, "size"),
    (_with(GOOD, size="0x64"), 400, "size"),
    (_with(GOOD, size="64x0"), 400, "size"),
    (_with(GOOD, size="-64x64"), 400, "size"),
    (_with(GOOD, size="64x60"), 400, "size"),
    (_with(GOOD, size="99999x64"), 400, "size"),
    (_with(GOOD, size="1e3x64"), 400, "size"),
    (_with(GOOD, size="512x512"), 400, "size"),  # above the test limit of 256
    (_with(GOOD, size=64), 400, "size"),
    (_with(GOOD, prompt=""), 400, "prompt"),
    (_with(GOOD, prompt=LONE), 400, "prompt"),
    (_with(GOOD, prompt=NUL), 400, "prompt"),
    (_with(GOOD, prompt=LONG), 413, "prompt"),
    (_with(GOOD, negative_prompt=LONE), 400, "negative_prompt"),
    (_with(GOOD, n=0), 400, "n"),
    (_with(GOOD, n=5), 400, "n"),
    (_with(GOOD, n=10**9), 400, "n"),
    (_with(GOOD, n="NaN"), 400, "n"),
    (_with(GOOD, steps="inf"), 400, "steps"),
    (_with(GOOD, seed=-2), 400, "seed"),
    (_with(GOOD, model="dall-e-9"), 404, "model"),
    (_with(GOOD, model="dall-e\ud800"), 400, "model"),
    (_with(GOOD, loras=[{"name": "a_kohya", "weight": 1e30}]), 400, "loras.0.weight"),
    (_with(GOOD, response_format="file"), 400, "response_format"),
    (_with(GOOD, stream=True), 400, "stream"),
    (b'{"prompt": "a red \xff circle"}', 400, "body"),  # not UTF-8
]

A1111_CASES = [
    (_with(GOOD, prompt=LONE), 422, "prompt"),
    (_with(GOOD, prompt=NUL), 422, "prompt"),
    (_with(GOOD, negative_prompt=LONE), 422, "negative_prompt"),
    (_with(GOOD, cfg_scale=1e9), 422, "cfg_scale"),
    (_with(GOOD, cfg_scale="NaN"), 422, "cfg_scale"),
    (_with(GOOD, cfg_scale="Infinity"), 422, "cfg_scale"),
    (_with(GOOD, cfg_scale=31), 422, "cfg_scale"),
    (_with(GOOD, prompt="a cat <lora:a_kohya:1e30>"), 422, "prompt"),
    (_with(GOOD, prompt="a cat <lora:a_kohya:11>"), 422, "prompt"),
    (_with(GOOD, prompt="a cat <lora:a_kohya:-inf>"), 422, "prompt"),
    (_with(GOOD, prompt="a cat <lora:a_kohya:nan>"), 422, "prompt"),
    (_with(GOOD, prompt="a cat <lora:nope:1>"), 404, "prompt"),
    (_with(GOOD, width=0), 422, "width"),
    (_with(GOOD, height=0), 422, "height"),
    (_with(GOOD, batch_size=5), 422, "batch_size"),
    (_with(GOOD, batch_size=2, n_iter=3), 422, "batch_size"),  # the product: A1111's batch
    (_with(GOOD, n_iter=0), 422, "n_iter"),
    (_with(GOOD, seed=2**32), 422, "seed"),
    (_with(GOOD, steps=0), 422, "steps"),
    (_with(GOOD, sampler_name="Euler\ud800"), 422, "sampler_name"),
    (_with(GOOD, sampler_name="Heun++"), 422, "sampler_name"),
    (_with(GOOD, scheduler="no-such-schedule"), 422, "scheduler"),
    (_with(GOOD, override_settings={"sd_model_checkpoint": ["tiny-shapes"]}), 422,
     "override_settings.sd_model_checkpoint"),
    (_with(GOOD, override_settings={"sd_model_checkpoint": {"name": "tiny-shapes"}}), 422,
     "override_settings.sd_model_checkpoint"),
    (_with(GOOD, override_settings={"sd_model_checkpoint": 5}), 422,
     "override_settings.sd_model_checkpoint"),
    (_with(GOOD, override_settings={"sd_model_checkpoint": "tiny\ud800"}), 422,
     "override_settings.sd_model_checkpoint"),
    (_with(GOOD, override_settings={"sd_model_checkpoint": "sd-9000"}), 404,
     "override_settings.sd_model_checkpoint"),
    (_with(GOOD, override_settings=["tiny-shapes"]), 422, "override_settings"),
    (_with(GOOD, override_settings={"cache": {"threshold": -1}}), 422,
     "override_settings.cache.threshold"),
    (_with(GOOD, cache={"threshold": 0}, override_settings={"cache": {"threshold": 0}}), 422, "cache"),
    (_with(GOOD, seed=1e400), 422, "seed"),
    (TOO_DEEP, 400, "body"),
    (_with(GOOD, prompt=LONG), 413, "prompt"),
]

OPTIONS_CASES = [
    ({"sd_model_checkpoint": ["tiny-shapes"]}, 422, "sd_model_checkpoint"),
    ({"sd_model_checkpoint": {"title": "tiny-shapes"}}, 422, "sd_model_checkpoint"),
    ({"sd_model_checkpoint": 7}, 422, "sd_model_checkpoint"),
    ({"sd_model_checkpoint": "tiny-shapes\ud800"}, 422, "sd_model_checkpoint"),
    ({"sd_model_checkpoint": "tiny\x00shapes"}, 422, "sd_model_checkpoint"),
    ({"sd_model_checkpoint": "sd-9000"}, 404, "sd_model_checkpoint"),
    ('["sd_model_checkpoint"]', 422, "body"),
]

CASES = ([("/v1/generate", *case) for case in NATIVE_CASES]
         + [("/v1/generate/stream", *case) for case in STREAM_CASES]
         + [("/v1/images/generations", *case) for case in OPENAI_CASES]
         + [("/sdapi/v1/txt2img", *case) for case in A1111_CASES]
         + [("/sdapi/v1/options", *case) for case in OPTIONS_CASES])


def _post(service, path: str, body: dict | str | bytes):
    content = json.dumps(body) if isinstance(body, dict) else body
    return service.post(path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path,body,status,field", CASES,
                         ids=[f"{path}:{field}:{i}" for i, (path, _, _, field) in enumerate(CASES)])
def test_bad_request_is_refused_naming_its_field(service, path, body, status, field):
    response = _post(service, path, body)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    payload = response.json()
    assert payload["error"]["param"] == field, payload
    assert payload["error"]["message"].startswith(f"{field}:")
    assert payload["error"]["type"] == "invalid_request_error"
    assert payload["detail"] == payload["error"]["message"]


def test_the_battery_is_at_least_sixty_requests():
    assert len(CASES) >= 60


def test_unknown_a1111_fields_are_ignored_and_not_echoed(service):
    """Fields A1111 has and Raydiance does not, however deep or strange, are dropped while
    parsing: the answer's ``parameters`` echo the known fields only, so nothing a client adds can
    fail the answer after its image was computed."""
    body = _with(GOOD, alwayson_scripts=_deep(300), styles=[LONE], comment=NUL,
                 override_settings={"sd_model_checkpoint": "tiny-shapes", "sd_vae": _deep(50)})
    response = _post(service, "/sdapi/v1/txt2img", body)
    assert response.status_code == 200, response.text
    parameters = response.json()["parameters"]
    assert {"alwayson_scripts", "styles", "comment"}.isdisjoint(parameters)
    assert parameters["override_settings"] == {"sd_model_checkpoint": "tiny-shapes",
                                              "CLIP_stop_at_last_layers": None, "cache": None}


def test_the_service_still_serves_every_dialect(service):
    """After the battery: a good request in each dialect gets its image."""
    native = service.post("/v1/generate", json=GOOD)
    assert native.status_code == 200 and native.headers["content-type"] == "image/png"
    openai = service.post("/v1/images/generations", json=_with(GOOD, size="64x64"))
    assert openai.status_code == 200, openai.text
    a1111 = service.post("/sdapi/v1/txt2img", json=GOOD)
    assert a1111.status_code == 200, a1111.text
    for encoded in (openai.json()["data"][0]["b64_json"], a1111.json()["images"][0]):
        assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (64, 64)
    assert service.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-shapes"
