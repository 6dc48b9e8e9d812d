"""Other names for served models (``model_aliases``): OpenAI's image model names by default,
resolved for every dialect by ``ServedModels``, checked when the app is built, listed by
``GET /v1/models``."""
from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from deployments.api.errors import ApiError
from deployments.api.generation import ServedModels
from deployments.api.ingress import IngressSettings, build_api
from deployments.api.model_aliases import OPENAI_IMAGE_MODELS, checked_aliases
from deployments.app import build_app
from deployments.settings import Limits, StageSettings
from pipeline.library import ModelCatalog
from tools.tiny_shapes import MODEL_DIR

RESOLVE = dict(prompt="x", negative_prompt=None, width=None, height=None, steps=2,
               guidance_scale=5.0, sampler=None, seed=1, count=1, cache=None, loras=())


def served(aliases: dict[str, str], configured: dict[str, str] | None = None) -> ServedModels:
    catalog = ModelCatalog(configured or {"tiny-shapes": str(MODEL_DIR)})
    return ServedModels(catalog, "tiny-shapes", Limits(), None, aliases)


def test_by_default_openais_names_name_the_default_model():
    assert checked_aliases(None, ["tiny-shapes", "other"], "tiny-shapes") == dict.fromkeys(
        OPENAI_IMAGE_MODELS, "tiny-shapes")
    # a default alias that a served model's name shadows is dropped, not refused
    assert "dall-e-2" not in checked_aliases(None, ["tiny-shapes", "dall-e-2"], "tiny-shapes")
    assert checked_aliases({}, ["tiny-shapes"], "tiny-shapes") == {}


@pytest.mark.parametrize("aliases,message", [
    ({"dall-e-2": "nope"}, "not served"),
    ({"tiny-shapes": "tiny-shapes"}, "shadow"),
])
def test_a_configured_alias_naming_no_model_or_shadowing_one_fails_the_build(aliases, message):
    with pytest.raises(ValueError, match=message):
        checked_aliases(aliases, ["tiny-shapes"], "tiny-shapes")
    with pytest.raises(ValueError, match="model_aliases"):
        build_app({"accelerator": "cpu", "model_aliases": aliases})


def test_an_alias_resolves_to_its_model_in_every_dialects_path():
    models = served({"dall-e-2": "tiny-shapes", "house-style": "tiny-shapes"})
    assert models.resolve({}, model="dall-e-2", **RESOLVE).model == "tiny-shapes"
    assert models.describe("house-style", "sd_model_checkpoint").name == "tiny-shapes"
    with pytest.raises(ApiError) as caught:
        models.resolve({"model": "model"}, model="dall-e-4", **RESOLVE)
    assert caught.value.status == 404 and caught.value.field == "model"


def test_a_model_of_the_aliass_name_wins():
    models = served({"dall-e-2": "tiny-shapes"},
                    {"tiny-shapes": str(MODEL_DIR), "dall-e-2": str(MODEL_DIR)})
    assert models.resolve({}, model="dall-e-2", **RESOLVE).model == "dall-e-2"


def test_v1_models_lists_aliases_with_alias_of():
    stage = StageSettings(model_paths={"tiny-shapes": str(MODEL_DIR)}, default_model="tiny-shapes",
                          accelerator="cpu")
    aliases = checked_aliases(None, ["tiny-shapes"], "tiny-shapes")
    app = build_api(None, served(aliases), IngressSettings(stage=stage, limits=Limits(),
                                                           model_aliases=aliases))
    data = TestClient(app).get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == ["tiny-shapes", *OPENAI_IMAGE_MODELS]
    assert data[0]["default"] and "alias_of" not in data[0]
    for entry in data[1:]:
        assert entry["alias_of"] == "tiny-shapes" and entry["default"] is False
        assert entry["family"] == "sd15" and entry["native_size"] == 64
