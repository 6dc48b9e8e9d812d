"""Models as users have them, through HTTP: a checkpoints folder of single files, hot-swapped by
name with no restart, and LoRAs per request (native field, A1111 prompt tags)."""
from __future__ import annotations

import base64
import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tests.integration.conftest import png_pixels

PROMPT = "a red circle on a blue background"


def image(service, **body) -> np.ndarray:
    response = service.generate(**{"prompt": PROMPT, "seed": 9, "steps": 6, **body})
    assert response.status_code == 200, response.text
    return png_pixels(response.content)


def a1111_image(service, **body) -> np.ndarray:
    import io

    from PIL import Image

    response = service.client.post("/sdapi/v1/txt2img", json={
        "prompt": PROMPT, "seed": 9, "steps": 6, "cfg_scale": 5, "width": 64, "height": 64, **body})
    assert response.status_code == 200, response.text
    data = base64.b64decode(response.json()["images"][0])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), json.loads(response.json()["info"])


def test_the_checkpoints_folder_is_listed_in_both_apis(service):
    native = {m["id"]: m for m in service.client.get("/v1/models").json()["data"]}
    assert {"tiny-shapes", "tiny-single"} <= set(native)
    assert native["tiny-single"]["family"] == "sd15" and native["tiny-single"]["native_size"] == 64
    a1111 = {m["model_name"] for m in service.client.get("/sdapi/v1/sd-models").json()}
    assert {"tiny-shapes", "tiny-single"} <= a1111
    assert {lora["name"] for lora in service.client.get("/sdapi/v1/loras").json()} == {
        "a_kohya", "a_peft", "b_kohya", "b_peft"}


def test_a_single_file_checkpoint_draws_what_its_diffusers_folder_draws(service):
    assert np.abs(image(service, model="tiny-single").astype(int)
                  - image(service, model="tiny-shapes").astype(int)).max() <= 1


def test_a_checkpoint_copied_in_while_serving_is_served_and_models_swap_freely(service):
    shutil.copy(service.checkpoints_dir / "tiny-single.safetensors",
                service.checkpoints_dir / "tiny-late.safetensors")
    reference = image(service, model="tiny-shapes")
    # three models through stages that keep two per replica: loads, evictions, reloads
    for model in ("tiny-late", "tiny-single", "tiny-shapes", "tiny-late"):
        assert np.abs(image(service, model=model).astype(int) - reference.astype(int)).max() <= 1
    response = service.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-late"})
    assert response.status_code == 200
    pixels, info = a1111_image(service)
    assert info["sd_model_name"] == "tiny-late"
    service.client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-shapes"})


def test_lora_weight_zero_is_no_lora_and_a_lora_changes_the_image(service):
    plain = image(service)
    assert np.array_equal(image(service, loras=[{"name": "a_peft", "weight": 0}]), plain)
    with_lora = image(service, loras=[{"name": "a_peft", "weight": 1.0}])
    assert np.abs(with_lora.astype(int) - plain.astype(int)).mean() > 2


def test_kohya_and_peft_files_and_the_a1111_prompt_tag_agree(service):
    native = image(service, loras=[{"name": "b_peft", "weight": 0.8}])
    kohya = image(service, loras=[{"name": "b_kohya", "weight": 0.8}])
    tagged, info = a1111_image(service, prompt=f"{PROMPT} <lora:b_peft:0.8>")
    assert np.abs(kohya.astype(int) - native.astype(int)).max() <= 1
    assert np.abs(tagged.astype(int) - native.astype(int)).max() <= 1  # the tag left the prompt
    assert info["prompt"] == PROMPT


def test_concurrent_requests_with_different_loras_each_get_their_solo_image(service):
    bodies = [{"loras": [{"name": "a_peft"}], "seed": 1}, {"loras": [{"name": "b_kohya"}], "seed": 2},
              {"seed": 3}, {"loras": [{"name": "a_peft"}, {"name": "b_peft", "weight": 0.5}], "seed": 4}]
    solo = [image(service, **body) for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: image(service, **body), bodies))
    for body, alone, amid in zip(bodies, solo, together):
        assert np.abs(alone.astype(int) - amid.astype(int)).max() <= 1, body


def test_unknown_and_escaping_lora_names_are_refused_and_serving_goes_on(service):
    response = service.generate(prompt=PROMPT, steps=2, loras=[{"name": "nope"}])
    assert response.status_code == 404 and "nope" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "loras"
    for name in ("../loras/a_peft", "/etc/passwd", "..", "a/../../x"):
        response = service.generate(prompt=PROMPT, steps=2, loras=[{"name": name}])
        assert response.status_code == 422, (name, response.text)
        assert response.json()["error"]["param"] == "loras"
    response = service.client.post("/sdapi/v1/txt2img", json={"prompt": "x <lora:missing:1>", "steps": 2})
    assert response.status_code == 404 and response.json()["error"]["param"] == "prompt"
    response = service.generate(prompt=PROMPT, steps=2, model="../checkpoints/tiny-single")
    assert response.status_code in (404, 422) and response.json()["error"]["param"] == "model"
    image(service)
