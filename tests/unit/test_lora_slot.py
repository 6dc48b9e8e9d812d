"""The LoRA slot of a compiled UNet (``pipeline.lora_slot``), checked on eager modules: a set
written into the one slot adapter gives what the set's LoRAs give as separate adapters, and
switching sets leaves the UNet's modules as they were (what keeps dynamo from recompiling; the
compiled check itself is ``test_compiled_unet.py``'s last test)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig

from pipeline.conditioning import encode_prompts
from pipeline.errors import InvalidRequestError
from pipeline.library import LoraLibrary
from pipeline.loading import load_model
from pipeline.lora import AdapterManager
from pipeline.lora_slot import SLOT, take_factors
from pipeline.request_params import DenoiseParams
from pipeline.unet.parts import UNetParts
from tools.random_models import write_lora_pair
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL

from tests.unit.denoising import denoise

SETS = ([("a_kohya", 1.0)], [("c_peft", 1.0)], [("a_kohya", 1.0), ("c_peft", 0.5)],
        [("a_peft", 0.5)], [], [("c_kohya", -1.0)], [("a_kohya", 1.0), ("d_peft", 0.7)])


class _FlaggedCompiled(UNetParts):
    """Eager parts flagged as compiled: the manager uses the slot, the forward stays eager."""

    compiled = True


@pytest.fixture(scope="module")
def loras(tmp_path_factory, builtin_model):
    folder = tmp_path_factory.mktemp("loras")
    write_lora_pair(builtin_model, folder, "a", seed=1)
    write_lora_pair(builtin_model, folder, "c", seed=3, rank=8)
    write_lora_pair(builtin_model, folder, "d", seed=4, rank=32)
    return LoraLibrary(folder)


def _latents(model, conditioning) -> torch.Tensor:
    size = model.native_size
    return denoise(model, conditioning, DenoiseParams(size, size, steps=3, seed=7))


def test_sets_through_the_slot_equal_separate_adapters_and_keep_the_modules(loras, builtin_model):
    conditioning = encode_prompts(builtin_model, ["a red circle on a blue background"], [None])[0]
    separate = load_model(BUILTIN_MODEL, components=("unet",))
    slotted = dataclasses.replace(load_model(BUILTIN_MODEL, components=("unet",)),
                                  unet_parts=_FlaggedCompiled())
    separate_manager = AdapterManager(separate, loras)
    slot_manager = AdapterManager(slotted, loras)
    structures = []
    for loras_set in (*SETS, *SETS):
        separate_manager.activate(loras_set)
        slot_manager.activate(loras_set)
        torch.testing.assert_close(_latents(slotted, conditioning), _latents(separate, conditioning),
                                   atol=1e-4, rtol=0)
        structures.append([name for name, _ in slotted.unet.named_modules()])
        assert set(slotted.unet.peft_config) == {SLOT}  # the LoRAs themselves never stay in the UNet
    assert all(structure == structures[0] for structure in structures[1:])
    # made at the first LoRA (rank 32: every set fits) and grown once, for a + d (4 + 32 -> 64)
    assert (slot_manager.slot.rank, slot_manager.slot.rebuilds) == (64, 2)


def test_a_lora_that_is_not_two_factors_is_refused_naming_loras():
    unet = load_model(BUILTIN_MODEL, components=("unet",)).unet
    unet.add_adapter(LoraConfig(r=4, use_dora=True, target_modules=["to_q"]), adapter_name="dora")
    with pytest.raises(InvalidRequestError) as refused:
        take_factors(unet, "dora", "my_dora")
    assert refused.value.field == "loras" and "my_dora" in refused.value.message
