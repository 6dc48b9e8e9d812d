"""``EngineMetrics`` against the real step-batching engine, in process: it implements the
engine's observer protocol and records what the engine did (no Ray needed)."""
from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from deployments import metrics
from deployments.metrics import EngineMetrics
from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine


@pytest.fixture
def recorded(monkeypatch):
    """Every inc/observe/set_gauge as (name, tags) -> list of values."""
    calls: dict[tuple[str, tuple], list[float]] = defaultdict(list)

    def record(name, value=1.0, **tags):
        calls[(name, tuple(sorted(tags.items())))].append(value)

    for fn in ("inc", "observe", "set_gauge"):
        monkeypatch.setattr(metrics, fn, record)
    return calls


def total(calls, name: str, **tags) -> float:
    return sum(sum(values) for (n, t), values in calls.items()
               if n == name and all(dict(t).get(k) == v for k, v in tags.items()))


def count(calls, name: str) -> int:
    return sum(len(values) for (n, _), values in calls.items() if n == name)


def test_engine_metrics_follow_the_engine(builtin_model, recorded):
    (conditioning,) = encode_prompts(builtin_model, ["a red circle on a blue background"], [None])
    steps = (3, 5)

    async def run():
        engine = DenoiseEngine(max_batch_rows=8, observer=EngineMetrics())
        try:
            return await asyncio.wait_for(asyncio.gather(*[
                engine.submit(builtin_model, conditioning, DenoiseParams(64, 64, n, 5.0, seed=n))
                for n in steps]),
                timeout=120)
        finally:
            await engine.close()

    results = asyncio.run(run())
    assert total(recorded, "raydiance_denoise_steps") == sum(steps)
    assert total(recorded, "raydiance_denoise_steps", result="computed") == sum(
        r.steps_computed for r in results)
    assert total(recorded, "raydiance_denoise_requests", result="finished") == len(steps)
    forwards = count(recorded, "raydiance_unet_forward_rows")
    assert max(steps) <= forwards <= sum(steps)  # the two requests shared forwards
    assert total(recorded, "raydiance_unet_forward_rows") == 2 * sum(steps)  # guided: 2 rows each
    assert total(recorded, "raydiance_unet_rows", part="head") == 2 * sum(steps)
    assert count(recorded, "raydiance_denoise_queue_seconds") == len(steps)
    assert count(recorded, "raydiance_stage_latency_seconds") == len(steps)
    gauge = [v for (n, _), values in recorded.items() if n == "raydiance_engine_active_requests"
             for v in values]
    assert gauge[-1] == 0 and max(gauge) == len(steps)


def test_cancelled_requests_are_counted(builtin_model, recorded):
    (conditioning,) = encode_prompts(builtin_model, ["a red circle on a blue background"], [None])

    async def run():
        engine = DenoiseEngine(observer=EngineMetrics())
        task = asyncio.ensure_future(engine.submit(builtin_model, conditioning,
                                                   DenoiseParams(64, 64, 50, 5.0, seed=1)))
        try:
            while engine.forwards < 1:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for _ in range(500):  # the engine drops it before its next step
                if engine.cancelled:
                    break
                await asyncio.sleep(0.01)
        finally:
            await engine.close()

    asyncio.run(asyncio.wait_for(run(), timeout=120))
    assert total(recorded, "raydiance_denoise_requests", result="cancelled") == 1
    assert total(recorded, "raydiance_denoise_requests", result="finished") == 0


def test_engine_metrics_implements_the_observer_protocol():
    """Same methods, same parameters as ``EngineObserver``: a drift fails here, by name."""
    import inspect

    from pipeline.engine import EngineObserver

    for name, method in inspect.getmembers(EngineObserver, inspect.isfunction):
        if name.startswith("_"):
            continue
        ours = getattr(EngineMetrics, name, None)
        assert ours is not None, f"EngineMetrics lacks {name}"
        assert list(inspect.signature(ours).parameters) == list(inspect.signature(method).parameters), name
