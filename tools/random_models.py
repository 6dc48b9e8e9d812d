"""Small random-weight models of the real architectures, built locally and saved as diffusers folders.

With no model hub, tests and benchmarks exercise the SDXL paths (two text encoders, pooled
embeddings, ``add_time_ids``, a first down block without attention) and SD1.5-shaped UNets on
these. Their images are noise; their code paths and cost structure are the real ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from diffusers import (
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tools.tiny_shapes.architecture import make_scheduler
from tools.tiny_shapes.tokenizer import save_tokenizer
from tools.tiny_shapes.world import WORDS


def _text_config(tokenizer, hidden: int, layers: int = 2) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae(levels: int, channels: int = 16) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(channels,) * levels, layers_per_block=1, norm_num_groups=8,
    )


def build_random_sdxl(folder: Path, *, seed: int = 0, latent_size: int = 32,
                      channels: tuple[int, ...] = (32, 64, 64)) -> Path:
    """An SDXL-architecture model: the real block layout, tiny widths, random weights."""
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(WORDS, folder / "tokenizer")
    tokenizer_2 = save_tokenizer(WORDS, folder / "tokenizer_2")
    hidden, hidden_2, time_dim = 32, 48, 8
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_2))
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, block_out_channels=channels,
        layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
        use_linear_projection=True, cross_attention_dim=hidden + hidden_2,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + hidden_2,
    )
    vae = _vae(levels=4)
    vae.register_to_config(scaling_factor=0.13025, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=make_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def build_random_sd15(folder: Path, *, seed: int = 0, latent_size: int = 32,
                      channels: tuple[int, ...] = (32, 64, 64, 64), inpainting: bool = False) -> Path:
    """An SD1.5-architecture model: three cross-attention down blocks and a plain one, tiny widths
    (``inpainting``: a 9-input-channel UNet, as SD1.5's inpainting models have)."""
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(WORDS, folder / "tokenizer")
    hidden = 64
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=9 if inpainting else 4, out_channels=4,
        block_out_channels=channels,
        layers_per_block=2, norm_num_groups=8, cross_attention_dim=hidden, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    vae = _vae(levels=4)
    vae.register_to_config(scaling_factor=0.18215)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(_text_config(tokenizer, hidden)), tokenizer=tokenizer,
        unet=unet, scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# --- random LoRAs, for tests and benchmarks ---------------------------------------------------

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1")


def _pairs(module: torch.nn.Module, targets: tuple[str, ...], rank: int, generator: torch.Generator):
    """(module name, lora_A, lora_B) for every Linear whose name ends in one of ``targets``."""
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and name.endswith(targets):
            down = torch.randn(rank, layer.in_features, generator=generator) * 0.2
            up = torch.randn(layer.out_features, rank, generator=generator) * 0.2
            yield name, down, up


def write_unet_lora(unet: torch.nn.Module, path: Path, seed: int, rank: int = 16) -> None:
    """A random diffusers/peft-format LoRA on ``unet``'s attention projections alone, for a
    model loaded without text encoders (the benchmarks' full-size UNets)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, down, up in _pairs(unet, UNET_TARGETS, rank, generator):
        tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up * 0.1}
    save_file(tensors, path)


def write_lora_pair(model, folder: Path, stem: str, seed: int, rank: int = 4, *, unet_keys=None,
                    text_targets: tuple[str, ...] = TEXT_TARGETS) -> None:
    """The same LoRA twice: ``{stem}_kohya`` (alpha = rank/2, so scale 0.5) and ``{stem}_peft``
    (diffusers/peft keys, no alpha, the 0.5 folded into lora_B)."""
    generator = torch.Generator().manual_seed(seed)
    kohya, peft = {}, {}
    for name, down, up in _pairs(model.unet, UNET_TARGETS, rank, generator):
        kohya_name = "lora_unet_" + (unet_keys(name) if unet_keys else name).replace(".", "_")
        kohya |= {f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
                  f"{kohya_name}.alpha": torch.tensor(rank / 2)}
        peft |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up * 0.5}
    for i, encoder in enumerate(model.text_encoders):
        te, prefix = ("lora_te1_" if len(model.text_encoders) > 1 else "lora_te_", "text_encoder") if i == 0 \
            else ("lora_te2_", "text_encoder_2")
        for name, down, up in _pairs(encoder, text_targets, rank, generator):
            full = name if name.startswith("text_model.") else f"text_model.{name}"
            kohya_name = te + full.replace(".", "_")
            kohya |= {f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
                      f"{kohya_name}.alpha": torch.tensor(rank / 2)}
            peft |= {f"{prefix}.{full}.lora_A.weight": down, f"{prefix}.{full}.lora_B.weight": up * 0.5}
    save_file(kohya, folder / f"{stem}_kohya.safetensors")
    save_file(peft, folder / f"{stem}_peft.safetensors")
