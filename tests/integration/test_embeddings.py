"""Textual inversion embeddings and clip skip against the running app: the folder listed in
A1111's shape, an embedding used by name in a prompt (and read again when its file is replaced),
refusals that name the field (the other family's embedding, a clip skip beyond the model, a
pickle, a path), and a pickle never read."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from ray import serve

from deployments.api.faults import root_cause
from deployments.messages import EncodeRequest
from pipeline.errors import InvalidRequestError
from pipeline.library import files_version
from tools.embedding_files import write_embedding

from tests.integration.conftest import APP_NAME, png_pixels

PROMPT = "a red circle on a blue background"


def pixels(service, prompt: str, **body) -> np.ndarray:
    response = service.generate(prompt=prompt, seed=3, steps=4, **body)
    assert response.status_code == 200, response.text
    return png_pixels(response.content)


def refusal(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["param"]


def test_the_folder_is_listed_in_a1111s_shape_and_the_pickle_skipped_unread(service):
    body = service.client.get("/sdapi/v1/embeddings").json()
    entry = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
    assert body["loaded"] == {"swapstyle": {**entry, "shape": 64, "vectors": 1},
                              "tinystyle": {**entry, "shape": 64, "vectors": 2},
                              "xlstyle": {**entry, "shape": 32 + 48, "vectors": 2}}
    assert list(body["skipped"]) == ["evil"] and "pickle" in body["skipped"]["evil"]["reason"]
    native = service.client.get("/v1/embeddings").json()
    assert [(e["id"], e["family"]) for e in native["data"]] == [
        ("swapstyle", "sd15"), ("tinystyle", "sd15"), ("xlstyle", "sdxl")]
    assert not (service.embeddings_dir.parent / "unpickled").exists()


def test_an_embedding_named_in_a_prompt_changes_the_image(service):
    plain = pixels(service, f"{PROMPT}, style")
    styled = pixels(service, f"{PROMPT}, tinystyle")
    assert np.array_equal(styled, pixels(service, f"{PROMPT}, TinyStyle"))  # case aside, as A1111
    assert not np.array_equal(plain, styled)
    negative = pixels(service, PROMPT, negative_prompt="tinystyle")
    assert not np.array_equal(negative, pixels(service, PROMPT, negative_prompt="style"))


def test_a1111_txt2img_takes_embeddings_and_clip_skip(service):
    request = {"prompt": f"{PROMPT}, tinystyle", "seed": 3, "steps": 4, "width": 64, "height": 64}
    first = service.client.post("/sdapi/v1/txt2img", json=request)
    skipped = service.client.post("/sdapi/v1/txt2img", json={
        **request, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert first.status_code == skipped.status_code == 200, skipped.text
    assert json.loads(skipped.json()["info"])["clip_skip"] == 2
    assert "Clip skip: 2" in json.loads(skipped.json()["info"])["infotexts"][0]
    assert first.json()["images"] != skipped.json()["images"]
    # tiny-shapes' CLIP has two layers: the stage refuses 3, in the caller's terms
    beyond = service.client.post("/sdapi/v1/txt2img", json={
        **request, "override_settings": {"CLIP_stop_at_last_layers": 3}})
    assert refusal(beyond) == (422, "override_settings.CLIP_stop_at_last_layers"), beyond.text
    assert refusal(service.generate(prompt=PROMPT, steps=4, clip_skip=3)) == (422, "clip_skip")
    assert refusal(service.generate(prompt=PROMPT, steps=4, clip_skip=13)) == (422, "clip_skip")


def test_an_embedding_for_the_other_family_is_refused_naming_its_field(service):
    for body, field in (({"prompt": f"{PROMPT}, xlstyle"}, "prompt"),
                        ({"prompt": PROMPT, "negative_prompt": "xlstyle"}, "negative_prompt")):
        answer = service.generate(steps=4, **body)
        assert refusal(answer) == (422, field), answer.text
        assert "SDXL embedding" in answer.json()["error"]["message"]
    fits = service.generate(prompt=f"{PROMPT}, xlstyle", model="random-sdxl", steps=2, width=128,
                            height=128)
    assert fits.status_code == 200, fits.text


def test_a_pickle_named_in_a_prompt_is_refused_and_never_read(service):
    answer = service.generate(prompt=f"{PROMPT}, evil", steps=4)
    assert refusal(answer) == (422, "prompt") and "pickle" in answer.json()["error"]["message"]
    answer = service.client.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "negative_prompt": "evil"})
    assert refusal(answer) == (422, "negative_prompt")
    assert not (service.embeddings_dir.parent / "unpickled").exists()


def test_a_name_with_a_path_never_leaves_the_folder(service):
    """Prompt words are matched against the folder's names only; a request that names a path
    anyway (straight to the TextEncoder) is refused there, and the file outside never read."""
    outside = write_embedding(service.embeddings_dir.parent / "outside.safetensors", torch.zeros(1, 64))
    assert service.generate(prompt=f"{PROMPT}, ../outside", steps=2).status_code == 200
    encoder = serve.get_deployment_handle("TextEncoder", APP_NAME).options(
        multiplexed_model_id="tiny-shapes")
    for name in ("../outside", str(outside.with_suffix("")), "sub/outside"):
        request = EncodeRequest("tiny-shapes", f"a {name}", embeddings=((name, files_version(outside)),))
        with pytest.raises(Exception) as raised:
            encoder.encode.remote(request).result(timeout_s=60)
        cause = root_cause(raised.value)
        assert isinstance(cause, InvalidRequestError) and cause.field == "prompt", cause


def test_a_replaced_file_is_not_served_stale(service):
    before = pixels(service, f"{PROMPT}, swapstyle")
    assert np.array_equal(before, pixels(service, f"{PROMPT}, swapstyle"))  # cached, same image
    path = service.embeddings_dir / "swapstyle.safetensors"
    replacement = write_embedding(service.embeddings_dir.parent / "swap.tmp",
                                  torch.randn(1, 64, generator=torch.Generator().manual_seed(99)))
    os.replace(replacement, path)
    after = pixels(service, f"{PROMPT}, swapstyle")
    assert not np.array_equal(before, after)
