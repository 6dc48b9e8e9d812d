"""LoRAs: kohya and diffusers/peft files as peft adapters, switching sets, LRU, safe names, prompt tags."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.errors import InvalidRequestError, NotFoundError
from pipeline.library import CheckpointLibrary, LoraLibrary
from pipeline.loading import load_model
from pipeline.lora import AdapterManager
from pipeline.lora_set import normalize_loras
from pipeline.prompt_loras import parse_prompt_loras
from tools.checkpoint_writer import unet_to_ldm
from tools.random_models import write_lora_pair
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL

from tests.unit.denoising import denoise

PROMPT = "a red circle on a blue background"


def latents(model, prompt: str = PROMPT, steps: int = 3) -> torch.Tensor:
    conditioning = encode_prompts(model, [prompt], [None])[0]
    size = model.native_size
    return denoise(model, conditioning, DenoiseParams(size, size, steps=steps, seed=7))


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    reference = load_model(BUILTIN_MODEL)
    write_lora_pair(reference, folder, "a", seed=1)
    write_lora_pair(reference, folder, "b", seed=2, text_targets=("q_proj", "v_proj"))  # no out_proj
    write_lora_pair(reference, folder, "c", seed=3)
    return folder


@pytest.fixture(scope="module")
def baseline():
    return latents(load_model(BUILTIN_MODEL))


@pytest.fixture
def fresh(lora_dir):
    """A model of its own (adapters change it) and a manager on it."""
    model = load_model(BUILTIN_MODEL)
    return model, AdapterManager(model, LoraLibrary(lora_dir), max_loaded=2)


def test_weight_zero_is_no_lora_and_a_lora_changes_the_output(fresh, baseline):
    model, manager = fresh
    with_lora = (manager.activate([("a_kohya", 1.0)]), latents(model))[1]
    assert not torch.allclose(with_lora, baseline, atol=1e-3)
    assert manager.activate([("a_kohya", 0.0)]) == ()
    assert torch.equal(latents(model), baseline)
    manager.activate([])
    assert torch.equal(latents(model), baseline)


def test_kohya_and_peft_files_give_the_same_output(fresh):
    model, manager = fresh
    manager.activate([("a_kohya", 0.8)])
    kohya = latents(model)
    manager.activate([("a_peft", 0.8)])
    torch.testing.assert_close(latents(model), kohya, rtol=1e-4, atol=1e-4)
    embeds = {}
    for lora in ["b_kohya", "b_peft"]:  # text-encoder LoRAs without out_proj: diffusers' blind spot
        manager.activate([(lora, 1.0)])
        embeds[lora] = encode_prompts(model, [PROMPT], [None])[0].prompt_embeds
    torch.testing.assert_close(embeds["b_kohya"], embeds["b_peft"], rtol=1e-5, atol=1e-5)


def test_switching_sets_equals_fresh_loads_and_the_lru_evicts(fresh, lora_dir):
    model, manager = fresh
    first_a = (manager.activate([("a_peft", 1.0)]), latents(model))[1]
    only_b = (manager.activate([("b_peft", 1.0)]), latents(model))[1]
    assert manager.loaded == ("a_peft", "b_peft")
    both = (manager.activate([("b_peft", 1.0), ("a_peft", 0.5)]), latents(model))[1]
    assert manager.loads == 2  # switching sets reloads nothing
    manager.activate([("c_peft", 1.0)])  # room for two: a (least recently used) goes
    assert manager.loaded == ("b_peft", "c_peft") and manager.loads == 3
    assert set(model.unet.peft_config) == {"lora_2", "lora_3"}
    again_a = (manager.activate([("a_peft", 1.0)]), latents(model))[1]
    assert manager.loaded == ("c_peft", "a_peft") and manager.loads == 4
    assert torch.equal(again_a, first_a)

    other = load_model(BUILTIN_MODEL)
    fresh_manager = AdapterManager(other, LoraLibrary(lora_dir))
    assert torch.equal((fresh_manager.activate([("b_peft", 1.0)]), latents(other))[1], only_b)
    fresh_manager.activate([("a_peft", 0.5), ("b_peft", 1.0)])
    torch.testing.assert_close(latents(other), both, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidRequestError, match="at most 2"):
        manager.activate([("a_peft", 1.0), ("b_peft", 1.0), ("c_peft", 1.0)])


def test_loras_go_into_the_components_the_model_holds(lora_dir, sdxl_folder, tmp_path):
    unet_only = load_model(BUILTIN_MODEL, components=("unet",))
    AdapterManager(unet_only, LoraLibrary(lora_dir)).activate([("a_kohya", 1.0)])
    assert set(unet_only.unet.peft_config) == {"lora_1"}
    text_only = load_model(BUILTIN_MODEL, components=("text_encoders",))
    AdapterManager(text_only, LoraLibrary(lora_dir)).activate([("a_kohya", 1.0)])
    assert set(text_only.text_encoders[0].peft_config) == {"lora_1"}
    # SDXL's kohya UNet names are mapped with the UNet's config, which a text-encoding stage
    # has without the UNet
    reference = load_model(sdxl_folder)
    write_lora_pair(reference, tmp_path, "xl", seed=4, unet_keys=lambda name: next(iter(
        unet_to_ldm({name + ".weight": torch.zeros(1)}, reference.unet.config))).removesuffix(".weight"))
    xl_text = load_model(sdxl_folder, components=("text_encoders",))
    AdapterManager(xl_text, LoraLibrary(tmp_path)).activate([("xl_kohya", 1.0)])
    assert all(set(e.peft_config) == {"lora_1"} for e in xl_text.text_encoders)


def test_a_lora_that_does_not_fit_is_refused_and_the_model_still_works(fresh, lora_dir, baseline):
    model, manager = fresh
    manager.activate([("a_peft", 1.0)])
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 999),
               "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(999, 4)},
              lora_dir / "misfit.safetensors")
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, lora_dir / "loha.safetensors")
    with pytest.raises(InvalidRequestError, match="misfit: does not fit"):
        manager.activate([("misfit", 1.0)])
    with pytest.raises(InvalidRequestError, match="loha: not a LoRA"):
        manager.activate([("loha", 1.0)])
    manager.activate([])
    assert torch.equal(latents(model), baseline)
    assert set(model.unet.peft_config) == {"lora_1"}


def test_sdxl_kohya_sgm_names_and_peft_agree(sdxl_folder, tmp_path):
    model = load_model(sdxl_folder)
    write_lora_pair(model, tmp_path, "xl", seed=4, unet_keys=lambda name: next(iter(
        unet_to_ldm({name + ".weight": torch.zeros(1)}, model.unet.config))).removesuffix(".weight"))
    manager = AdapterManager(model, LoraLibrary(tmp_path))
    plain = latents(model, steps=2)
    kohya = (manager.activate([("xl_kohya", 1.0)]), latents(model, steps=2))[1]
    assert set(model.text_encoders[1].peft_config) == {"lora_1"}
    peft = (manager.activate([("xl_peft", 1.0)]), latents(model, steps=2))[1]
    assert not torch.allclose(kohya, plain, atol=1e-3)
    torch.testing.assert_close(peft, kohya, rtol=1e-4, atol=1e-4)


def test_normalize_loras_makes_one_key_per_effective_set():
    assert normalize_loras([("b", 1), ("a", 0.5), ("z", 0), ("a", 0.25)]) == (("a", 0.75), ("b", 1.0))
    assert normalize_loras([("a", 1), ("a", -1)]) == ()


def test_lora_library_names_and_refusals(tmp_path):
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file({"x": torch.zeros(1)}, loras / "style.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "secret.safetensors")
    os.symlink(tmp_path / "secret.safetensors", loras / "escape.safetensors")
    (loras / "old.pt").write_bytes(b"never read")
    library = LoraLibrary(loras)
    assert library.names() == ["style"]
    assert library.resolve("style") == library.resolve("style.safetensors") == (loras / "style.safetensors").resolve()
    for bad in ["../secret", "sub/style", "/etc/passwd", "..", "a\\b", "", ".hidden"]:
        with pytest.raises(InvalidRequestError) as caught:
            library.resolve(bad)
        assert not isinstance(caught.value, NotFoundError) and caught.value.field == "loras"
    with pytest.raises(InvalidRequestError, match="outside"):
        library.resolve("escape")
    with pytest.raises(InvalidRequestError, match="pickle"):
        library.resolve("old")
    with pytest.raises(NotFoundError, match="'nope'") as caught:
        library.resolve("nope")
    assert caught.value.field == "loras"
    assert LoraLibrary(tmp_path / "absent").names() == []


def test_checkpoint_library_lists_files_and_folders(tmp_path):
    (tmp_path / "xl.safetensors").write_bytes(b"")
    (tmp_path / "tiny").symlink_to(BUILTIN_MODEL)  # a folder elsewhere: refused when resolved
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "model_index.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    library = CheckpointLibrary(tmp_path)
    assert library.names() == ["local", "xl"]
    assert library.resolve("xl") == (tmp_path / "xl.safetensors").resolve()
    assert library.resolve("local") == (tmp_path / "local").resolve()
    with pytest.raises(InvalidRequestError, match="outside"):
        library.resolve("tiny")
    with pytest.raises(NotFoundError, match="'notes'"):
        library.resolve("notes")
    with pytest.raises(InvalidRequestError):
        library.resolve("../xl")


@pytest.mark.parametrize("prompt, clean, loras", [
    ("a cat <lora:pixel:0.7>, best", "a cat , best", [("pixel", 0.7)]),
    ("<lora:one> a dog <LORA:two:-1.5>", "a dog", [("one", 1.0), ("two", -1.5)]),
    ("no tags,  as  written", "no tags,  as  written", []),
    ("<lora: spaced name :.5>x", "x", [("spaced name", 0.5)]),
    ("at the bound <lora:edge:-10>", "at the bound", [("edge", -10.0)]),
])
def test_prompt_lora_tags_are_parsed_and_stripped(prompt, clean, loras):
    assert parse_prompt_loras(prompt) == (clean, loras)


@pytest.mark.parametrize("prompt", ["<lora:x:heavy>", "<lora::1>", "<lora:x:1:0.5>", "<lora:x:nan>",
                                    "<lora:x:1e30>", "<lora:x:-10.5>", "<lora:x:inf>"])
def test_bad_prompt_lora_tags_name_the_prompt(prompt):
    with pytest.raises(InvalidRequestError) as caught:
        parse_prompt_loras(prompt)
    assert caught.value.field == "prompt"
