"""Loading the components of a single-file SD1.5/SDXL checkpoint, offline, safetensors only.

Each component is read on its own: only the tensors under its key prefix leave the file
(safetensors reads lazily), cast to the component's dtype as they are read, so a fp16 file
served in fp32 is never held twice. diffusers' own single-file loaders then convert the keys and
build the module with empty weights: ``from_single_file`` for the UNet and the VAE,
``create_diffusers_clip_model_from_ldm`` (what ``from_single_file`` of a pipeline calls) for the
text encoders.

What stays Raydiance's own, because diffusers cannot do it offline:

- the component configs: diffusers fetches them from the hub, or reads a local folder that must
  fit the file. Here they are read off the weights' shapes, the bundled SD1.5/SDXL configs
  filling the rest (``pipeline.checkpoints.configs``), and written to a scratch folder that is
  passed as ``config=``;
- the tokenizers: diffusers fetches them; here OpenAI's CLIP vocabulary comes from the
  ``openai-clip`` package, or the file carries its own (``pipeline.clip_tokenizer``);
- the check that every weight landed: diffusers leaves a weight the file lacks on the meta device.
"""
from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, ModelMixin, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.checkpoints.configs import assemble, clip_dimensions, open_clip_dimensions
from pipeline.checkpoints.layout import (CLIP_SD15, CLIP_SDXL, OPEN_CLIP_SDXL, UNET, VAE, Header, Shapes, with_prefix)
from pipeline.checkpoints.describe import read_configs
from pipeline.clip_tokenizer import clip_tokenizer, tokenizer_from_files
from pipeline.configs import bundled_config
from pipeline.device import for_inference, vae_dtype
from pipeline.errors import ModelLoadError
from pipeline.model import DiffusionModel, TextEncoders
from pipeline.model_configs import COMPONENTS, Component, Family, ModelConfigs, text_encoder_parts
from pipeline.pickles import SAFETENSORS

# from_single_file ends with ``model.to(torch_dtype)``, on which diffusers 0.42 warns about the
# modules to keep in fp32 even when there are none ("...: []"); the dtype is already right.
logging.getLogger("diffusers.models.modeling_utils").addFilter(
    lambda record: "should be kept in float32: []" not in record.getMessage())

Tensors = dict[str, torch.Tensor]
ReadTensors = Callable[[str, torch.dtype], Tensors]  # (key prefix, dtype) -> that component's tensors
Dimensions = Callable[[Shapes], dict[str, Any]]  # a component's shapes -> its config's dimensions


def load_checkpoint(path: str | Path, *, components: Collection[Component] = COMPONENTS,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    name: str | None = None) -> DiffusionModel:
    """Load ``components`` of an SD1.5 or SDXL (Pony, Illustrious, ...) single-file checkpoint
    (``pipeline.loading.load_model`` checks the path and refuses pickles first)."""
    path = Path(path)
    if path.suffix.lower() != SAFETENSORS:
        raise ModelLoadError(f"{path.name}: a single-file checkpoint must be a .safetensors file")
    header, configs = read_configs(path)
    try:
        loaded = _load_components(path, header, configs, components, device, dtype)
    except KeyError as error:  # a tensor the key conversion needs is not in the file
        raise ModelLoadError(f"{path.name}: incomplete {configs.family} checkpoint "
                             f"(no {error.args[0]!r})") from None
    return DiffusionModel(name or path.stem, configs, loaded)


def _load_components(path: Path, header: Header, configs: ModelConfigs,
                     components: Collection[Component], device: torch.device | str,
                     dtype: torch.dtype) -> dict[Component, Any]:
    loaded: dict[Component, Any] = {}
    with safe_open(path, framework="pt", device="cpu") as f, \
            tempfile.TemporaryDirectory(prefix="raydiance-configs-") as folder:
        scratch = Path(folder)

        def read(prefix: str, to: torch.dtype) -> Tensors:
            return {key: _cast(f.get_tensor(key), to) for key in header.shapes if key.startswith(prefix)}

        if "text_encoders" in components:
            loaded["text_encoders"] = _text_encoders(header, configs.family, read, scratch, device, dtype)
        if "unet" in components:
            unet = _from_single_file(UNet2DConditionModel, "unet", configs.unet, read(UNET, dtype),
                                     scratch, dtype)
            loaded["unet"] = _placed("unet", unet, device)
        if "vae" in components:
            own_dtype = vae_dtype(configs.vae, dtype)
            vae = _from_single_file(AutoencoderKL, "vae", configs.vae, read(VAE, own_dtype), scratch,
                                    own_dtype)
            loaded["vae"] = _placed("vae", vae, device)
    return loaded


