"""Every error a stage raises reaches the caller through Ray with its status, field and message;
unusable LoRA and checkpoint files get a 4xx naming the field in every dialect; a request that
fails inside a batch fails alone, and the others batched with it get their own images.

One app of its own (``/unusable``), serving folders that hold broken files next to good ones,
with a TextEncoder that waits 0.4 s to fill its batches, so that requests sent together share one.
"""
from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray import serve
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deployments.api.errors import ApiError
from deployments.api.faults import root_cause, translate
from deployments.messages import EncodeRequest
from pipeline.request_params import DenoiseParams
from pipeline.errors import (InvalidRequestError, MissingComponentError, ModelLoadError,
                             NotFoundError, UnsafeWeightsError)
from pipeline.generate import generate
from pipeline.loading import load_model
from pipeline.unet.cache_config import default_cache_config
from tools.checkpoint_writer import save_checkpoint
from tools.random_models import build_random_sdxl, write_lora_pair
from tools.tiny_shapes import MODEL_DIR
from tools.tiny_shapes.world import classify

from tests.integration.test_colours import distinct_scenes

APP = "unusable"
PROMPT = "a red circle on a blue background"


def write_broken_loras(folder: Path, tiny, sdxl_root: Path) -> None:
    """Next to a good pair (``good_kohya``, ``good_peft``): a LoHa, a LoRA for SDXL, random
    bytes named .safetensors and a pickle."""
    folder.mkdir()
    write_lora_pair(tiny, folder, "good", seed=1)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.hada_w1_a": torch.ones(4, 4), f"{name}.hada_w1_b": torch.ones(4, 32),
               f"{name}.hada_w2_a": torch.ones(4, 4), f"{name}.hada_w2_b": torch.ones(4, 32),
               f"{name}.alpha": torch.tensor(2.0)}, folder / "loha.safetensors")
    write_lora_pair(load_model(build_random_sdxl(sdxl_root, latent_size=16)), folder, "sdxl", seed=3)
    (folder / "garbage.safetensors").write_bytes(b"\x07" * 64 + b"not a safetensors file")
    (folder / "pickled.pt").write_bytes(b"\x80\x04\x95never unpickled")


