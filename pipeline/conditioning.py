"""Text encoding: prompts in, plain-tensor conditioning out, ready to cross a process boundary.

Follows diffusers' ``encode_prompt`` exactly (SD1.5: the last hidden state; SDXL: both encoders'
penultimate hidden states concatenated, pooled from the second, zeros for an absent negative
prompt where the model says ``force_zeros_for_empty_prompt``), so that images match diffusers'.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.model import DiffusionModel


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


def _encode(model: DiffusionModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states (batch, tokens, dim) and, for SDXL, pooled embeddings (batch, dim)."""
    hidden, pooled = [], None
    for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(encoder.device)
        if model.family == "sd15":
            hidden.append(encoder(ids)[0])
            continue
        output = encoder(ids, output_hidden_states=True)
        if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds, the pooled output
            pooled = output[0]
        hidden.append(output.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


@torch.inference_mode()
def encode_prompts(model: DiffusionModel, prompts: list[str],
                   negative_prompts: list[str | None]) -> list[Conditioning]:
    """Encode many prompts in one forward per encoder; returns CPU tensors, one per prompt."""
    if len(prompts) != len(negative_prompts):
        raise ValueError("one negative prompt (or None) per prompt")
    zero_negative = [n is None and model.force_zeros_for_empty_prompt for n in negative_prompts]
    texts = list(prompts) + [n or "" for n in negative_prompts]
    hidden, pooled = _encode(model, texts)
    count = len(prompts)
    result = []
    for i in range(count):
        negative = torch.zeros_like(hidden[i]) if zero_negative[i] else hidden[count + i]
        pooled_pos = pooled_neg = None
        if pooled is not None:
            pooled_pos = pooled[i]
            pooled_neg = torch.zeros_like(pooled[i]) if zero_negative[i] else pooled[count + i]
        result.append(Conditioning(hidden[i], negative, pooled_pos, pooled_neg).to("cpu"))
    return result
