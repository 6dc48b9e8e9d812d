"""Acceptance of the built-in model: its pictures follow its prompts, even unseen combinations,
and First Block Cache at its default threshold costs no accuracy."""
from __future__ import annotations

import pytest
from PIL import Image

from pipeline.unet.cache_config import FirstBlockCacheConfig, default_cache_config
from pipeline.request_params import DenoiseParams
from pipeline.generate import generate_batch
from tools.tiny_shapes.world import HELD_OUT_SCENES, TRAIN_SCENES, Scene, is_correct

TRAIN_SEEDS = range(1000, 1002)


def accuracy(model, scenes: tuple[Scene, ...], seeds: range, cache: FirstBlockCacheConfig | None = None) -> float:
    cases = [(scene, seed) for seed in seeds for scene in scenes]
    params = [DenoiseParams(64, 64, steps=20, guidance_scale=5.0, seed=seed, sampler="Euler",
                            cache=cache) for _, seed in cases]
    results = generate_batch(model, [scene.prompt for scene, _ in cases], params)
    hits = sum(is_correct(Image.fromarray(r.pixels), scene) for (scene, _), r in zip(cases, results))
    return hits / len(cases)


@pytest.fixture(scope="module")
def trained_accuracy_uncached(builtin_model) -> float:
    return accuracy(builtin_model, TRAIN_SCENES, TRAIN_SEEDS)


def test_trained_prompts_at_least_90_percent(trained_accuracy_uncached):
    assert trained_accuracy_uncached >= 0.90


def test_held_out_prompts_at_least_80_percent(builtin_model):
    assert accuracy(builtin_model, HELD_OUT_SCENES, range(1000, 1010)) >= 0.80


def test_default_cache_keeps_accuracy_within_2_points(builtin_model, trained_accuracy_uncached):
    cached = accuracy(builtin_model, TRAIN_SCENES, TRAIN_SEEDS, default_cache_config("sd15"))
    assert cached >= trained_accuracy_uncached - 0.02, (cached, trained_accuracy_uncached)