def write_broken_checkpoints(folder: Path) -> None:
    """A checkpoint whose header is fine but a UNet weight is missing or of the wrong shape (only a
    replica's load finds out), one without a VAE, random bytes, and a diffusers folder of pickled weights."""
    folder.mkdir()
    full = folder / "full.safetensors"
    save_checkpoint(MODEL_DIR, full)
    with safe_open(full, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(full)
    full.unlink()
    dropped = "model.diffusion_model.middle_block.0.in_layers.0.weight"
    save_file({k: v for k, v in tensors.items() if k != dropped},
              folder / "weights-missing.safetensors", metadata=metadata)
    save_file(tensors | {dropped: torch.ones(tensors[dropped].shape[0] + 3)},
              folder / "wrong-shape.safetensors", metadata=metadata)
    save_file({k: v for k, v in tensors.items() if not k.startswith("first_stage_model.")},
              folder / "no-vae.safetensors", metadata=metadata)
    (folder / "random-bytes.safetensors").write_bytes(bytes(range(256)) * 8)
    pickled = folder / "pickled-unet"
    for part in ("scheduler", "text_encoder", "tokenizer", "vae"):
        (pickled / part).mkdir(parents=True)
        for file in (MODEL_DIR / part).iterdir():
            (pickled / part / file.name).write_bytes(file.read_bytes())
    (pickled / "unet").mkdir()
    (pickled / "unet" / "config.json").write_bytes((MODEL_DIR / "unet" / "config.json").read_bytes())
    (pickled / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04never unpickled")
    (pickled / "model_index.json").write_bytes((MODEL_DIR / "model_index.json").read_bytes())


@pytest.fixture(scope="module")
def url(deploy_app, tmp_path_factory, builtin_model) -> str:
    root = tmp_path_factory.mktemp("unusable")
    write_broken_loras(root / "loras", builtin_model, root / "sdxl")
    write_broken_checkpoints(root / "checkpoints")
    yield deploy_app(APP, "/unusable", loras_dir=str(root / "loras"),
                     checkpoints_dir=str(root / "checkpoints"),
                     text_encoder={"max_batch_size": 8, "batch_wait_timeout_s": 0.4})
    serve.delete(APP)


@pytest.fixture(scope="module")
def http(url) -> httpx.Client:
    with httpx.Client(base_url=url, timeout=120.0) as client:
        yield client


# --- each error class through Ray --------------------------------------------------------------

@ray.remote
def raise_in_a_worker(error: Exception) -> None:
    raise error


@pytest.mark.parametrize("error, status, field", [
    (InvalidRequestError("loras", "x: not a LoRA"), 422, "loras"),
    (NotFoundError("model", "no model named 'x'"), 404, "model"),
    (ModelLoadError("x.safetensors: incomplete sd15 checkpoint"), 422, "model"),
    (UnsafeWeightsError("unet/x.bin: pickle-format weights are refused"), 422, "model"),
    (MissingComponentError("model 'x': vae not loaded in this stage"), 500, None),
], ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None)
def test_each_error_class_crosses_ray_whole(url, error, status, field):
    with pytest.raises(Exception) as raised:
        ray.get(raise_in_a_worker.remote(error))
    cause = root_cause(raised.value)
    assert type(cause) is type(error) and cause.message == error.message
    assert getattr(cause, "field", None) == getattr(error, "field", None)
    answer = translate(raised.value)
    if status == 500:  # a bug: left for the generic 500
        assert not isinstance(answer, ApiError)
    else:
        assert (answer.status or 422, answer.field, answer.message) == (status, field, error.message)


def encoder(model: str = "tiny-shapes"):
    return serve.get_deployment_handle("TextEncoder", APP).options(multiplexed_model_id=model)


def test_a_stages_own_errors_reach_a_handles_caller_with_field_and_message(url):
    with pytest.raises(Exception) as raised:
        encoder().encode.remote(EncodeRequest("tiny-shapes", PROMPT, None, (("loha", 1.0),))).result()
    cause = root_cause(raised.value)
    assert isinstance(cause, InvalidRequestError) and cause.field == "loras"
    assert "loha: not a LoRA" in cause.message and "LoHa" in cause.message
    with pytest.raises(Exception) as raised:
        encoder("no-such-model").encode.remote(EncodeRequest("no-such-model", PROMPT)).result()
    cause = root_cause(raised.value)
    assert isinstance(cause, NotFoundError) and cause.field == "model"
    assert "no-such-model" in cause.message


def test_a_prompt_that_breaks_the_tokenizer_fails_alone_in_its_batch(url):
    prompts = [f"a {colour} circle on a white background"
               for colour in ("red", "green", "blue", "yellow", "black", "purple", "orange")]
    prompts.insert(3, "a red \ud800 circle")  # the fast tokenizer raises TypeError on it
    calls = [encoder().encode.remote(EncodeRequest("tiny-shapes", p)) for p in prompts]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(call.result(timeout_s=60))
        except Exception as error:  # noqa: BLE001 - collected and checked below
            outcomes.append(error)
    assert isinstance(root_cause(outcomes[3]), TypeError)
    good = [o for i, o in enumerate(outcomes) if i != 3]
    assert all(not isinstance(o, Exception) for o in good), good
    assert len({round(o.conditioning.prompt_embeds.sum().item(), 4) for o in good}) == 7  # its own


# --- unusable files, in every dialect ----------------------------------------------------------

def native(http: httpx.Client, lora: str | None = None, model: str | None = None) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 2, "seed": 1}
    body |= {"loras": [{"name": lora}]} if lora else {}
    body |= {"model": model} if model else {}
    return http.post("/v1/generate", json=body)


def openai(http: httpx.Client, lora: str | None = None, model: str | None = None) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": 2, "seed": 1, "size": "64x64"}
    body |= {"loras": [{"name": lora}]} if lora else {}
    body |= {"model": model} if model else {}
    return http.post("/v1/images/generations", json=body)


def a1111(http: httpx.Client, lora: str | None = None, model: str | None = None) -> httpx.Response:
    body = {"prompt": PROMPT + (f" <lora:{lora}:1>" if lora else ""), "steps": 2, "seed": 1}
    body |= {"override_settings": {"sd_model_checkpoint": model}} if model else {}
    return http.post("/sdapi/v1/txt2img", json=body)


DIALECTS = {  # how each refuses a bad value, and its names for the LoRA and model fields
    "native": (native, 422, "loras", "model"),
    "openai": (openai, 400, "loras", "model"),
    "a1111": (a1111, 422, "prompt", "override_settings.sd_model_checkpoint"),
}
UNUSABLE_LORAS = {"loha": "LoHa", "sdxl_kohya": "sdxl_kohya", "garbage": "not a readable",
                  "pickled": "pickle"}
UNUSABLE_CHECKPOINTS = {"weights-missing": "weights missing", "wrong-shape": "wrong shape",
                        "no-vae": "no VAE",
                        "random-bytes": "random-bytes", "pickled-unet": "pickle"}


def assert_refused(response: httpx.Response, status: int, field: str, says: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == field, error
    assert says in error["message"], error
    for leak in ("Traceback", "RayTaskError", "pid=", "site-packages"):
        assert leak not in response.text


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("lora", UNUSABLE_LORAS)
def test_an_unusable_lora_is_refused_naming_its_field(http, dialect, lora):
    send, status, lora_field, _ = DIALECTS[dialect]
    assert_refused(send(http, lora=lora), status, lora_field, UNUSABLE_LORAS[lora])


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("checkpoint", UNUSABLE_CHECKPOINTS)
def test_an_unusable_checkpoint_is_refused_naming_the_model(http, dialect, checkpoint):
    send, status, _, model_field = DIALECTS[dialect]
    assert_refused(send(http, model=checkpoint), status, model_field,
                   UNUSABLE_CHECKPOINTS[checkpoint])


def test_after_the_refusals_the_good_files_still_serve(http):
    for send, *_ in DIALECTS.values():
        assert send(http, lora="good_kohya").status_code == 200


# --- one bad request among seven good ones -----------------------------------------------------

def test_one_bad_request_sent_with_seven_good_ones_fails_alone(http, builtin_model):
    scenes = distinct_scenes(7)
    body = {"steps": 12, "guidance_scale": 5.0, "sampler": "Euler"}
    requests = [{"prompt": s.prompt, "seed": 300 + i, **body} for i, s in enumerate(scenes)]
    requests.insert(4, {"prompt": scenes[0].prompt, "seed": 1, "loras": [{"name": "loha"}], **body})
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(lambda b: http.post("/v1/generate", json=b), requests))
    bad = responses.pop(4)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "loras", bad.text
    for i, (scene, response) in enumerate(zip(scenes, responses)):
        assert response.status_code == 200, response.text
        image = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        params = DenoiseParams(64, 64, steps=12, guidance_scale=5.0, seed=300 + i,
                               sampler="Euler", cache=default_cache_config("sd15"))
        alone = generate(builtin_model, scene.prompt, params).pixels
        assert np.abs(image.astype(int) - alone.astype(int)).mean() < 2.0, scene.prompt
        assert classify(Image.fromarray(image)) == classify(Image.fromarray(alone)), scene.prompt
