"""The TextEncoder's embedding cache: a bounded LRU (in process), and in the live replica a hit
gives exactly the conditioning a fresh encoding does (so the image cannot differ)."""
from __future__ import annotations

import pytest
import torch

from deployments.messages import EncodeRequest
from deployments.text_encoder import DEFAULT_CACHE_SIZE, EmbeddingCache
from pipeline.conditioning import encode_prompts

from tests.observability.conftest import APP_NAME


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
    assert (cache.hits, cache.misses) == (1, 2)


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


def text_encoder():
    from ray import serve

    return serve.get_deployment_handle("TextEncoder", APP_NAME)


def test_a_hit_returns_the_identical_conditioning(app, builtin_model):
    """Through the live TextEncoder replica: the first call misses and stores one entry, the
    second hits, and both answers are exactly what a fresh encoding gives."""
    encoder = text_encoder()
    request = EncodeRequest("tiny-shapes", "a red circle on a blue background", "a cache test")
    before = encoder.stats.remote().result(timeout_s=30)["embedding_cache"]
    first = encoder.encode.remote(request).result(timeout_s=60)
    second = encoder.encode.remote(request).result(timeout_s=60)
    after = encoder.stats.remote().result(timeout_s=30)["embedding_cache"]
    assert after["entries"] == min(before["entries"] + 1, before["capacity"])
    assert (after["misses"], after["hits"]) == (before["misses"] + 1, before["hits"] + 1)
    (fresh,) = encode_prompts(builtin_model, [request.prompt], [request.negative_prompt])
    for answer in (first, second):
        assert torch.equal(answer.conditioning.prompt_embeds, fresh.prompt_embeds)
        assert torch.equal(answer.conditioning.negative_embeds, fresh.negative_embeds)


def test_reconfigure_takes_the_user_config(app):
    """``reconfigure`` is what Serve calls with the deployment's ``user_config``; called here on
    the live replica, and the capacity put back for the tests after."""
    encoder = text_encoder()
    try:
        encoder.reconfigure.remote({"embedding_cache_size": 5}).result(timeout_s=30)
        assert encoder.stats.remote().result(timeout_s=30)["embedding_cache"]["capacity"] == 5
        with pytest.raises(Exception, match="unknown key"):
            encoder.reconfigure.remote({"embedding_cache_sise": 5}).result(timeout_s=30)
        encoder.reconfigure.remote({}).result(timeout_s=30)
        assert encoder.stats.remote().result(timeout_s=30)["embedding_cache"]["capacity"] == 5
    finally:
        encoder.reconfigure.remote({"embedding_cache_size": DEFAULT_CACHE_SIZE}).result(timeout_s=30)
