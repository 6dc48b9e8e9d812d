"""The stages against a live app: a checkpoint replaced on disk under the same name is reloaded
by every stage at the next request (new weights, no stale cached embeddings), and a request
whose denoising diverges fails alone, with an error naming its field that arrives intact."""
from __future__ import annotations

import io
import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from ray import serve

from deployments.messages import EncodeRequest
from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.errors import InvalidRequestError
from pipeline.loading import load_model
from tools.checkpoint_writer import save_checkpoint
from tools.tiny_shapes import MODEL_DIR

from tests.hardening.conftest import Cluster
from tests.unit.test_stage_hardening import altered_checkpoint

PROMPT = "a red circle on a blue background"
BODY = {"prompt": PROMPT, "seed": 5, "steps": 6, "width": 64, "height": 64}


def pixels(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(int)


def test_a_checkpoint_replaced_under_its_name_is_reloaded_with_fresh_embeddings(
        service: httpx.Client, cluster: Cluster):
    swap, reference = cluster.checkpoints_dir / "swap.safetensors", cluster.checkpoints_dir / "swap-ref.safetensors"
    save_checkpoint(MODEL_DIR, swap)
    altered_checkpoint(reference)
    encoder = serve.get_deployment_handle("TextEncoder", "raydiance")
    request = EncodeRequest("swap", PROMPT)
    try:
        before = pixels(service.post("/v1/generate", json={**BODY, "model": "swap"}))
        builtin = pixels(service.post("/v1/generate", json={**BODY, "model": "tiny-shapes"}))
        assert np.abs(before - builtin).max() <= 1
        first = encoder.encode.remote(request).result(timeout_s=60).conditioning  # now cached
        altered_checkpoint(swap)  # rewritten in place: same size and inode, a new mtime
        second = encoder.encode.remote(request).result(timeout_s=60).conditioning
        (fresh,) = encode_prompts(load_model(swap, components=("text_encoders",)), [PROMPT], [None])
        assert torch.equal(second.prompt_embeds, fresh.prompt_embeds)
        assert not torch.equal(second.prompt_embeds, first.prompt_embeds)
        after = pixels(service.post("/v1/generate", json={**BODY, "model": "swap"}))
        expected = pixels(service.post("/v1/generate", json={**BODY, "model": "swap-ref"}))
        assert np.array_equal(after, expected)  # every stage runs the new weights
        assert np.abs(after - before).mean() > 2
    finally:
        swap.unlink(missing_ok=True)
        reference.unlink(missing_ok=True)


def test_a_diverging_request_fails_alone_through_ray(service: httpx.Client):
    """Guidance 1e30 (the API bounds it; a handle call does not) gives NaN latents: that request
    gets the InvalidRequestError naming guidance_scale, intact through Ray, not a black image;
    the requests batched with it in the Denoiser get what they get alone."""
    encoder = serve.get_deployment_handle("TextEncoder", "raydiance")
    denoiser = serve.get_deployment_handle("Denoiser", "raydiance")
    encoded = encoder.encode.remote(EncodeRequest("tiny-shapes", PROMPT)).result(timeout_s=60)
    good = DenoiseParams(64, 64, steps=6, seed=5)
    alone = denoiser.denoise.remote(encoded, good).result(timeout_s=120).latents
    bad = DenoiseParams(64, 64, steps=30, seed=6, guidance_scale=1e30)
    responses = [denoiser.denoise.remote(encoded, params) for params in (good, bad, good, good)]
    with pytest.raises(InvalidRequestError) as caught:
        responses.pop(1).result(timeout_s=120)
    assert caught.value.field == "guidance_scale" and "diverged" in caught.value.message
    for response in responses:
        assert np.allclose(response.result(timeout_s=120).latents, alone, atol=1e-4)
