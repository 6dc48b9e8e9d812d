"""Full-size SD1.5 and SDXL base with random weights, built from the bundled configs: in memory, or
cached on disk as a diffusers folder and as a single-file checkpoint.

    python -m bench.full_size [--families sd15,sdxl]   # build the cache (bench/out/models/)

Nothing can be downloaded here, and what memory and speed measure is the architecture, not the
values, so benchmarks build the real shapes (UNet, VAE, CLIP-L, SDXL's OpenCLIP bigG with its
projection; OpenAI's CLIP tokenizers, SDXL's second padding with "!") with random weights.

Each component is initialised directly in its final dtype on its final device, never as an
fp32 copy first (SDXL's UNet is 10.3 GB in fp32, 5.1 GB in fp16), and the disk cache is written
one component at a time, each freed before the next: building SDXL peaks near its fp16 UNet.
On disk everything is fp16 (as checkpoints are shipped): ``random-FAMILY/`` (safetensors, the
layout ``save_pretrained`` writes) and ``random-FAMILY.safetensors`` (``save_checkpoint``'s
single file, LDM/SGM keys). Both are reused when present; each is written under a temporary
name and renamed, so an interrupted build is never mistaken for a finished one.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.report import OUT_DIR
from tools.checkpoint_writer import save_checkpoint
from pipeline.clip_tokenizer import clip_tokenizer
from pipeline.configs import bundled_config
from pipeline.device import for_inference, vae_dtype
from pipeline.loading import load_model
from pipeline.model import DiffusionModel, TextEncoders
from pipeline.model_configs import COMPONENTS, Component, ModelConfigs

FAMILIES = ("sd15", "sdxl")
FORMATS = ("folder", "file")
MODELS_DIR = OUT_DIR / "models"
DISK_DTYPE = torch.float16

# (tokenizer, text encoder, class) per encoder; SDXL's second is OpenCLIP bigG with the pooled projection
_ENCODERS = {
    "sd15": [("tokenizer", "text_encoder", CLIPTextModel)],
    "sdxl": [("tokenizer", "text_encoder", CLIPTextModel),
             ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection)],
}


@contextlib.contextmanager
def _creating(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Modules created inside are allocated and initialised on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_unet(family: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    with _creating(device, dtype):
        return for_inference(UNet2DConditionModel.from_config(bundled_config(family, "unet")), device)


def build_vae(family: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
              seed: int = 0) -> AutoencoderKL:
    """The VAE in ``dtype`` as given (``random_model`` applies the loader's fp32 upcast)."""
    torch.manual_seed(seed + 1)
    with _creating(device, dtype):
        return for_inference(AutoencoderKL.from_config(bundled_config(family, "vae")), device)


def build_text_encoders(family: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> TextEncoders:
    tokenizers, encoders = [], []
    for i, (tokenizer_name, encoder_name, encoder_class) in enumerate(_ENCODERS[family]):
        tokenizers.append(clip_tokenizer(pad_token=bundled_config(family, tokenizer_name)["pad_token"]))
        torch.manual_seed(seed + 2 + i)
        with _creating(device, dtype):
            encoder = encoder_class(CLIPTextConfig.from_dict(bundled_config(family, encoder_name)))
        encoders.append(for_inference(encoder, device))
    return TextEncoders(tokenizers, encoders)


def random_model(family: str, components: Collection[Component] = COMPONENTS,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> DiffusionModel:
    """``family``'s full-size ``components`` with random weights, as ``load_model`` would hold
    them: on ``device`` in ``dtype`` (SDXL's VAE in fp32 where ``dtype`` is fp16, as loaded)."""
    unet_config, vae_config = bundled_config(family, "unet"), bundled_config(family, "vae")
    loaded: dict[Component, object] = {}
    if "text_encoders" in components:
        loaded["text_encoders"] = build_text_encoders(family, device, dtype, seed)
    if "unet" in components:
        loaded["unet"] = build_unet(family, device, dtype, seed)
    if "vae" in components:
        loaded["vae"] = build_vae(family, device, vae_dtype(vae_config, dtype), seed)
    index = bundled_config(family, "model_index")
    configs = ModelConfigs(family, unet_config, vae_config, bundled_config(family, "scheduler"),
                           bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")))
    return DiffusionModel(f"random-{family}", configs, loaded)


# --- the disk cache ------------------------------------------------------------------------------

def folder_path(family: str) -> Path:
    return MODELS_DIR / f"random-{family}"


def file_path(family: str) -> Path:
    return MODELS_DIR / f"random-{family}.safetensors"


def model_path(family: str, model_format: str) -> Path:
    """The cached model of ``family`` in ``model_format`` ("folder" or "file"), built if absent."""
    if model_format == "folder":
        return ensure_folder(family)
    if model_format == "file":
        return ensure_file(family)
    raise ValueError(f"unknown format {model_format!r}; known: {', '.join(FORMATS)}")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def ensure_folder(family: str, device: torch.device | str = "cpu", seed: int = 0) -> Path:
    """``family`` as a diffusers folder of fp16 safetensors, built if absent: each component is
    initialised on ``device`` (a GPU initialises the SDXL UNet in moments), then saved from the CPU."""
    final = folder_path(family)
    if (final / "model_index.json").is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    steps = ["text_encoders", "unet", "vae"]
    with tqdm(steps, desc=f"build {final.name} (fp16 folder)", unit="component") as bar:
        for component in bar:
            bar.set_postfix_str(component)
            if component == "text_encoders":
                encoders = build_text_encoders(family, device, DISK_DTYPE, seed)
                for (tokenizer_name, encoder_name, _), tokenizer, encoder in zip(
                        _ENCODERS[family], encoders.tokenizers, encoders.encoders):
                    tokenizer.save_pretrained(partial / tokenizer_name)
                    encoder.to("cpu").save_pretrained(partial / encoder_name)
                del encoders, encoder
            else:
                build = build_unet if component == "unet" else build_vae
                module = build(family, device, DISK_DTYPE, seed)
                module.to("cpu").save_pretrained(partial / component, safe_serialization=True)
                del module
            _free(device)
    _write_json(partial / "scheduler" / "scheduler_config.json", bundled_config(family, "scheduler"))
    _write_json(partial / "model_index.json", bundled_config(family, "model_index"))  # last: the marker
    os.replace(partial, final)
    return final


def ensure_file(family: str, seed: int = 0) -> Path:
    """``family`` as one fp16 single-file checkpoint (LDM/SGM keys), written from the folder."""
    final = file_path(family)
    if final.is_file():
        return final
    folder = ensure_folder(family, seed=seed)
    partial = final.with_name(final.name + ".partial")
    with tqdm(total=2, desc=f"build {final.name} (fp16 single file)", unit="step") as bar:
        # Loaded in the files' own dtype on the CPU, the weights stay the folder's memory-mapped
        # pages (safetensors maps the file); nothing is held twice.
        model = load_model(folder, device="cpu", dtype=DISK_DTYPE)
        bar.update()
        save_checkpoint(model, partial, dtype=DISK_DTYPE)
        bar.update()
    del model
    gc.collect()
    os.replace(partial, final)
    return final


def _free(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    args = parser.parse_args()
    for family in args.families.split(","):
        for model_format in args.formats.split(","):
            print(f"{family} {model_format}: {model_path(family, model_format)}")


if __name__ == "__main__":
    main()
