"""The compiled UNet (``compile: true``): the same latents as eager within fp tolerance, over
batch sizes in and out of the row buckets, with First Block Cache off and on, across LoRA set
switches (which compile nothing once each set was seen); padding rows never reach a request; and
the setting itself.

Inductor on the CPU (gcc) takes about a minute per compile of the built-in model's three parts,
so the module compiles ONE model once (a module fixture) and every test shares it, the LoRA
test last (its adapters change the UNet's modules). The compile cache is inductor's default for
Raydiance (``~/.cache/raydiance/inductor``): a second run of this module loads the kernels.
"""
from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from deployments.app import parse_args, stage_settings
from deployments.settings import AppArgs, DenoiserKnobs, ModelEntry
from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.library import LoraLibrary
from pipeline.loading import load_model
from pipeline.lora import AdapterManager
from pipeline.unet.cache_config import FirstBlockCacheConfig
from pipeline.unet.compiled import (CACHE_ENV, DEFAULT_CACHE_DIR, CompileOptions, compile_unet,
                                    configure_cache, padded_rows, recompiles, row_buckets)
from pipeline.unet.parts import EAGER
from pipeline.unet.split import run_head, run_out, run_tail
from tools.random_models import write_lora_pair
from tools.tiny_shapes import MODEL_DIR

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a black triangle on a yellow background"]
STEPS = 8
ATOL = 1e-3  # final latents after STEPS steps (one forward differs by ~3e-6)


# --- the setting ---------------------------------------------------------------------------------

def test_compile_is_set_per_model_and_reaches_the_denoiser_only_by_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse_args({"models": {"fast": {"path": "models/tiny-shapes", "compile": True},
                                  "plain": "models/tiny-shapes",
                                  "object": {"path": "models/tiny-shapes"}}})
    assert args.models["plain"] == str(MODEL_DIR.resolve())  # a bare path stays a path
    assert isinstance(args.models["fast"], ModelEntry) and args.models["fast"].path == str(MODEL_DIR.resolve())
    stage = stage_settings(args)
    assert stage.compiled_models == ["fast"]
    assert set(stage.model_paths) == {"fast", "plain", "object"}
    assert DenoiserKnobs(compile_mode="max-autotune-no-cudagraphs").compile_cache_dir is None
    with pytest.raises(ValidationError, match="compile_mode"):
        DenoiserKnobs(compile_mode="fast")


def test_compile_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert configure_cache(None) == str(Path(DEFAULT_CACHE_DIR).expanduser())
    monkeypatch.setenv(CACHE_ENV, default_cache_dir())  # what torch writes there on first use
    assert configure_cache(None) == str(Path(DEFAULT_CACHE_DIR).expanduser())
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert configure_cache(None) == str(tmp_path / "env")  # the environment's, where set
    assert configure_cache(str(tmp_path / "mine")) == str(tmp_path / "mine")  # a setting wins


@pytest.mark.parametrize("entry,field", [
    ({"path": "models/tiny-shapes", "compyle": True}, "compyle"),
    ({"path": "models/tiny-shapes", "compile": "sometimes"}, "compile"),
    ({"compile": True}, "path"),
])
def test_bad_model_entries_fail_naming_the_field(entry, field):
    with pytest.raises(ValidationError, match=field):
        AppArgs.model_validate({"models": {"m": entry}})


def test_row_buckets_and_padding():
    assert row_buckets(32) == (2, 4, 8, 16, 32)
    assert row_buckets(6) == (2, 4, 8)
    assert [padded_rows(n, (2, 4, 8)) for n in (1, 2, 3, 5, 8, 9, 17)] == [2, 2, 4, 8, 8, 16, 24]
    assert [padded_rows(n, None) for n in (1, 3, 7)] == [2, 3, 7]  # dynamic rows: only 1 -> 2


# --- the compiled UNet ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models():
    """(eager, compiled): one loaded model (its own: LoRAs change it), two views of its UNet.
    Buckets on, as under CUDA graphs, so that padding is exercised (2, 4, 8, then 16, 24...)."""
    torch._dynamo.reset()
    eager = load_model(MODEL_DIR)
    parts = compile_unet(eager.unet, CompileOptions(max_rows=8, buckets=True), name="tiny-shapes")
    compiled = dataclasses.replace(eager, name="tiny-shapes-compiled", unet_parts=parts)
    return eager, compiled


