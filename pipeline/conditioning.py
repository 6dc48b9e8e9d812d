"""Text encoding: prompts in, plain-tensor conditioning out, ready to cross a process boundary.

Follows diffusers' ``encode_prompt`` exactly (SD1.5: the last hidden state; SDXL: both encoders'
penultimate hidden states concatenated, pooled from the second, zeros for an absent negative
prompt where the model says ``force_zeros_for_empty_prompt``), so that images match diffusers'.
Textual inversion embeddings a prompt names, and clip skip: ``pipeline.prompt_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

from collections.abc import Sequence

import torch

from pipeline.model import DiffusionModel
from pipeline.prompt_tokens import (RowEmbeddings, check_encodable, skipped_layers, token_ids,
                                    vectors_written)


@dataclass
class Conditioning:
    """One prompt's conditioning, unbatched, on the CPU unless moved."""

    prompt_embeds: torch.Tensor  # (tokens, dim)
    negative_embeds: torch.Tensor  # (tokens, dim)
    pooled: torch.Tensor | None = None  # SDXL: (pooled_dim,)
    negative_pooled: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Conditioning":
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)

        return Conditioning(move(self.prompt_embeds), move(self.negative_embeds),
                            move(self.pooled), move(self.negative_pooled))


def _encode(model: DiffusionModel, texts: list[str], rows: Sequence[RowEmbeddings],
            clip_skips: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (batch, tokens, dim) and, for SDXL, pooled embeddings (batch, dim)."""
    hidden, pooled = [], None
    all_hidden = model.family != "sd15" or any(k != 1 for k in clip_skips)
    for part, (tokenizer, encoder) in enumerate(zip(model.tokenizers, model.text_encoders)):
        ids, fixes = token_ids(tokenizer, texts, rows, part)
        with vectors_written(encoder, fixes):
            output = encoder(ids.to(encoder.device), output_hidden_states=all_hidden)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled output
            pooled = output[0]
        hidden.append(skipped_layers(model, encoder, output, clip_skips))
    return torch.cat(hidden, dim=-1), pooled


@torch.inference_mode()
def encode_prompts(model: DiffusionModel, prompts: list[str], negative_prompts: list[str | None],
                   *, clip_skip: int | Sequence[int] = 1,
                   embeddings: Sequence[RowEmbeddings] | None = None) -> list[Conditioning]:
    """Encode many prompts in one forward per encoder; returns CPU tensors, one per prompt.

    Per prompt (or one for all): ``clip_skip`` (A1111's: 1 = the last layer) and the textual
    inversion ``embeddings`` its prompt and negative prompt may use, by name."""
    count = len(prompts)
    if len(negative_prompts) != count:
        raise ValueError("one negative prompt (or None) per prompt")
    skips = [clip_skip] * count if isinstance(clip_skip, int) else list(clip_skip)
    rows = list(embeddings) if embeddings is not None else [{}] * count
    if len(skips) != count or len(rows) != count:
        raise ValueError("one clip_skip and one set of embeddings per prompt")
    for prompt, negative, row, skip in zip(prompts, negative_prompts, rows, skips):
        check_encodable(model, prompt, negative, row, skip)
    zero_negative = [n is None and model.force_zeros_for_empty_prompt for n in negative_prompts]
    texts = list(prompts) + [n or "" for n in negative_prompts]
    hidden, pooled = _encode(model, texts, rows + rows, skips + skips)
    result = []
    for i in range(count):
        negative = torch.zeros_like(hidden[i]) if zero_negative[i] else hidden[count + i]
        pooled_pos = pooled_neg = None
        if pooled is not None:
            pooled_pos = pooled[i]
            pooled_neg = torch.zeros_like(pooled[i]) if zero_negative[i] else pooled[count + i]
        result.append(Conditioning(hidden[i], negative, pooled_pos, pooled_neg).to("cpu"))
    return result
