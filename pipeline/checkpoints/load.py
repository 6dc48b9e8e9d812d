"""Loading a single-file SD1.5/SDXL checkpoint into a ``DiffusionModel``, offline, safetensors only.

The key conversion is diffusers' own (``convert_ldm_unet_checkpoint`` and friends in
``diffusers.loaders.single_file_utils``); the configs come from the weights' shapes and the
bundled SD1.5/SDXL configs (``pipeline.checkpoints.configs``), never from the hub. Each
component is built with empty weights and takes the file's tensors as they are read, one
component at a time, so a large checkpoint is not held twice in memory.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from safetensors import safe_open
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from pipeline.checkpoints.configs import (
    assemble,
    clip_dimensions,
    pooled_width,
    unet_dimensions,
    vae_dimensions,
)
from pipeline.checkpoints.layout import (
    CLIP_SD15,
    CLIP_SDXL,
    OPEN_CLIP_SDXL,
    UNET,
    VAE,
    Header,
    detect_family,
    read_header,
    with_prefix,
)
from pipeline.clip_tokenizer import clip_tokenizer, tokenizer_from_files
from pipeline.configs import bundled_config
from pipeline.errors import ModelLoadError
from pipeline.model import DiffusionModel, refuse_pickles, vae_dtype

Tensors = dict[str, torch.Tensor]


def _build(component: str, make: Callable[[], torch.nn.Module], state_dict: Tensors,
           device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """``make()`` with empty weights, then the converted tensors assigned in; every weight must land.

    Tensors take ``dtype`` before they are assigned (these modules have no floating buffers), so
    nothing is copied twice and diffusers' ``to(dtype)`` warning does not fire.
    """
    with init_empty_weights():
        module = make()
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    missing, unexpected = module.load_state_dict(state_dict, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(f"{component}: {len(missing)} weights missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    return module.to(device).eval().requires_grad_(False)


def _fit_text_model(state_dict: Tensors, model_class: type) -> Tensors:
    """Match the ``text_model.`` prefix to the class: transformers 5.6+ flattened ``CLIPTextModel``."""
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    if model_class is CLIPTextModel:
        return {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    return {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
            for k, v in state_dict.items()}


def _tokenizer(family: str, name: str, settings: dict[str, Any]) -> CLIPTokenizer:
    """The file's own tokenizer where it carries one (a non-CLIP vocabulary), else OpenAI's CLIP."""
    own = settings.get(name)
    if own:
        return tokenizer_from_files(own["vocab"], own["merges"], pad_token=own["pad_token"],
                                    max_length=own.get("model_max_length", 77))
    return clip_tokenizer(pad_token=bundled_config(family, name)["pad_token"])


def _scheduler_config(family: str, header: Header, settings: dict[str, Any]) -> dict[str, Any]:
    config = dict(settings.get("scheduler") or bundled_config(family, "scheduler"))
    if "v_pred" in header.shapes:  # ComfyUI's marker keys for v-prediction / zero-terminal-SNR models
        config["prediction_type"] = "v_prediction"
    if "ztsnr" in header.shapes:
        config["rescale_betas_zero_snr"] = True
    return config


def load_checkpoint(path: str | Path, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, name: str | None = None) -> DiffusionModel:
    """Load an SD1.5 or SDXL (Pony, Illustrious, ...) single-file ``.safetensors`` checkpoint."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such checkpoint file")
    refuse_pickles(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(f"{path.name}: a single-file checkpoint must be a .safetensors file")
    header = read_header(path)
    family = detect_family(header.shapes)
    try:
        return _load(path, header, family, device, dtype, name)
    except KeyError as error:  # a tensor the layout needs is not in the file
        raise ModelLoadError(f"{path.name}: incomplete {family} checkpoint (no {error.args[0]!r})") from None


def _load(path: Path, header: Header, family: str, device: torch.device | str, dtype: torch.dtype,
          name: str | None) -> DiffusionModel:
    settings = header.settings
    with safe_open(path, framework="pt", device="cpu") as f:
        def read(prefix: str) -> Tensors:
            return {key: f.get_tensor(key) for key in header.shapes if key.startswith(prefix)}

        tokenizers, encoders = [], []
        encoder_parts = [("text_encoder", CLIP_SD15 if family == "sd15" else CLIP_SDXL, CLIPTextModel)]
        if family == "sdxl":
            encoder_parts.append(("text_encoder_2", OPEN_CLIP_SDXL, CLIPTextModelWithProjection))
        for i, (part, prefix, model_class) in enumerate(encoder_parts):
            tensors = read(prefix)
            if model_class is CLIPTextModelWithProjection:
                if prefix + "text_projection" not in tensors:
                    raise ModelLoadError(f"{part}: no {prefix}text_projection")
                state_dict = convert_open_clip_checkpoint(None, tensors, prefix=prefix)
            else:
                state_dict = convert_ldm_clip_checkpoint(tensors)
            state_dict = _fit_text_model(state_dict, model_class)
            del tensors
            dims = clip_dimensions({k: tuple(v.shape) for k, v in state_dict.items()})
            config = CLIPTextConfig(**assemble(family, part, dims, settings))
            tokenizer = _tokenizer(family, "tokenizer" if i == 0 else "tokenizer_2", settings)
            if len(tokenizer) != config.vocab_size:
                raise ModelLoadError(f"{part} has a {config.vocab_size}-token vocabulary, not CLIP's "
                                     f"{len(tokenizer)}, and the file carries no tokenizer for it")
            tokenizers.append(tokenizer)
            encoders.append(_build(part, functools.partial(model_class, config), state_dict, device, dtype))

        unet_config = assemble(family, "unet",
                               unet_dimensions(with_prefix(header.shapes, UNET), pooled_width(header.shapes)),
                               settings)
        state_dict = convert_ldm_unet_checkpoint(read(UNET), unet_config)
        unet = _build("unet", lambda: UNet2DConditionModel.from_config(unet_config), state_dict, device, dtype)
        del state_dict

        vae_config = assemble(family, "vae", vae_dimensions(with_prefix(header.shapes, VAE)), settings)
        state_dict = convert_ldm_vae_checkpoint(read(VAE), vae_config)
        vae = _build("vae", lambda: AutoencoderKL.from_config(vae_config), state_dict, device,
                     vae_dtype(vae_config, dtype))
        del state_dict

    index = {**bundled_config(family, "model_index"), **settings.get("model_index", {})}
    return DiffusionModel(
        name=name or path.stem, family=family, tokenizers=tokenizers, text_encoders=encoders,
        unet=unet, vae=vae, scheduler_config=_scheduler_config(family, header, settings),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family == "sdxl")),
        path=path, extra={"format": "single_file"},
    )
