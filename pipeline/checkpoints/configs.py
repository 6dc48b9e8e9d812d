"""Component configs for a single-file checkpoint: its shapes decide, settings fill the rest.

Every dimension is read from the weights' shapes (channels, levels, layers, attention depth,
cross-attention width, embedding sizes, vocabulary), so a real checkpoint and a tiny test one
take the same path. What shapes cannot tell (norm groups, attention heads, activations, the
trained resolution) comes from the bundled SD1.5/SDXL config, overridden by the file's own
``raydiance.config`` metadata where it has one; shapes always win over both.
"""
from __future__ import annotations

from typing import Any

from pipeline.checkpoints.layout import OPEN_CLIP_SDXL, Shapes, indices
from pipeline.configs import bundled_config
from pipeline.errors import ModelLoadError

CLIP_SETTINGS = ("hidden_act", "layer_norm_eps", "num_attention_heads", "attention_dropout", "dropout",
                 "initializer_range", "initializer_factor", "bos_token_id", "eos_token_id", "pad_token_id",
                 "projection_dim")
"""The text-encoder settings a file's metadata may carry (the rest of a transformers config is
bookkeeping, or dimensions that the shapes give; ``projection_dim`` only where there is no
projection to read it from)."""


def _depth(shapes: Shapes, prefix: str) -> int:
    return len(indices(shapes, prefix + "transformer_blocks."))


def unet_dimensions(shapes: Shapes, pooled_dim: int | None) -> dict[str, Any]:
    """UNet2DConditionModel config entries from the LDM UNet's shapes (``shapes`` unprefixed)."""
    n_in, n_out = len(indices(shapes, "input_blocks.")), len(indices(shapes, "output_blocks."))
    levels = 1 + sum(f"input_blocks.{i}.0.op.weight" in shapes for i in range(n_in))
    layers, remainder = divmod(n_in - levels, levels)
    if remainder or layers < 1 or n_out != levels * (layers + 1):
        raise ModelLoadError(f"UNet block layout not understood ({n_in} input, {n_out} output blocks)")
    channels, down_types, depths = [], [], []
    for level in range(levels):
        first = 1 + level * (layers + 1)
        channels.append(shapes[f"input_blocks.{first}.0.out_layers.3.weight"][0])
        attention = f"input_blocks.{first}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if attention else "DownBlock2D")
        depths.append(_depth(shapes, f"input_blocks.{first}.1.") if attention else 1)
    up_types = []
    for level in range(levels):
        first = level * (layers + 1)
        attention = f"output_blocks.{first}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if attention else "UpBlock2D")
        reversed_depth = depths[levels - 1 - level]
        if attention and _depth(shapes, f"output_blocks.{first}.1.") != reversed_depth:
            raise ModelLoadError("UNet up blocks' transformer depths do not mirror the down blocks'")
    if "middle_block.1.proj_in.weight" not in shapes:
        raise ModelLoadError("UNet middle block has no attention: not an SD1.5/SDXL UNet")
    mid_depth = _depth(shapes, "middle_block.1.")
    if down_types[-1] == "DownBlock2D":
        depths[-1] = mid_depth  # the last level's entry sets only the middle block's depth
    elif depths[-1] != mid_depth:
        raise ModelLoadError("UNet middle block's transformer depth differs from the last level's")
    proj_in = shapes["middle_block.1.proj_in.weight"]
    cross_key = next((k for k in shapes if k.startswith("middle_block.1.") and k.endswith("attn2.to_k.weight")),
                     "middle_block.1.transformer_blocks.0.attn2.to_k.weight")  # KeyError below if absent
    time_dim = shapes["time_embed.0.weight"][0]
    config: dict[str, Any] = {
        "in_channels": shapes["input_blocks.0.0.weight"][1],
        "out_channels": shapes["out.2.weight"][0],
        "conv_in_kernel": shapes["input_blocks.0.0.weight"][2],
        "conv_out_kernel": shapes["out.2.weight"][2],
        "block_out_channels": channels,
        "layers_per_block": layers,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "transformer_layers_per_block": depths,
        "cross_attention_dim": shapes[cross_key][1],
        "use_linear_projection": len(proj_in) == 2,
        "time_embedding_dim": None if time_dim == 4 * channels[0] else time_dim,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
    }
    if "label_emb.0.0.weight" in shapes:  # SDXL: pooled text embedding + 6 size/crop numbers
        added_dim = shapes["label_emb.0.0.weight"][1]
        if pooled_dim is None or (added_dim - pooled_dim) % 6 or (added_dim - pooled_dim) // 6 % 2:
            raise ModelLoadError(f"UNet added-condition width {added_dim} does not fit the pooled "
                                 f"text embedding ({pooled_dim})")
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(added_dim - pooled_dim) // 6,
                      projection_class_embeddings_input_dim=added_dim)
    return config


