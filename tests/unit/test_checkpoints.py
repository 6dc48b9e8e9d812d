"""Single-file checkpoints: written in the original layout, loaded back offline into the same model."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.checkpoints.layout import METADATA_KEY
from pipeline.checkpoints.configs import unet_dimensions, vae_dimensions
from pipeline.checkpoints.layout import detect_family, read_header, with_prefix
from pipeline.clip_tokenizer import clip_tokenizer
from pipeline.conditioning import encode_prompts
from pipeline.request_params import DenoiseParams
from pipeline.errors import ModelLoadError, UnsafeWeightsError
from pipeline.generate import generate
from pipeline.loading import load_model
from pipeline.model_files import describe_model
from tools.checkpoint_writer import save_checkpoint
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def builtin_file(builtin_model, tmp_path_factory):
    return save_checkpoint(builtin_model, tmp_path_factory.mktemp("ckpt") / "tiny-shapes.safetensors")


@pytest.fixture(scope="module")
def sdxl_file(sdxl_model, tmp_path_factory):
    return save_checkpoint(sdxl_model, tmp_path_factory.mktemp("ckpt") / "xl.safetensors")


def _rewrite(source, target, *, drop_settings: tuple[str, ...] = (), tensors=None):
    """A copy of ``source`` with some of its settings removed and tensors replaced."""
    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
    settings = json.loads(metadata[METADATA_KEY])
    for key in drop_settings:
        settings.pop(key, None)
    save_file({**load_file(source), **(tensors or {})}, target,
              metadata={**metadata, METADATA_KEY: json.dumps(settings)})
    return target


def test_builtin_model_round_trips_to_the_same_images(builtin_model, builtin_file):
    loaded = load_model(builtin_file)
    assert (loaded.family, loaded.name, loaded.native_size) == ("sd15", "tiny-shapes", 64)
    for ours, theirs in [(loaded.unet, builtin_model.unet), (loaded.vae, builtin_model.vae),
                         (loaded.text_encoders[0], builtin_model.text_encoders[0])]:
        expected = theirs.state_dict()
        assert ours.state_dict().keys() == expected.keys()
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items())
    assert loaded.tokenizers[0](PROMPT).input_ids == builtin_model.tokenizers[0](PROMPT).input_ids
    params = DenoiseParams(64, 64, steps=4, seed=3)
    expected, got = generate(builtin_model, PROMPT, params), generate(loaded, PROMPT, params)
    assert torch.equal(got.latents, expected.latents)
    assert (got.pixels == expected.pixels).all()


def test_sdxl_model_round_trips_to_the_same_latents(sdxl_model, sdxl_file):
    loaded = load_model(sdxl_file)
    assert loaded.family == "sdxl" and loaded.force_zeros_for_empty_prompt
    assert [type(e).__name__ for e in loaded.text_encoders] == ["CLIPTextModel", "CLIPTextModelWithProjection"]
    params = DenoiseParams(64, 64, steps=3, seed=5)
    assert torch.equal(generate(loaded, PROMPT, params).latents, generate(sdxl_model, PROMPT, params).latents)


def test_files_use_the_original_key_layout(builtin_file, sdxl_file):
    sd15, sdxl = read_header(builtin_file).shapes, read_header(sdxl_file).shapes
    assert "model.diffusion_model.input_blocks.0.0.weight" in sd15
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd15  # level 0 upsampler, no attention
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sd15
    assert len(sd15["first_stage_model.encoder.mid.attn_1.q.weight"]) == 4  # 1x1 conv, as LDM has it
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd15
    assert "model.diffusion_model.label_emb.0.0.weight" in sdxl
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in sdxl
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sdxl
    assert (detect_family(sd15), detect_family(sdxl)) == ("sd15", "sdxl")


def test_dimensions_come_from_the_shapes(builtin_model, sdxl_model, builtin_file, sdxl_file):
    for model, path in [(builtin_model, builtin_file), (sdxl_model, sdxl_file)]:
        shapes = read_header(path).shapes
        pooled = shapes.get("conditioner.embedders.1.model.text_projection", (0, None))[1]
        unet = unet_dimensions(with_prefix(shapes, "model.diffusion_model."), pooled)
        for key in ["in_channels", "out_channels", "block_out_channels", "layers_per_block",
                    "down_block_types", "up_block_types", "cross_attention_dim", "use_linear_projection",
                    "addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim"]:
            assert unet[key] == _plain(model.unet.config[key]), key
        vae = vae_dimensions(with_prefix(shapes, "first_stage_model."))
        for key in ["block_out_channels", "layers_per_block", "latent_channels"]:
            assert vae[key] == _plain(model.vae.config[key]), key


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def test_describe_model_reads_no_weights(builtin_file, sdxl_file, sdxl_folder):
    assert describe_model(builtin_file) == describe_model(BUILTIN_MODEL)
    assert (describe_model(BUILTIN_MODEL).native_size, describe_model(BUILTIN_MODEL).vae_scale_factor) == (64, 4)
    assert describe_model(sdxl_file) == describe_model(sdxl_folder)
    assert describe_model(sdxl_file).family == "sdxl"


def test_clip_tokenizers_are_built_offline():
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]  # OpenAI CLIP's ids for this text
    assert clip_tokenizer()("a photo of a cat").input_ids == ids
    padded = clip_tokenizer(pad_token="!")("a cat", padding="max_length", max_length=6).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0]  # SDXL's tokenizer_2 pads with "!" (id 0)


def test_a_file_without_its_tokenizer_gets_clips_when_the_vocabulary_fits(builtin_file, tmp_path):
    with pytest.raises(ModelLoadError, match="571-token vocabulary"):
        load_model(_rewrite(builtin_file, tmp_path / "a.safetensors", drop_settings=("tokenizer",)))
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    clip_sized = _rewrite(builtin_file, tmp_path / "b.safetensors", drop_settings=("tokenizer",),
                          tensors={key: torch.randn(49408, 64)})
    model = load_model(clip_sized)
    assert len(model.tokenizers[0]) == 49408
    assert encode_prompts(model, ["a photo of a cat"], [None])[0].prompt_embeds.shape == (77, 64)
    resaved = read_header(save_checkpoint(model, tmp_path / "c.safetensors")).settings
    assert "tokenizer" not in resaved  # CLIP's own vocabulary is not copied into the file


def test_fp16_files_load_in_the_asked_dtype(builtin_model, tmp_path):
    path = save_checkpoint(builtin_model, tmp_path / "half.safetensors", dtype=torch.float16)
    model = load_model(path)
    assert {p.dtype for p in model.unet.parameters()} == {torch.float32}
    assert model.vae.dtype == torch.float32


def test_pickle_checkpoints_are_refused_unread(tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    for suffix in [".ckpt", ".pt", ".bin"]:
        path = tmp_path / f"model{suffix}"
        path.write_bytes(pickle.dumps(Exploit()))
        with pytest.raises(UnsafeWeightsError, match="pickle"):
            load_model(path)
        with pytest.raises(UnsafeWeightsError, match="pickle"):
            describe_model(path)
    assert not marker.exists()


def test_foreign_files_are_refused_with_the_reason(tmp_path, builtin_file):
    cases = {
        "lora": ({"lora_unet_x.lora_down.weight": torch.zeros(1)}, "a LoRA"),
        "sd2": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                 "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
                 "cond_stage_model.model.token_embedding.weight": torch.zeros(1)}, "SD2"),
        "inpaint": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3),
                     "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, "9 input channels"),
        "novae": ({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)}, "no VAE"),
    }
    for name, (tensors, reason) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        with pytest.raises(ModelLoadError, match=reason):
            load_model(tmp_path / f"{name}.safetensors")
    tensors = load_file(builtin_file)
    del tensors["model.diffusion_model.out.2.weight"]
    save_file(tensors, tmp_path / "cut.safetensors", metadata=safe_open(builtin_file, "pt").metadata())
    with pytest.raises(ModelLoadError, match="incomplete sd15 checkpoint.*out.2.weight"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a readable safetensors"):
        load_model(tmp_path / "junk.safetensors")
