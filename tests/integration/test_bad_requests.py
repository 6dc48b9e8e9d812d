"""Bad requests of every kind: 4xx with a JSON message naming the field, and the service goes on."""
from __future__ import annotations

import json

import pytest

GOOD = {"prompt": "a green square on a white background", "steps": 2, "seed": 1}

CASES = [
    # (body or raw text, status, field)
    ({**GOOD, "width": 65}, 422, "width"),
    ({**GOOD, "height": 4}, 422, "height"),
    ({**GOOD, "width": 512}, 422, "width"),  # above the test limit of 256
    ({**GOOD, "height": 1024}, 422, "height"),
    ({**GOOD, "steps": 0}, 422, "steps"),
    ({**GOOD, "steps": 51}, 422, "steps"),
    ({**GOOD, "steps": "many"}, 422, "steps"),
    ('{"prompt": "x", "guidance_scale": NaN}', 422, "guidance_scale"),
    ('{"prompt": "x", "guidance_scale": 1e999}', 422, "guidance_scale"),
    ({**GOOD, "guidance_scale": -1}, 422, "guidance_scale"),
    ({**GOOD, "prompt": "a " * 200}, 413, "prompt"),
    ({**GOOD, "negative_prompt": "b" * 301}, 413, "negative_prompt"),
    ({**GOOD, "model": "sd-9000"}, 404, "model"),
    ({**GOOD, "sampler": "Heun++"}, 422, "sampler"),
    ({**GOOD, "seed": 2**40}, 422, "seed"),
    ({**GOOD, "seed": -5}, 422, "seed"),
    ({"steps": 2}, 422, "prompt"),
    ({**GOOD, "colour": "red"}, 422, "colour"),
    ({**GOOD, "cache": {"threshold": -1}}, 422, "cache.threshold"),
    ({**GOOD, "cache": {"thresold": 0.1}}, 422, "cache.thresold"),
    ({**GOOD, "cache": {"start": 0.5, "end": 0.2}}, 422, "cache.end"),
    ({**GOOD, "cache": {"mode": "fast"}}, 422, "cache.mode"),
    ({**GOOD, "cache": {"max_consecutive_hits": 0}}, 422, "cache.max_consecutive_hits"),
    ({**GOOD, "cache": 0.1}, 422, "cache"),
    ('{"prompt": "x", ', 422, "body"),
    ('{"prompt": "' + "a" * (2 << 20) + '"}', 413, "body"),  # above the ~1.17 MiB body limit
]


@pytest.mark.parametrize("body,status,field", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_bad_request_names_the_field(service, body, status, field):
    if isinstance(body, str):
        response = service.client.post("/v1/generate", content=body,
                                       headers={"content-type": "application/json"})
    else:
        response = service.client.post("/v1/generate", json=body)
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload["error"]["param"] == field
    assert payload["error"]["message"].startswith(f"{field}:")
    assert payload["detail"] == payload["error"]["message"]


def test_service_keeps_serving_after_bad_requests(service):
    for body, _, _ in CASES[:5]:
        service.client.post("/v1/generate", json=body if isinstance(body, dict) else json.loads("{}"))
    response = service.generate(**GOOD)
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