def vae_dimensions(shapes: Shapes) -> dict[str, Any]:
    """AutoencoderKL config entries from the LDM VAE's shapes (``shapes`` unprefixed)."""
    levels = len(indices(shapes, "encoder.down."))
    if levels < 1:
        raise ModelLoadError("VAE encoder has no levels (encoder.down.*)")
    return {
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "latent_channels": shapes["decoder.conv_in.weight"][1],
        "block_out_channels": [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "layers_per_block": len(indices(shapes, "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def clip_dimensions(shapes: Shapes) -> dict[str, Any]:
    """CLIPTextConfig entries from a converted (transformers-layout) text encoder's shapes."""
    shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    vocab_size, hidden = shapes["embeddings.token_embedding.weight"]
    config = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "max_position_embeddings": shapes["embeddings.position_embedding.weight"][0],
        "num_hidden_layers": len(indices(shapes, "encoder.layers.")),
        "intermediate_size": shapes["encoder.layers.0.mlp.fc1.weight"][0],
    }
    if "text_projection.weight" in shapes:
        config["projection_dim"] = shapes["text_projection.weight"][0]
    return config


def open_clip_dimensions(shapes: Shapes) -> dict[str, Any]:
    """CLIPTextConfig entries from an OpenCLIP text encoder's shapes (SDXL's second, unprefixed)."""
    vocab_size, hidden = shapes["token_embedding.weight"]
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "max_position_embeddings": shapes["positional_embedding"][0],
        "num_hidden_layers": len(indices(shapes, "transformer.resblocks.")),
        "intermediate_size": shapes["transformer.resblocks.0.mlp.c_fc.weight"][0],
        "projection_dim": shapes["text_projection"][1],
    }


def pooled_width(shapes: Shapes) -> int | None:
    """SDXL's pooled text width: the OpenCLIP projection's output size (None for SD1.5)."""
    projection = shapes.get(OPEN_CLIP_SDXL + "text_projection")
    return projection[1] if projection else None


def assemble(family: str, component: str, dimensions: dict[str, Any],
             settings: dict[str, Any]) -> dict[str, Any]:
    """Bundled config < defaults that follow from the dimensions < file settings < dimensions."""
    config = {k: v for k, v in bundled_config(family, component).items() if not k.startswith("_")}
    if component == "unet":
        # SD1.5 has 8 heads everywhere; SDXL 64 channels per head (diffusers calls heads "attention_head_dim").
        channels = dimensions["block_out_channels"]
        config["attention_head_dim"] = 8 if family == "sd15" else [c // 64 for c in channels]
    elif component.startswith("text_encoder"):
        config["num_attention_heads"] = dimensions["hidden_size"] // 64
    own = settings.get(component, {})
    if component.startswith("text_encoder"):
        own = {k: v for k, v in own.items() if k in CLIP_SETTINGS}
    config.update(own)
    config.update(dimensions)
    _check(component, config)
    return config


def _check(component: str, config: dict[str, Any]) -> None:
    """Refuse, in words, settings that cannot fit the shapes (torch would fail cryptically)."""
    if component == "unet" or component == "vae":
        groups = config["norm_num_groups"]
        if any(c % groups for c in config["block_out_channels"]):
            raise ModelLoadError(f"{component}: channels {config['block_out_channels']} do not divide into "
                                 f"{groups} norm groups")
    if component == "unet":
        heads = config["attention_head_dim"]
        heads = heads if isinstance(heads, list) else [heads] * len(config["block_out_channels"])
        if any(h < 1 or c % h for c, h in zip(config["block_out_channels"], heads)):
            raise ModelLoadError(f"unet: channels {config['block_out_channels']} do not divide into {heads} "
                                 "attention heads")
    if component.startswith("text_encoder"):
        heads = config["num_attention_heads"]
        if heads < 1 or config["hidden_size"] % heads:
            raise ModelLoadError(f"{component}: width {config['hidden_size']} does not divide into {heads} heads")
