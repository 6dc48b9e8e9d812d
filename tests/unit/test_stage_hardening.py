"""The stages' side of issue 13, in process: a diverging request fails alone with a clear error,
LoRA files load before the step that needs them (off the UNet's thread), finished latents leave
the device on the runner's thread, and a checkpoint replaced under the same name is reloaded."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from deployments.model_store import ModelSlot, ModelStore
from deployments.torch_worker import TorchWorker
from deployments.settings import StageSettings
from pipeline.conditioning import encode_prompts
from pipeline.denoise import FiniteWatch, Trajectory
from pipeline.request_params import DenoiseParams
from pipeline.engine import DenoiseEngine
from pipeline.errors import InvalidRequestError
from pipeline.library import LoraLibrary, files_version
from pipeline.loading import load_model
from pipeline.lora import AdapterManager
from tests.unit.denoising import denoise
from tools.checkpoint_writer import save_checkpoint
from tools.random_models import write_lora_pair
from tools.tiny_shapes import MODEL_DIR

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def _run(engine: DenoiseEngine, *submissions):
    """Submit each (model, conditioning, params, adapters) at once; results or exceptions."""
    async def run():
        try:
            return await asyncio.wait_for(asyncio.gather(
                *(engine.submit(*s) for s in submissions), return_exceptions=True), 120)
        finally:
            await engine.close()

    return asyncio.run(run())


def test_finite_watch_finds_nan_and_inf_on_the_cpu_at_once():
    watch = FiniteWatch()
    assert watch.watch(torch.zeros(1, 4, 8, 8), 1) is None
    bad = torch.zeros(1, 4, 8, 8)
    bad[0, 1, 2, 3] = float("nan")
    assert watch.watch(bad, 2) == 2
    bad[0, 1, 2, 3] = float("inf")
    assert FiniteWatch().watch(bad, 5) == 5


def test_the_runner_leaves_finished_latents_on_the_cpu(builtin_model):
    (conditioning,) = encode_prompts(builtin_model, PROMPTS[:1], [None])
    trajectory = Trajectory(builtin_model, conditioning, DenoiseParams(64, 64, steps=3, seed=1))
    from pipeline.engine.runner import run_step
    while not trajectory.done:
        assert trajectory.final is None
        run_step([trajectory])
    assert trajectory.final.device.type == "cpu" and trajectory.diverged_at is None
    assert torch.equal(trajectory.final, trajectory.latents.cpu())


def test_a_diverging_request_fails_alone_and_early_naming_guidance(builtin_model):
    """Guidance 1e30 turns the latents into NaN: that request fails with a 4xx-kind error naming
    guidance_scale well before its last step, and its batch-mate gets its solo result."""
    good_c, bad_c = encode_prompts(builtin_model, PROMPTS, [None, None])
    good = DenoiseParams(64, 64, steps=8, seed=3)
    bad = DenoiseParams(64, 64, steps=40, seed=4, guidance_scale=1e30)
    steps_seen: list[int] = []
    engine = DenoiseEngine(max_batch_rows=8)
    result, error = _run(engine, (builtin_model, good_c, good),
                         (builtin_model, bad_c, bad, (), lambda done, total: steps_seen.append(done)))
    assert isinstance(error, InvalidRequestError) and error.field == "guidance_scale", error
    assert "diverged" in error.message
    assert len(steps_seen) < 5  # stopped at once on the CPU, not after all 40 steps
    assert torch.allclose(result.latents, denoise(builtin_model, good_c, good).cpu(), atol=1e-4)
    assert engine.active == []


@pytest.fixture()
def lora_setup(builtin_model, tmp_path):
    write_lora_pair(builtin_model, tmp_path, "a", seed=1)
    (tmp_path / "broken.safetensors").write_bytes(os.urandom(256))
    model = load_model(MODEL_DIR, components=("unet",))  # as a Denoiser holds it
    return model, AdapterManager(model, LoraLibrary(tmp_path))


def _engine_with(manager: AdapterManager, log: list) -> DenoiseEngine:
    """An engine wired as the Denoiser wires it: files read at admission, activation at the step."""
    def read(model, loras):
        log.append(("read", threading.current_thread().name))
        prepared = manager.read(loras)
        return lambda: manager.load(loras, prepared)

    def activate(model, loras):
        before = manager.loads
        manager.activate(loras)
        log.append(("activate", manager.loads - before))

    return DenoiseEngine(max_batch_rows=8, activate_adapters=activate, read_adapters=read)


def test_lora_files_load_before_the_step_and_off_the_unet_thread(builtin_model, lora_setup):
    model, manager = lora_setup
    (conditioning,) = encode_prompts(builtin_model, PROMPTS[:1], [None])
    params = DenoiseParams(64, 64, steps=4, seed=2)
    log: list = []
    (result,) = _run(_engine_with(manager, log), (model, conditioning, params, (("a_peft", 1.0),)))
    assert not isinstance(result, Exception), result
    assert ("read", "lora-read_0") in log
    assert [entry for entry in log if entry[0] == "activate"] == [("activate", 0)] * 4  # no loads
    assert manager.loads == 1


def test_a_lora_that_cannot_load_fails_its_request_alone_at_admission(builtin_model, lora_setup):
    model, manager = lora_setup
    good_c, bad_c = encode_prompts(builtin_model, PROMPTS, [None, None])
    params = DenoiseParams(64, 64, steps=4, seed=2)
    log: list = []
    engine = _engine_with(manager, log)
    result, error, unknown = _run(engine, (model, good_c, params, (("a_kohya", 0.5),)),
                                  (model, bad_c, params, (("broken", 1.0),)),
                                  (model, bad_c, params, (("missing", 1.0),)))
    assert not isinstance(result, Exception), result
    assert isinstance(error, InvalidRequestError) and error.field == "loras", error
    assert "not a readable safetensors LoRA" in error.message
    assert isinstance(unknown, InvalidRequestError) and unknown.field == "loras", unknown
    assert engine.forwards == 4  # only the good request ever stepped


def test_a_huge_lora_weight_diverges_naming_loras(builtin_model, lora_setup):
    model, manager = lora_setup
    (conditioning,) = encode_prompts(builtin_model, PROMPTS[:1], [None])
    engine = _engine_with(manager, [])
    (error,) = _run(engine, (model, conditioning, DenoiseParams(64, 64, steps=8, seed=2),
                             (("a_peft", 1e30),)))
    assert isinstance(error, InvalidRequestError) and error.field == "loras", error
    assert "diverged" in error.message


def altered_checkpoint(path) -> None:
    """The built-in model with other UNet and text-encoder weights, under ``path``."""
    model = load_model(MODEL_DIR)
    with torch.no_grad():
        model.unet.conv_out.weight.mul_(0.7)
        norm = next(m for n, m in model.text_encoders[0].named_modules() if n.endswith("final_layer_norm"))
        norm.bias.add_(0.5)
    save_checkpoint(model, path)


def test_files_version_changes_when_a_checkpoint_is_rewritten_in_place(tmp_path):
    path = save_checkpoint(MODEL_DIR, tmp_path / "m.safetensors")
    before = files_version(path)
    assert files_version(path) == before
    altered_checkpoint(path)  # same size, same inode: the mtime tells
    assert files_version(path) != before
    assert files_version(MODEL_DIR) == files_version(MODEL_DIR)
    assert len(files_version(MODEL_DIR)) > 3  # every file of a diffusers folder


def test_the_model_store_reloads_a_checkpoint_replaced_under_its_name(tmp_path):
    """ModelStore's version check, in process (the multiplexer needs a replica; a slot is what
    it would hold): the same model while the file is unchanged, the new weights once replaced."""
    save_checkpoint(MODEL_DIR, tmp_path / "swap.safetensors")
    settings = StageSettings(model_paths={}, checkpoints_dir=str(tmp_path), default_model="swap",
                             accelerator="cpu")
    store = ModelStore(settings, TorchWorker(), ("unet",))
    slot = ModelSlot("swap")

    async def current():
        return await store._current(slot)

    first = asyncio.run(current())
    assert asyncio.run(current()) is first
    altered_checkpoint(tmp_path / "swap.safetensors")
    second = asyncio.run(current())
    assert second is not first and store.version_of(second) != store.version_of(first)
    assert torch.allclose(second.unet.conv_out.weight, first.unet.conv_out.weight * 0.7, atol=1e-6)
    assert asyncio.run(current()) is second
