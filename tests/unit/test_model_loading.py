"""Loading: diffusers folders of both families, offline, safetensors only."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from pipeline.errors import ModelLoadError, UnsafeWeightsError
from pipeline.model import load_model
from pipeline.tiny_shapes import MODEL_DIR as BUILTIN_MODEL


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
