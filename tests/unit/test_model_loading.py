"""Loading: diffusers folders and single files of both families, by component, offline, safetensors only."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import MissingComponentError, ModelLoadError, UnsafeWeightsError
from pipeline.loading import load_model
from pipeline.memory import component_bytes
from pipeline.model_configs import COMPONENTS
from tools.checkpoint_writer import save_checkpoint
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL


def test_builtin_model_is_sd15_shaped(builtin_model):
    assert builtin_model.family == "sd15"
    assert builtin_model.native_size == 64
    assert builtin_model.vae_scale_factor == 4
    assert len(builtin_model.text_encoders) == 1


def test_builtin_model_is_small_enough_to_ship():
    size = sum(f.stat().st_size for f in BUILTIN_MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20


def test_sdxl_folder_loads_with_two_encoders(sdxl_model):
    assert sdxl_model.family == "sdxl"
    assert len(sdxl_model.text_encoders) == 2
    assert sdxl_model.force_zeros_for_empty_prompt


def test_pickle_component_is_refused(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(BUILTIN_MODEL, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(UnsafeWeightsError, match="unet/diffusion_pytorch_model.bin.*pickle"):
        load_model(folder)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin", ".pth"])
def test_pickle_file_is_refused_without_reading_it(tmp_path, suffix):
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(b"not even read")
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_model(checkpoint)


def test_missing_and_foreign_folders_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model"):
        load_model(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="model_index.json"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def sdxl_file(sdxl_model, tmp_path_factory):
    return save_checkpoint(sdxl_model, tmp_path_factory.mktemp("ckpt") / "xl.safetensors")


@pytest.mark.parametrize("source", ["builtin folder", "sdxl folder", "sdxl file"])
def test_each_component_loads_alone_with_the_bytes_of_the_whole(source, builtin_model, sdxl_model,
                                                                   sdxl_folder, sdxl_file):
    path, whole = {"builtin folder": (BUILTIN_MODEL, builtin_model), "sdxl folder": (sdxl_folder, sdxl_model),
                   "sdxl file": (sdxl_file, sdxl_model)}[source]
    expected = component_bytes(whole)
    names = {"text_encoders": {"text_encoder", "text_encoder_2"}, "unet": {"unet"}, "vae": {"vae"}}
    for component in COMPONENTS:
        part = load_model(path, components=(component,))
        assert part.components == (component,)
        assert component_bytes(part) == {k: v for k, v in expected.items() if k in names[component]}
        # what every stage needs besides its own part comes from the configs
        assert (part.family, part.native_size, part.vae_scale_factor) == \
            (whole.family, whole.native_size, whole.vae_scale_factor)
        assert part.scheduler_config["num_train_timesteps"] == whole.scheduler_config["num_train_timesteps"]
        for other in [c for c in COMPONENTS if c != component]:
            with pytest.raises(MissingComponentError, match=f"{other} not loaded.*holds {component}"):
                getattr(part, other)


def test_a_component_is_read_without_the_others_weights(tmp_path, sdxl_folder, sdxl_file):
    folder = tmp_path / "no-unet"
    shutil.copytree(sdxl_folder, folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    assert load_model(folder, components=("text_encoders", "vae")).components == ("text_encoders", "vae")
    with pytest.raises(OSError):
        load_model(folder, components=("unet",))

    tensors = load_file(sdxl_file)  # a file whose UNet lacks one weight the shapes do not need
    del tensors["model.diffusion_model.middle_block.2.in_layers.2.weight"]
    with safe_open(sdxl_file, "pt") as f:
        metadata = f.metadata()
    cut = tmp_path / "cut.safetensors"
    save_file(tensors, cut, metadata=metadata)
    assert load_model(cut, components=("text_encoders", "vae")).components == ("text_encoders", "vae")
    with pytest.raises(ModelLoadError, match="unet: weights missing"):
        load_model(cut, components=("unet",))


def test_each_component_keeps_its_own_dtype(sdxl_folder):
    """SDXL's VAE runs in fp32 whatever the stage's dtype (it overflows in fp16)."""
    assert load_model(sdxl_folder, components=("unet",), dtype=torch.float16).unet.dtype == torch.float16
    assert load_model(sdxl_folder, components=("vae",), dtype=torch.float16).vae.dtype == torch.float32
