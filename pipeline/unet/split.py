"""``UNet2DConditionModel.forward`` cut in two at the First Block Cache head.

``run_head`` does the time (and SDXL added) embeddings, ``conv_in`` and the first resnet (and
its attention, where the block has one) of ``down_blocks[0]``; ``run_tail`` the rest of the
down path, the mid block and the up blocks; ``run_out`` the output layers. Run one after the
other on the same rows they do exactly the ops of the forward of diffusers
``REPRODUCED_DIFFUSERS`` (pyproject.toml pins it; a unit test checks bitwise equality), in the
same order, so the result is bitwise the same; in between, the caller may drop rows (the cache
hits) and run the tail only for the others.

Only what SD1.5- and SDXL-family UNets use is supported: no class labels, ControlNet or
T2I-Adapter residuals, attention masks, GLIGEN or ``cross_attention_kwargs`` (LoRA loaded
through peft keeps its scale in the layers, so it needs none of these).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D, DownBlock2D

REPRODUCED_DIFFUSERS = "0.42"  # the diffusers minor version whose forward these parts copy


@dataclass
class Head:
    """What the tail and the output layers need from the head, for some rows."""

    emb: torch.Tensor  # (rows, temb_dim): time (+ added) embedding, after time_embed_act
    encoder_hidden_states: torch.Tensor  # (rows, tokens, dim), after process_encoder_hidden_states
    stem: torch.Tensor  # (rows, C0, h, w): conv_in output, the first skip connection
    hidden: torch.Tensor  # (rows, C0, h, w): after down_blocks[0]'s first resnet (+ attention)
    forward_upsample_size: bool  # latent side not a multiple of 2**num_upsamplers

    def select(self, spans: Sequence[slice]) -> Head:
        """These rows only, for a tail over the cache misses: the spans joined on the device
        (no index tensor to upload, so no host-device round trip)."""
        def pick(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[span] for span in spans])

        return Head(pick(self.emb), pick(self.encoder_hidden_states), pick(self.stem),
                    pick(self.hidden), self.forward_upsample_size)


def check_supported(unet: UNet2DConditionModel) -> None:
    """Raise for a UNet whose forward uses parts this decomposition does not reproduce."""
    config = unet.config
    problems = []
    if unet.class_embedding is not None:
        problems.append("class embeddings")
    if config.addition_embed_type == "image_hint":
        problems.append("addition_embed_type image_hint")
    if type(unet.down_blocks[0]) not in (CrossAttnDownBlock2D, DownBlock2D):
        problems.append(f"first down block {type(unet.down_blocks[0]).__name__}")
    if problems:
        raise ValueError(f"First Block Cache does not support this UNet: {', '.join(problems)}")


def _has_cross_attention(block: torch.nn.Module) -> bool:
    return bool(getattr(block, "has_cross_attention", False))


def _attend(attn: torch.nn.Module, hidden: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    return attn(hidden, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=None,
                attention_mask=None, encoder_attention_mask=None, return_dict=False)[0]


def run_head(unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor,
             added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> Head:
    """Embeddings, ``conv_in`` and the head of ``down_blocks[0]``, for every row."""
    factor = 2 ** unet.num_upsamplers
    forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
    stem = unet.conv_in(sample)
    block = unet.down_blocks[0]
    hidden = block.resnets[0](stem, emb)
    if _has_cross_attention(block):
        hidden = _attend(block.attentions[0], hidden, encoder_hidden_states)
    return Head(emb, encoder_hidden_states, stem, hidden, forward_upsample_size)


def run_tail(unet: UNet2DConditionModel, head: Head) -> torch.Tensor:
    """The rest of the UNet up to the output layers: returns the last up block's output."""
    emb, ehs = head.emb, head.encoder_hidden_states
    # 3. down: the rest of down_blocks[0], then the other down blocks
    block = unet.down_blocks[0]
    sample = head.hidden
    res_samples: tuple[torch.Tensor, ...] = (head.stem, sample)
    for i in range(1, len(block.resnets)):
        sample = block.resnets[i](sample, emb)
        if _has_cross_attention(block):
            sample = _attend(block.attentions[i], sample, ehs)
        res_samples += (sample,)
    if block.downsamplers is not None:
        for downsampler in block.downsamplers:
            sample = downsampler(sample)
        res_samples += (sample,)
    for block in unet.down_blocks[1:]:
        if _has_cross_attention(block):
            sample, more = block(hidden_states=sample, temb=emb, encoder_hidden_states=ehs,
                                 attention_mask=None, cross_attention_kwargs=None,
                                 encoder_attention_mask=None)
        else:
            sample, more = block(hidden_states=sample, temb=emb)
        res_samples += more
    # 4. mid
    if unet.mid_block is not None:
        if _has_cross_attention(unet.mid_block):
            sample = unet.mid_block(sample, emb, encoder_hidden_states=ehs, attention_mask=None,
                                    cross_attention_kwargs=None, encoder_attention_mask=None)
        else:
            sample = unet.mid_block(sample, emb)
    # 5. up
    upsample_size = None
    for i, block in enumerate(unet.up_blocks):
        is_final_block = i == len(unet.up_blocks) - 1
        skips = res_samples[-len(block.resnets):]
        res_samples = res_samples[: -len(block.resnets)]
        if not is_final_block and head.forward_upsample_size:
            upsample_size = res_samples[-1].shape[2:]
        if _has_cross_attention(block):
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips,
                           encoder_hidden_states=ehs, cross_attention_kwargs=None,
                           upsample_size=upsample_size, attention_mask=None,
                           encoder_attention_mask=None)
        else:
            sample = block(hidden_states=sample, temb=emb, res_hidden_states_tuple=skips,
                           upsample_size=upsample_size)
    return sample


def run_out(unet: UNet2DConditionModel, hidden: torch.Tensor) -> torch.Tensor:
    """The output layers: norm, activation and ``conv_out``."""
    if unet.conv_norm_out:
        hidden = unet.conv_norm_out(hidden)
        hidden = unet.conv_act(hidden)
    return unet.conv_out(hidden)