def _inputs(unet, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    return (torch.randn(rows, unet.config.in_channels, size, size, generator=generator),
            torch.linspace(999, 1, rows),
            torch.randn(rows, 77, unet.config.cross_attention_dim, generator=generator))


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 8, 11])  # 3, 6, 11 pad (11 beyond the largest bucket)
def test_parts_equal_eager_and_padding_never_leaks(models, rows):
    eager, compiled = models
    unet, parts = eager.unet, compiled.unet_parts
    sample, timestep, ehs = _inputs(unet, rows, seed=rows)
    with torch.inference_mode():
        head = parts.head(unet, sample, timestep, ehs)
        reference = run_head(unet, sample, timestep, ehs)
        for got, want in [(head.emb, reference.emb), (head.stem, reference.stem),
                          (head.hidden, reference.hidden)]:
            assert got.shape == want.shape  # the padding rows are gone
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        tail = parts.tail(unet, head)
        torch.testing.assert_close(tail, run_tail(unet, reference), atol=1e-4, rtol=1e-4)
        out = parts.out(unet, tail)
        assert out.shape[0] == rows
        torch.testing.assert_close(out, run_out(unet, run_tail(unet, reference)), atol=1e-4, rtol=1e-4)
        # a row's output is its own: the first row alone (padded otherwise) equals it in the batch
        alone = parts.whole(unet, sample[:1], timestep[:1], ehs[:1])
        torch.testing.assert_close(alone[0], out[0], atol=1e-4, rtol=1e-4)


def _run(model, requests, together: bool = True):
    async def go():
        engine = DenoiseEngine(max_batch_rows=16)
        try:
            if together:
                return await asyncio.gather(*(engine.submit(model, c, p) for c, p in requests))
            return [await engine.submit(model, c, p) for c, p in requests]
        finally:
            await engine.close()

    return asyncio.run(go())


def _requests(model, cache: FirstBlockCacheConfig | None, count: int = 3):
    with torch.inference_mode():
        conditioning = encode_prompts(model, PROMPTS[:count], [None] * count)
    size = model.native_size
    return [(c, DenoiseParams(size, size, steps=STEPS, seed=i, cache=cache))
            for i, c in enumerate(conditioning)]


@pytest.mark.parametrize("cache", [None, FirstBlockCacheConfig(threshold=0.2)], ids=["cache-off", "cache-on"])
def test_engine_latents_equal_eager_and_alone(models, cache):
    eager, compiled = models
    requests = _requests(eager, cache)  # 3 guided requests: 6 rows, padded to 8
    want = _run(eager, requests)
    got = _run(compiled, requests)
    alone = _run(compiled, requests[1:2])[0]  # the middle request by itself (2 rows)
    for w, g in zip(want, got):
        torch.testing.assert_close(g.latents, w.latents, atol=ATOL, rtol=0)
        assert g.cache_decisions == w.cache_decisions
    torch.testing.assert_close(alone.latents, got[1].latents, atol=ATOL, rtol=0)
    assert alone.cache_decisions == got[1].cache_decisions
    if cache is not None:
        assert sum(r.steps_cached for r in got) > 0  # the split path ran, tail over the misses only


def test_eager_is_the_default_and_unchanged(models):
    eager, _ = models
    assert eager.unet_parts is EAGER
    assert load_model(MODEL_DIR, components=("unet",)).unet_parts is EAGER


def test_lora_sets_switch_without_recompiles_and_match_eager(models, tmp_path, capsys):
    """LAST in the module: the slot adapter changes the shared UNet's modules. The compiled
    model takes its LoRAs through one slot (``pipeline.lora_slot``); a separately loaded eager
    model, holding them as separate peft adapters, gives the reference."""
    _, compiled = models
    reference = load_model(MODEL_DIR)
    write_lora_pair(reference, tmp_path, "a", seed=1)
    write_lora_pair(reference, tmp_path, "c", seed=3)
    eager_manager = AdapterManager(reference, LoraLibrary(tmp_path), max_loaded=2)
    compiled_manager = AdapterManager(compiled, LoraLibrary(tmp_path), max_loaded=2)
    assert eager_manager.slot is None and compiled_manager.slot is not None
    requests = _requests(reference, None, count=2)
    sets = ([("a_kohya", 1.0)], [("c_peft", 1.0)], [("a_kohya", 1.0), ("c_peft", 0.5)],
            [("a_kohya", 0.5)], [])
    graphs = []
    for _ in range(2):  # every set twice: the second time round nothing may compile
        for loras in sets:
            eager_manager.activate(loras)  # the engine's activate_adapters, before each forward
            compiled_manager.activate(loras)
            want = _run(reference, requests)
            got = _run(compiled, requests)
            for w, g in zip(want, got):
                torch.testing.assert_close(g.latents, w.latents, atol=ATOL, rtol=0)
        graphs.append(recompiles())
    with capsys.disabled():
        print(f"\ncompiled graphs after each round over 5 LoRA sets: {graphs}; "
              f"slot rank {compiled_manager.slot.rank}, rebuilt {compiled_manager.slot.rebuilds}x")
    assert graphs[1] == graphs[0]
    assert compiled_manager.slot.rebuilds == 1  # made at the first LoRA, big enough for every set