def _from_single_file(model_class: type[ModelMixin], component: str, config: dict[str, Any],
                      tensors: Tensors, scratch: Path, dtype: torch.dtype) -> ModelMixin:
    """diffusers' ``from_single_file`` on one component's tensors, its config in ``scratch``."""
    (scratch / component).mkdir()
    (scratch / component / "config.json").write_text(json.dumps(config))
    try:
        return model_class.from_single_file(tensors, config=str(scratch), subfolder=component,
                                            local_files_only=True, torch_dtype=dtype)
    except NotImplementedError:  # "Cannot copy out of meta tensor": a weight the file lacks
        raise ModelLoadError(f"{component}: weights missing from the file (the key conversion "
                             "left some of the module's weights unset)") from None
    except ValueError as error:  # diffusers: "Cannot load because <key> expected shape ..."
        if "expected shape" not in str(error):
            raise
        shape = str(error).split(" because ", 1)[-1].split(". ", 1)[0]
        raise ModelLoadError(f"{component}: a weight of the wrong shape ({shape})") from None


def _text_encoders(header: Header, family: Family, read: ReadTensors, scratch: Path,
                   device: torch.device | str, dtype: torch.dtype) -> TextEncoders:
    """SD1.5's CLIP-L, or SDXL's CLIP-L and OpenCLIP bigG (with its pooled projection)."""
    shapes, settings = header.shapes, header.settings
    tokenizers, encoders = [], []
    for tokenizer_name, part in text_encoder_parts(family):
        prefix, model_class, dimensions = _ldm_text_encoder(family, part)
        if model_class is CLIPTextModelWithProjection and prefix + "text_projection" not in shapes:
            raise ModelLoadError(f"{part}: no {prefix}text_projection")
        try:
            config = CLIPTextConfig(**assemble(family, part, dimensions(with_prefix(shapes, prefix)), settings))
        except KeyError as error:
            raise ModelLoadError(f"incomplete {family} checkpoint (no {prefix}{error.args[0]})") from None
        tokenizer = _tokenizer(family, tokenizer_name, settings)
        if len(tokenizer) != config.vocab_size:
            raise ModelLoadError(f"{part} has a {config.vocab_size}-token vocabulary, not CLIP's "
                                 f"{len(tokenizer)}, and the file carries no tokenizer for it")
        config.save_pretrained(scratch / part)
        encoder = create_diffusers_clip_model_from_ldm(
            model_class, read(prefix, dtype), subfolder=part, config=str(scratch), torch_dtype=dtype,
            local_files_only=True)
        tokenizers.append(tokenizer)
        encoders.append(_placed(part, encoder, device))
    return TextEncoders(tokenizers, encoders)


def _ldm_text_encoder(family: Family, part: str) -> tuple[str, type[torch.nn.Module], Dimensions]:
    """Where text encoder ``part`` lives in the file, its class, and its shapes' reader."""
    if part == "text_encoder_2":  # SDXL's OpenCLIP bigG, pooled
        return OPEN_CLIP_SDXL, CLIPTextModelWithProjection, open_clip_dimensions
    return CLIP_SD15 if family == "sd15" else CLIP_SDXL, CLIPTextModel, clip_dimensions


def _tokenizer(family: str, name: str, settings: dict[str, Any]) -> CLIPTokenizer:
    """The file's own tokenizer where it carries one (a non-CLIP vocabulary), else OpenAI's CLIP."""
    own = settings.get(name)
    if own:
        return tokenizer_from_files(own["vocab"], own["merges"], pad_token=own["pad_token"],
                                    max_length=own.get("model_max_length", 77))
    return clip_tokenizer(pad_token=bundled_config(family, name)["pad_token"])


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _placed(component: str, module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module`` on ``device`` for inference, refused if a weight never came from the file."""
    missing = [name for name, tensor in [*module.named_parameters(), *module.named_buffers()] if tensor.is_meta]
    if missing:
        raise ModelLoadError(f"{component}: {len(missing)} weights missing from the file (e.g. {missing[:3]})")
    return for_inference(module, device)
