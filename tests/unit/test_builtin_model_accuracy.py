"""Acceptance of the built-in model: its pictures follow its prompts, even unseen combinations."""
from __future__ import annotations

from PIL import Image

from pipeline.denoise import DenoiseParams
from pipeline.generate import generate_batch
from pipeline.tiny_shapes.world import HELD_OUT_SCENES, TRAIN_SCENES, Scene, is_correct


def accuracy(model, scenes: tuple[Scene, ...], seeds: range) -> float:
    cases = [(scene, seed) for seed in seeds for scene in scenes]
    params = [DenoiseParams(64, 64, steps=20, guidance_scale=5.0, seed=seed, sampler="Euler")
              for _, seed in cases]
    results = generate_batch(model, [scene.prompt for scene, _ in cases], params)
    hits = sum(is_correct(Image.fromarray(r.pixels), scene) for (scene, _), r in zip(cases, results))
    return hits / len(cases)


def test_trained_prompts_at_least_90_percent(builtin_model):
    assert accuracy(builtin_model, TRAIN_SCENES, range(1000, 1002)) >= 0.90


def test_held_out_prompts_at_least_80_percent(builtin_model):
    assert accuracy(builtin_model, HELD_OUT_SCENES, range(1000, 1010)) >= 0.80
