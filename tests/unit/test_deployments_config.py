"""The app's arguments, placement choice and request validation, without Ray running."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.api import a1111, native, openai
from deployments.api.a1111 import Txt2ImgRequest
from deployments.api.errors import ApiError
from deployments.api.generation import ServedModels
from deployments.api.native import GenerateRequest
from deployments.api.openai import OpenAIImageRequest
from deployments.app import parse_args, stage_settings
from deployments.placement import actor_options
from deployments.settings import AppArgs, Limits, Placement
from pipeline.errors import NotFoundError
from pipeline.library import ModelCatalog
from pipeline.sampler_names import SAMPLERS, SCHEDULES
from tools.tiny_shapes import MODEL_DIR

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_is_valid_and_points_at_the_builtin_model(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve_config.yaml").read_text()))
    (app,) = config.applications
    assert app.import_path == "deployments.app:build_app"
    assert config.http_options.host == "127.0.0.1" and config.http_options.port == 8000
    monkeypatch.chdir(REPO)
    args = parse_args(app.args)
    assert Path(args.models["tiny-shapes"]) == MODEL_DIR.resolve()
    cpus = sum(actor_options(stage, args.accelerator, args.placement, gpus=0)["num_cpus"]
               for stage in ("Ingress", "TextEncoder", "Denoiser", "VAEDecoder"))
    assert cpus <= 2.0  # fits a 2-core machine


def test_relative_model_paths_fall_back_to_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args({"models": {"tiny": "models/tiny-shapes"}})
    assert Path(args.models["tiny"]) == MODEL_DIR.resolve()
    assert args.default_model == "tiny"


@pytest.mark.parametrize("args,field", [
    ({"models": {}}, "models"),
    ({"accelerator": "tpu"}, "accelerator"),
    ({"limits": {"max_steps": 0}}, "max_steps"),
    ({"limitz": {}}, "limitz"),
    ({"placement": {"cpu": {"Unet": {"num_cpus": 1}}}}, "Unet"),
])
def test_bad_args_fail_naming_the_key(args, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs.model_validate(args)


@pytest.mark.parametrize("args,field", [
    ({"models": {"a": str(MODEL_DIR)}, "default_model": "b"}, "default_model"),
    ({"models": {"a": "/nonexistent/model"}}, "nonexistent"),
    ({"checkpoints_dir": "/nonexistent/folder"}, "checkpoints_dir"),
    ({"loras_dir": str(MODEL_DIR / "model_index.json")}, "loras_dir"),
])
def test_bad_paths_fail_the_build_naming_them(args, field):
    with pytest.raises(Exception, match=field):
        stage_settings(parse_args(args))


def test_placement_follows_accelerator_and_cluster():
    placement = Placement()
    assert actor_options("Denoiser", "auto", placement, gpus=0) == {"num_cpus": 0.8}
    assert actor_options("Denoiser", "auto", placement, gpus=4)["num_gpus"] == 1
    assert 0 < actor_options("TextEncoder", "auto", placement, gpus=1)["num_gpus"] < 1
    assert "num_gpus" not in actor_options("Denoiser", "cpu", placement, gpus=8)
    assert actor_options("Denoiser", "cuda", placement, gpus=0)["num_gpus"] == 1


@pytest.fixture(scope="module")
def catalog():
    return ModelCatalog({"tiny-shapes": str(MODEL_DIR)})


def test_catalog_reads_native_size_without_loading(catalog):
    info = catalog.describe("tiny-shapes")
    assert (info.family, info.native_size, info.vae_scale_factor) == ("sd15", 64, 4)


def test_catalog_serves_a_checkpoints_folder_read_when_asked(tmp_path):
    catalog = ModelCatalog({"tiny-shapes": str(MODEL_DIR)}, str(tmp_path))
    assert catalog.names() == ["tiny-shapes"]
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    assert catalog.names() == ["tiny-shapes", "broken"]
    assert [info.name for info in catalog.describe_all()] == ["tiny-shapes"]  # broken left out
    with pytest.raises(NotFoundError, match="served: tiny-shapes, broken"):
        catalog.path("nope")


def served(catalog, limits=Limits()):
    return ServedModels(catalog, "tiny-shapes", limits, loras=None)


def test_resolve_fills_defaults_and_draws_a_seed(catalog):
    job = native.to_generation(GenerateRequest(prompt="a red circle on a blue background"), served(catalog))
    assert (job.width, job.height, job.steps, job.sampler, job.model) == (64, 64, 20, "Euler", "tiny-shapes")
    assert 0 <= job.seed < 2**32


@pytest.mark.parametrize("to_generation,body,field,status", [
    (native.to_generation, GenerateRequest(prompt="x", width=2048), "width", None),
    (native.to_generation, GenerateRequest(prompt="x", steps=101), "steps", None),
    (native.to_generation, GenerateRequest(prompt="x", sampler="nope"), "sampler", None),
    (native.to_generation, GenerateRequest(prompt="x", sampler="DDIM", scheduler="karras"), "scheduler", None),
    (native.to_generation, GenerateRequest(prompt="x", model="nope"), "model", 404),
    (native.to_generation, GenerateRequest(prompt="x" * 2001), "prompt", 413),
    (openai.to_generation, OpenAIImageRequest(prompt="x", size="64x60"), "size", None),
    (openai.to_generation, OpenAIImageRequest(prompt="x", n=5), "n", None),
    (a1111.to_generation, Txt2ImgRequest(prompt="x", cfg_scale=5, sampler_name="nope"), "sampler_name", None),
    (a1111.to_generation, Txt2ImgRequest(prompt="x", batch_size=5), "batch_size", None),
    (a1111.to_generation, Txt2ImgRequest(prompt="x", sampler_name="DDIM", scheduler="Karras"), "scheduler", None),
    (a1111.to_generation, Txt2ImgRequest(prompt="x", scheduler="Linear Quadratic"), "scheduler", None),
    (a1111.to_generation, Txt2ImgRequest(prompt="x", sampler_name="DPM++ 2M Karras", scheduler="beta"),
     "scheduler", None),
])
def test_resolve_errors_speak_the_callers_field_names(catalog, to_generation, body, field, status):
    with pytest.raises(ApiError) as raised:
        to_generation(body, served(catalog))
    assert raised.value.field == field and raised.value.status == status


def test_openai_refuses_streamed_partial_images(catalog):
    with pytest.raises(ApiError, match="stream"):
        openai.to_generation(OpenAIImageRequest(prompt="x", stream=True), served(catalog))


@pytest.mark.parametrize("sampler_name,scheduler,expected", [
    ("DPM++ 2M", "karras", ("DPM++ 2M", "Karras")),
    ("Euler a", "Karras", ("Euler a", "Karras")),
    ("DDIM", "normal", ("DDIM", "Normal")),  # SillyTavern's default
    ("DPM++ 2M Karras", None, ("DPM++ 2M", "Karras")),  # an older combined name
    ("DPM++ SDE", "align_your_steps", None),  # DPMSolverSDEScheduler takes no explicit sigmas
    (None, None, ("Euler", "Automatic")),
])
def test_a1111_sampler_and_scheduler_map_apart(catalog, sampler_name, scheduler, expected):
    body = Txt2ImgRequest(prompt="x", sampler_name=sampler_name, scheduler=scheduler)
    if expected is None:
        with pytest.raises(ApiError) as raised:
            a1111.to_generation(body, served(catalog))
        assert raised.value.field == "scheduler"
        return
    generation = a1111.to_generation(body, served(catalog))
    assert (generation.sampler, generation.scheduler) == expected
    assert f"Sampler: {expected[0]}, Schedule type: {expected[1]}," in generation.infotext(generation.seed)


def test_a1111_lists_every_sampler_and_every_served_schedule():
    samplers = asyncio.run(a1111.samplers())
    assert [s["name"] for s in samplers] == list(SAMPLERS)
    assert {"name": "Heun", "aliases": ["k_heun"], "options": {"second_order": "True"}} in samplers
    schedulers = asyncio.run(a1111.schedulers())
    assert [s["label"] for s in schedulers] == list(SCHEDULES)  # each served by some sampler
    assert {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
            "need_inner_model": False} in schedulers


def test_native_scheduler_defaults_to_automatic_and_takes_a1111_keys(catalog):
    default = native.to_generation(GenerateRequest(prompt="x", sampler="dpm++ 2m sde"), served(catalog))
    assert (default.sampler, default.scheduler) == ("DPM++ 2M SDE", "Automatic")
    chosen = native.to_generation(GenerateRequest(prompt="x", sampler="Heun", scheduler="kl_optimal"),
                                  served(catalog))
    assert (chosen.sampler, chosen.scheduler) == ("Heun", "KL Optimal")
