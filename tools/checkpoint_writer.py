"""Writing a ``DiffusionModel`` as a single-file checkpoint in the original LDM/SGM key layout.

diffusers has no exporter (its conversion scripts are not part of the package), so this is the
inverse of the ``single_file_utils`` conversions, written per block as the layout is defined,
not by a fixed table: it follows the model's own levels and layers, so tiny test models and
real ones map alike. Tests round-trip through it; users can also turn a diffusers folder into
the one file that ComfyUI and AUTOMATIC1111 load.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pipeline.checkpoints.configs import CLIP_SETTINGS
from pipeline.checkpoints.layout import (
    CLIP_SD15,
    CLIP_SDXL,
    METADATA_KEY,
    OPEN_CLIP_SDXL,
    UNET,
    VAE,
)
from pipeline.clip_tokenizer import VOCAB_SIZE, clip_vocabulary
from pipeline.diffusers_folder import load_folder
from pipeline.model import DiffusionModel
from pipeline.model_configs import text_encoder_parts

Tensors = dict[str, torch.Tensor]
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(state_dict: Tensors, prefixes: dict[str, str], inner: dict[str, str] | None = None,
            inner_where: str = "") -> Tensors:
    """Replace each key's diffusers prefix by its LDM one; where the prefix contains
    ``inner_where``, also rename the first part of the rest by ``inner``. Every key must map."""
    out = {}
    for key, tensor in state_dict.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ValueError(f"no LDM name for {key!r}")
        rest = key[len(prefix):]
        if inner and inner_where in prefix:
            head = next((h for h in inner if rest.startswith(h + ".")), None)
            if head is not None:
                rest = inner[head] + rest[len(head):]
        out[prefixes[prefix] + rest] = tensor
    return out


def unet_to_ldm(state_dict: Tensors, config: Any) -> Tensors:
    """A diffusers UNet2DConditionModel state dict in the LDM ``openaimodel`` layout (unprefixed)."""
    layers, levels = config.layers_per_block, len(config.block_out_channels)
    prefixes = {
        "time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
        "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for level in range(levels):
        for j in range(layers):
            block = 1 + level * (layers + 1) + j
            prefixes[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{block}.0."
            prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{block}.1."
        for j in range(layers + 1):
            block = level * (layers + 1) + j
            prefixes[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{block}.0."
            prefixes[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{block}.1."
        if level < levels - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = \
                f"input_blocks.{1 + level * (layers + 1) + layers}.0.op."
            slot = 2 if config.up_block_types[level].startswith("CrossAttn") else 1
            prefixes[f"up_blocks.{level}.upsamplers.0.conv."] = \
                f"output_blocks.{level * (layers + 1) + layers}.{slot}.conv."
    return _rename(state_dict, prefixes, _UNET_RESNET, inner_where="resnets")


def vae_to_ldm(state_dict: Tensors, config: Any) -> Tensors:
    """A diffusers AutoencoderKL state dict in the LDM ``autoencoder`` layout (unprefixed)."""
    levels = len(config.block_out_channels)
    prefixes = {f"{side}.{name}.": f"{side}.{ldm}." for side in ("encoder", "decoder")
                for name, ldm in (("conv_in", "conv_in"), ("conv_out", "conv_out"),
                                  ("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                                  ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"))}
    prefixes.update({"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."})
    for level in range(levels):
        prefixes[f"encoder.down_blocks.{level}.resnets."] = f"encoder.down.{level}.block."
        prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = f"encoder.down.{level}.downsample.conv."
        ldm_level = levels - 1 - level  # the LDM decoder counts its levels from the bottom
        prefixes[f"decoder.up_blocks.{level}.resnets."] = f"decoder.up.{ldm_level}.block."
        prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = f"decoder.up.{ldm_level}.upsample.conv."
    out = {}
    for key, tensor in _rename(state_dict, prefixes).items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key:
            head, _, rest = key.partition(".mid.attn_1.")
            name = next((n for n in _VAE_ATTENTION if rest.startswith(n + ".")), None)
            if name is not None:
                rest = _VAE_ATTENTION[name] + rest[len(name):]
                if rest.endswith(".weight") and name != "group_norm":
                    tensor = tensor[:, :, None, None]  # the LDM VAE's attention uses 1x1 convolutions
            key = f"{head}.mid.attn_1.{rest}"
        out[key] = tensor
    return out


def clip_to_ldm(state_dict: Tensors) -> Tensors:
    """A transformers CLIPTextModel state dict as the LDM/SGM wrapper holds it (``text_model.*``)."""
    return {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state_dict.items()}


def open_clip_to_ldm(state_dict: Tensors) -> Tensors:
    """A transformers CLIPTextModelWithProjection state dict in OpenCLIP's layout (SDXL's second
    encoder): fused q/k/v ``in_proj``, ``resblocks``, a transposed ``text_projection``."""
    state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
    out = {
        "positional_embedding": state_dict.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": state_dict.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": state_dict.pop("final_layer_norm.weight"),
        "ln_final.bias": state_dict.pop("final_layer_norm.bias"),
        "text_projection": state_dict.pop("text_projection.weight").T.contiguous(),
    }
    renames = {"self_attn.out_proj.": "attn.out_proj.", "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.",
               "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
    layers = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layers.")})
    for i in layers:
        source, target = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{target}attn.in_proj_{kind}"] = torch.cat(
                [state_dict.pop(f"{source}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for key in [k for k in state_dict if k.startswith(source)]:
            rest = key[len(source):]
            name = next(n for n in renames if rest.startswith(n))
            out[target + renames[name] + rest[len(name):]] = state_dict.pop(key)
    if state_dict:
        raise ValueError(f"no OpenCLIP name for {sorted(state_dict)[:3]}")
    return out


def _tokenizer_entry(tokenizer) -> dict[str, Any] | None:
    """The tokenizer's files, for a model whose vocabulary is not OpenAI CLIP's (None when it is)."""
    vocab = tokenizer.get_vocab()
    if len(vocab) == VOCAB_SIZE and vocab == clip_vocabulary()[0]:
        return None
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"vocab": model["vocab"], "merges": merges, "pad_token": tokenizer.pad_token,
            "model_max_length": tokenizer.model_max_length}


def _settings(model: DiffusionModel) -> dict[str, Any]:
    """Everything a loader needs beyond the shapes: component configs, scheduler, tokenizers."""
    settings: dict[str, Any] = {
        "unet": {k: v for k, v in model.unet.config.items() if not k.startswith("_")},
        "vae": {k: v for k, v in model.vae.config.items() if not k.startswith("_")},
        "scheduler": model.scheduler_config,
        "model_index": {"force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt},
    }
    parts = zip(text_encoder_parts(model.family), model.tokenizers, model.text_encoders)
    for (tokenizer_name, encoder_name), tokenizer, encoder in parts:
        settings[encoder_name] = {k: v for k, v in encoder.config.to_dict().items() if k in CLIP_SETTINGS}
        if (entry := _tokenizer_entry(tokenizer)) is not None:
            settings[tokenizer_name] = entry
    return settings


def checkpoint_state_dict(model: DiffusionModel) -> Tensors:
    """The model's weights under the original single-file keys."""
    def cpu(module: torch.nn.Module) -> Tensors:
        return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    out = {UNET + k: v for k, v in unet_to_ldm(cpu(model.unet), model.unet.config).items()}
    out.update({VAE + k: v for k, v in vae_to_ldm(cpu(model.vae), model.vae.config).items()})
    first_clip = CLIP_SD15 if model.family == "sd15" else CLIP_SDXL
    out.update({first_clip + k: v for k, v in clip_to_ldm(cpu(model.text_encoders[0])).items()})
    if model.family == "sdxl":
        out.update({OPEN_CLIP_SDXL + k: v for k, v in open_clip_to_ldm(cpu(model.text_encoders[1])).items()})
    return out


def save_checkpoint(model: DiffusionModel | str | Path, path: str | Path, *,
                    dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (or the diffusers folder at that path) as one ``.safetensors`` checkpoint
    in the original layout, its non-shape settings in the ``raydiance.config`` metadata."""
    if not isinstance(model, DiffusionModel):
        model = load_folder(Path(model))
    path = Path(path)
    state_dict = checkpoint_state_dict(model)
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state_dict, path, metadata={"format": "pt", METADATA_KEY: json.dumps(_settings(model))})
    return path
