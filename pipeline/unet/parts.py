"""The callable parts of the batched UNet forward, as the cache strategies call them.

``UNetParts`` is the eager set: ``head``/``tail``/``out`` are ``pipeline.unet.split``'s
``run_head``/``run_tail``/``run_out`` and ``whole`` the UNet's own forward. A model holds
one set (``DiffusionModel.unet_parts``, ``EAGER`` by default); a compiled model holds a
``pipeline.unet.compiled.CompiledParts``, whose parts give the same results within fp
tolerance. The runner passes the model's set to the cache strategy and never branches on it.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from pipeline.unet.split import Head, run_head, run_out, run_tail


class UNetParts:
    """The eager parts: exactly ``pipeline.unet.split``'s parts and the UNet's own forward."""

    compiled = False

    def begin_step(self) -> None:
        """Called once before each engine step's first part (CUDA graphs mark a new step)."""

    def head(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor,
             added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> Head:
        return run_head(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)

    def tail(self, unet: UNet2DConditionModel, head: Head) -> torch.Tensor:
        return run_tail(unet, head)

    def out(self, unet: UNet2DConditionModel, hidden: torch.Tensor) -> torch.Tensor:
        return run_out(unet, hidden)

    def whole(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
              encoder_hidden_states: torch.Tensor,
              added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The whole UNet over a batch (``pipeline.unet.forward.forward`` joins and splits it)."""
        return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs, return_dict=False)[0]


EAGER = UNetParts()
