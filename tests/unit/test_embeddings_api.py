"""Embeddings and clip skip at the HTTP layer, in process: the listings' shapes, the embeddings a
prompt names resolved with their files' versions (the cache key), clip skip's bounds and names
in each dialect, A1111's options kept per replica."""
from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from deployments.api import a1111, native
from deployments.api.errors import ApiError
from deployments.api.generation import ServedModels
from deployments.api.ingress import IngressSettings, build_api
from deployments.settings import Limits, StageSettings
from pipeline.embedding_library import EmbeddingLibrary
from pipeline.library import files_version
from tools.embedding_files import random_vectors, write_embedding, write_tripwire_pickle
from tools.tiny_shapes import MODEL_DIR


@pytest.fixture(scope="module")
def folder(tmp_path_factory, builtin_model):
    folder = tmp_path_factory.mktemp("embeddings")
    write_embedding(folder / "mystyle.safetensors", random_vectors(builtin_model, 3))
    write_embedding(folder / "xlstyle.safetensors", (torch.randn(2, 768), torch.randn(2, 1280)))
    write_tripwire_pickle(folder / "evil.pt", folder.parent / "unpickled")
    return folder


@pytest.fixture(scope="module")
def models(folder):
    stage = StageSettings(model_paths={"tiny-shapes": str(MODEL_DIR)}, default_model="tiny-shapes",
                          accelerator="cpu", embeddings_dir=str(folder))
    return ServedModels(stage.catalog(), "tiny-shapes", Limits(), None,
                        embeddings=EmbeddingLibrary(folder))


@pytest.fixture(scope="module")
def client(models, folder):
    stage = StageSettings(model_paths={"tiny-shapes": str(MODEL_DIR)}, default_model="tiny-shapes",
                          accelerator="cpu", embeddings_dir=str(folder))
    return TestClient(build_api(None, models, IngressSettings(stage=stage, limits=Limits())))


def test_a1111_lists_the_folder_in_its_shape(client, folder):
    body = client.get("/sdapi/v1/embeddings").json()
    assert body["loaded"] == {
        "mystyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": 64,
                    "vectors": 3},
        "xlstyle": {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None,
                    "shape": 768 + 1280, "vectors": 2}}
    assert list(body["skipped"]) == ["evil"] and "pickle" in body["skipped"]["evil"]["reason"]
    assert not (folder.parent / "unpickled").exists()
    assert client.get("/sdapi/v1/cmd-flags").json()["embeddings_dir"] == str(folder)


def test_native_lists_them_like_loras(client):
    body = client.get("/v1/embeddings").json()
    assert body["object"] == "list"
    assert [(e["id"], e["family"], e["vectors"], e["widths"]) for e in body["data"]] == [
        ("mystyle", "sd15", 3, [64]), ("xlstyle", "sdxl", 2, [768, 1280])]
    assert [e["id"] for e in body["skipped"]] == ["evil"]


def test_a_generation_carries_the_embeddings_its_prompts_name(models, folder):
    generation = native.to_generation(native.GenerateRequest(
        prompt="a red mystyle circle", negative_prompt="XLStyle", clip_skip=2), models)
    assert generation.embeddings == (
        ("mystyle", files_version(folder / "mystyle.safetensors")),
        ("xlstyle", files_version(folder / "xlstyle.safetensors")))
    assert generation.clip_skip == 2 and "Clip skip: 2" in generation.infotext(1)
    plain = native.to_generation(native.GenerateRequest(prompt="a red circle"), models)
    assert (plain.embeddings, plain.clip_skip) == ((), 1) and "Clip skip" not in plain.infotext(1)


def test_a_prompt_naming_a_pickle_is_refused_unread(models, folder):
    for prompt, negative, field in (("evil", None, "prompt"), ("a red circle", "evil", "negative_prompt")):
        with pytest.raises(ApiError, match="pickle") as caught:
            a1111.to_generation(a1111.Txt2ImgRequest(prompt=prompt, negative_prompt=negative), models)
        assert caught.value.field == field
    assert not (folder.parent / "unpickled").exists()


@pytest.mark.parametrize("value", [0, 13, -1, 2.5, "two"])
def test_clip_skip_bounds_name_the_field(client, value):
    answer = client.post("/v1/generate", json={"prompt": "a red circle", "clip_skip": value})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "clip_skip"
    answer = client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": value})
    assert answer.status_code == 422 and answer.json()["error"]["param"] == "CLIP_stop_at_last_layers"
    with pytest.raises(ValidationError, match="CLIP_stop_at_last_layers"):
        a1111.Txt2ImgRequest(prompt="x", override_settings={"CLIP_stop_at_last_layers": value})


def test_a1111_clip_skip_from_options_and_override_settings(client, models):
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 1
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["CLIP_stop_at_last_layers"] == 2
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    body = a1111.Txt2ImgRequest(prompt="x")
    assert a1111.to_generation(body, models, None, 2).clip_skip == 2  # the options' value
    override = a1111.Txt2ImgRequest(prompt="x", override_settings={"CLIP_stop_at_last_layers": 3})
    assert a1111.to_generation(override, models, None, 2).clip_skip == 3  # the request's wins
    assert a1111.field_names(override)["clip_skip"] == "override_settings.CLIP_stop_at_last_layers"
    assert a1111.field_names(body)["clip_skip"] == "CLIP_stop_at_last_layers"
