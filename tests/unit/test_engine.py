"""The step-level batching engine, in process: invariance, batching, cancellation."""
from __future__ import annotations

import asyncio
from typing import NamedTuple

import numpy as np
import torch

from pipeline.conditioning import Conditioning, encode_prompts
from pipeline.vae import decode_latents
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.unet.cache_config import FirstBlockCacheConfig
from tests.unit.denoising import denoise

PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a black triangle on a yellow background", "a purple circle on an orange background",
           "a white square on a black background", "a yellow triangle on a green background",
           "a blue circle on a red background", "an orange square on a purple background"]
SAMPLERS = ["Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDIM", "UniPC", "Euler", "Euler a"]


class Recorder:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def on_forward(self, model, step, seconds):
        self.rows.append(step.rows)

    def on_finished(self, model, result):
        pass

    def on_cancelled(self, model):
        pass

    def on_active(self, count):
        pass


THRESHOLDS = [0.0, 0.05, 0.1, 0.2, 0.0, 0.3, 0.1, 0.15]


class Request(NamedTuple):
    """What a test submits: ``engine.submit(model, *request)``."""

    conditioning: Conditioning
    params: DenoiseParams
    adapters: tuple = ()


def _requests(model):
    conditionings = encode_prompts(model, PROMPTS, [None] * len(PROMPTS))
    return [Request(c, DenoiseParams(
                64, 64, steps=6 + 2 * i, seed=100 + i, sampler=SAMPLERS[i], guidance_scale=1.0 + i,
                cache=FirstBlockCacheConfig(threshold=THRESHOLDS[i], max_consecutive_hits=2 + i % 2)))
            for i, c in enumerate(conditionings)]


def _solo(model, request):
    async def run():
        engine = DenoiseEngine()
        result = await asyncio.wait_for(engine.submit(model, *request), 60)
        await engine.close()
        return result

    return asyncio.run(run())


def test_each_request_gets_its_solo_result_amid_others(builtin_model):
    requests = _requests(builtin_model)
    recorder = Recorder()

    async def run():
        engine = DenoiseEngine(max_batch_rows=10, observer=recorder)
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.submit(builtin_model, *r) for r in requests)), 120)
        await engine.close()
        return results, engine.forwards

    results, forwards = asyncio.run(run())
    assert forwards < sum(r.params.steps for r in requests)  # steps were shared
    assert max(recorder.rows) <= 10 and max(recorder.rows) > 2
    assert sum(r.steps_cached for r in results) > 0  # the caches did skip steps
    for request, result in zip(requests, results):
        solo = _solo(builtin_model, request)
        assert result.cache_decisions == solo.cache_decisions
        assert torch.allclose(result.latents, solo.latents, atol=1e-4)
        diff = np.abs(decode_latents(builtin_model, result.latents).astype(int)
                      - decode_latents(builtin_model, solo.latents).astype(int))
        assert diff.max() <= 1
        assert result.steps_computed + result.steps_cached == request.params.steps
        if request.params.cache.threshold == 0:  # cache off: exactly the in-process pipeline
            assert result.steps_cached == 0
            plain = denoise(builtin_model, request.conditioning, request.params)
            assert torch.allclose(result.latents, plain, atol=1e-4)


def test_cancelled_request_stops_using_the_unet(builtin_model):
    long, short = _requests(builtin_model)[:2]
    long = long._replace(params=DenoiseParams(64, 64, steps=200, seed=1))

    async def run():
        engine = DenoiseEngine(max_batch_rows=8)
        task = asyncio.ensure_future(engine.submit(builtin_model, *long))
        while engine.forwards < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        (record,) = engine.active  # the long request's, the only one in flight
        forwards_at_cancel = record.steps_done
        await asyncio.wait_for(engine.submit(builtin_model, *short), 60)  # the engine goes on serving
        await engine.close()
        return record, forwards_at_cancel

    record, at_cancel = asyncio.run(run())
    assert record.steps_done <= at_cancel + 1  # at most the step already running
    assert record.steps_done < 20


def test_a_request_is_counted_cancelled_even_if_the_loop_drops_it_first(builtin_model):
    """Cancelling a caller cancels the future it awaits at once; the loop may drop the request
    before the caller's task runs again, and must still count it as cancelled."""
    (long,) = _requests(builtin_model)[:1]
    long = long._replace(params=DenoiseParams(64, 64, steps=200, seed=1))

    async def run() -> int:
        engine = DenoiseEngine(max_batch_rows=8)
        task = asyncio.ensure_future(engine.submit(builtin_model, *long))
        while engine.forwards < 1:
            await asyncio.sleep(0.005)
        task.cancel()
        engine._drop_cancelled()  # before the cancelled task has run its except clause
        cancelled = engine.cancelled
        await asyncio.gather(task, return_exceptions=True)
        await engine.close()
        return cancelled

    assert asyncio.run(run()) == 1


def test_requests_with_different_loras_in_flight_at_once_each_get_their_solo_result(builtin_model, tmp_path):
    from pipeline.library import LoraLibrary
    from pipeline.lora import AdapterManager
    from pipeline.loading import load_model
    from tools.random_models import write_lora_pair
    from tools.tiny_shapes import MODEL_DIR

    model = load_model(MODEL_DIR, components=("unet",))  # as a Denoiser holds it; adapters change it
    write_lora_pair(builtin_model, tmp_path, "a", seed=1)
    write_lora_pair(builtin_model, tmp_path, "b", seed=2)
    manager = AdapterManager(model, LoraLibrary(tmp_path))
    conditionings = encode_prompts(builtin_model, PROMPTS[:3], [None] * 3)
    sets = [(("a_peft", 1.0),), (("b_kohya", 0.7),), ()]
    requests = [Request(c, DenoiseParams(64, 64, steps=8, seed=5 + i), adapters=s)
                for i, (c, s) in enumerate(zip(conditionings, sets))]
    recorder = Recorder()

    async def run(batch, max_batch_rows=32):
        engine = DenoiseEngine(max_batch_rows=max_batch_rows, observer=recorder,
                               activate_adapters=lambda m, loras: manager.activate(loras))
        results = await asyncio.wait_for(asyncio.gather(*(engine.submit(model, *r) for r in batch)), 120)
        await engine.close()
        return results

    together = asyncio.run(run(requests))
    assert max(recorder.rows) == 2  # different LoRA sets never share a forward
    solos = [asyncio.run(run([r]))[0] for r in requests]
    for request, result, solo in zip(requests, together, solos):
        assert torch.equal(result.latents, solo.latents), request.adapters
    assert not torch.allclose(together[0].latents, together[2].latents, atol=1e-3)  # LoRA did something


def test_requests_finishing_out_of_submission_order_all_complete(builtin_model):
    """The request that finishes first is not the first in the engine's list (a regression: the
    lookup once compared requests field by field, tensors included, and killed the loop)."""
    conditionings = encode_prompts(builtin_model, PROMPTS[:4], [None] * 4)
    requests = [Request(c, DenoiseParams(64, 64, steps=12 - 3 * i, seed=i))
                for i, c in enumerate(conditionings)]

    async def run():
        engine = DenoiseEngine(max_batch_rows=8)
        results = await asyncio.wait_for(
            asyncio.gather(*(engine.submit(builtin_model, *r) for r in requests)), 60)
        await engine.close()
        return results

    results = asyncio.run(run())
    assert [r.steps_computed for r in results] == [12, 9, 6, 3]
