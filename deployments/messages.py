"""What crosses a stage boundary: small dataclasses of CPU tensors or arrays, and the timings so far.

- Ingress -> TextEncoder: ``EncodeRequest`` (text only).
- TextEncoder -> Denoiser: ``Encoded`` (the conditioning), replica to replica: the Ingress
  passes the TextEncoder's response on unresolved.
- Denoiser -> VAEDecoder: ``Denoised``, its latents as numpy. From ``denoise`` it goes replica
  to replica like ``Encoded``. From ``denoise_stream`` it goes through the caller (which reads
  the ``StepProgress`` before it), latents included: they are small (SDXL 1024 px: 256 kB), and
  an ``ObjectRef`` put by the Denoiser and passed on from a stream item was at times freed by
  Ray's reference counting before the VAEDecoder read it (ReferenceCountingAssertionError).
- VAEDecoder -> Ingress: ``Decoded``, the PNG.

Each stage adds its own compute time to ``timings`` (milliseconds), so the Ingress can report
per-stage timings although the data went replica to replica without passing through it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from pipeline.embedding_library import PromptEmbeddings
from pipeline.lora_set import LoraSet

if TYPE_CHECKING:  # the Ingress imports this module, and never torch: only stages hold tensors
    from pipeline.conditioning import Conditioning


@dataclass(frozen=True)
class EncodeRequest:
    """Also the TextEncoder's embedding-cache key: everything that decides the conditioning."""

    model: str
    prompt: str
    negative_prompt: str | None = None
    loras: LoraSet = ()  # normalized LoRA set (text-encoder parts apply)
    embeddings: PromptEmbeddings = ()  # textual inversions the prompts name, with file versions
    clip_skip: int = 1  # A1111's CLIP_stop_at_last_layers: 1 = the last layer


@dataclass
class Encoded:
    model: str
    conditioning: Conditioning
    timings: dict[str, float] = field(default_factory=dict)
    loras: LoraSet = ()  # the Denoiser applies their UNet parts


@dataclass(frozen=True)
class StepProgress:
    """One denoising step done: what ``Denoiser.denoise_stream`` yields before the ``Denoised``."""

    step: int  # steps done so far
    steps: int  # steps in all
    preview: np.ndarray | None = None  # (h, w, 3) uint8 at latent size, when asked for


@dataclass
class Denoised:
    model: str
    latents: np.ndarray  # (1, C, h, w) float32: numpy, so the Ingress reads a stream's without torch
    timings: dict[str, float] = field(default_factory=dict)
    steps_computed: int = 0  # UNet steps run in full
    steps_cached: int = 0  # steps First Block Cache approximated


@dataclass
class Decoded:
    png: bytes
    timings: dict[str, float] = field(default_factory=dict)
    steps_computed: int = 0  # carried over from Denoised, whose latents the Ingress never reads
    steps_cached: int = 0
