"""The TextEncoder's embedding cache, in process: bounded LRU, and a hit is the very conditioning
the first encoding produced (so the image cannot differ)."""
from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.messages import EncodeRequest
from deployments.settings import BatchKnobs, StageSettings
from deployments.text_encoder import DEFAULT_CACHE_SIZE, EmbeddingCache, TextEncoder
from pipeline.conditioning import encode_prompts

from tests.conftest import BUILTIN_MODEL


def key(prompt: str, negative: str | None = None, model: str = "m") -> EncodeRequest:
    return EncodeRequest(model, prompt, negative)


def test_lru_evicts_the_least_recently_used():
    cache = EmbeddingCache(2)
    a, b, c = object(), object(), object()
    cache.put(key("a"), a)
    cache.put(key("b"), b)
    assert cache.get(key("a")) is a  # a is now the most recent
    cache.put(key("c"), c)
    assert cache.get(key("b")) is None and cache.get(key("a")) is a and cache.get(key("c")) is c
    assert len(cache) == 2


def test_key_is_model_prompt_and_negative_prompt():
    cache = EmbeddingCache(8)
    cache.put(key("p", None, "m1"), "x")
    assert cache.get(key("p", None, "m2")) is None
    assert cache.get(key("p", "", "m1")) is None  # no negative prompt is not an empty one
    assert cache.get(key("p", None, "m1")) == "x"


def test_resize_and_off():
    cache = EmbeddingCache(4)
    for i in range(4):
        cache.put(key(str(i)), i)
    cache.resize(1)
    assert len(cache) == 1 and cache.get(key("3")) == 3
    cache.resize(0)
    cache.put(key("x"), 1)
    assert len(cache) == 0 and cache.get(key("x")) is None
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="embedding_cache_size"):
            cache.resize(bad)
    assert EmbeddingCache().capacity == DEFAULT_CACHE_SIZE


@pytest.fixture(scope="module")
def encoder():
    """The deployment's class with Serve's model multiplexing and @serve.batch bypassed (both
    need a replica context): one request per forward, the model the store loaded at start."""
    settings = StageSettings(model_paths={"tiny-shapes": str(BUILTIN_MODEL)},
                             default_model="tiny-shapes", accelerator="cpu")
    instance = TextEncoder.func_or_class(settings, BatchKnobs(), cache_size=2)
    model = instance.store.load("tiny-shapes")

    async def get_model(name):
        return model

    async def one(item):
        return (await instance.worker.run(instance._encode_sync, [item]))[0]

    instance.get_model, instance._encode_batch = get_model, one
    return instance


def test_a_hit_returns_the_identical_conditioning(encoder, builtin_model):
    request = EncodeRequest("tiny-shapes", "a red circle on a blue background", "green")

    async def twice():
        return await encoder.encode(request), await encoder.encode(request)

    first, second = asyncio.run(twice())
    assert second.conditioning is first.conditioning
    (fresh,) = encode_prompts(builtin_model, [request.prompt], [request.negative_prompt])
    assert torch.equal(second.conditioning.prompt_embeds, fresh.prompt_embeds)
    assert torch.equal(second.conditioning.negative_embeds, fresh.negative_embeds)
    assert encoder.cache_stats() == {"entries": 1, "capacity": 2}


def test_reconfigure_takes_the_user_config(encoder):
    encoder.reconfigure({"embedding_cache_size": 5})
    assert encoder.cache_stats()["capacity"] == 5
    with pytest.raises(ValueError, match="unknown key"):
        encoder.reconfigure({"embedding_cache_sise": 5})
    encoder.reconfigure({})
    assert encoder.cache_stats()["capacity"] == 5
