"""One fixed LoRA adapter in a compiled UNet, into which every LoRA set is written: switching sets
copies weights and never recompiles.

dynamo guards on peft's modules: the adapters a layer holds, the active ones and their scales
(Python floats). A compiled UNet holding each LoRA as its own adapter, as ``AdapterManager`` keeps
them on an eager model, recompiled its head and tail at every set switch (seconds on a CPU, far
longer with CUDA graphs). Here the UNet holds one adapter, the slot: scale 1, a fixed rank. A
set's LoRAs are joined along the rank (their down factors stacked, their up factors side by side,
each up factor times its LoRA's scale and the request's weight), zero-padded, and copied into the
slot's own tensors in place (under CUDA graphs their addresses are what a graph replays). The
forward then adds exactly the sum peft adds with the LoRAs as separate adapters.

What recompiles, once each: the first set (the slot's layers are new), a LoRA on a layer the slot
does not cover yet or a set of more rank than it holds (the slot is rebuilt over the union, its
rank the next power of two; it starts at ``MIN_RANK``), and going between a set and none
(``disable_lora``: two variants, each compiled once). DoRA and LoRAs with a bias do not reduce
to two factors: they are refused on a compiled model.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from pipeline.errors import InvalidRequestError

SLOT = "raydiance_slot"
MIN_RANK = 32
"""The slot's rank to begin with: most SD LoRAs are rank 32 or less, so one slot serves them
without growing; each rank of padding costs a little compute on every LoRA'd layer."""


@dataclass(frozen=True)
class LayerFactors:
    """One LoRA on one layer: ``down`` is peft's ``lora_A`` weight (rank first), ``up`` its
    ``lora_B`` weight (rank second) times the LoRA's scale (alpha / rank)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


LoraFactors = dict[str, LayerFactors]
"""One LoRA's factors by the name of the UNet layer they apply to."""


def take_factors(unet: UNet2DConditionModel, adapter: str, lora: str) -> LoraFactors:
    """The factors of peft adapter ``adapter`` as injected into ``unet`` (by diffusers'
    loaders, which convert every file layout), copied out; InvalidRequestError naming
    ``loras`` for a LoRA that is not two factors (``lora`` names it)."""
    factors: LoraFactors = {}
    for name, module in unet.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if adapter in getattr(module, "lora_variant", {}) or module.lora_bias.get(adapter):
            raise InvalidRequestError("loras", f"{lora}: DoRA and LoRAs with a bias cannot run on a "
                                      "compiled model (compile: true); serve it from another model entry")
        down = module.lora_A[adapter].weight.detach().clone()
        up = module.lora_B[adapter].weight.detach() * module.scaling[adapter]  # a new tensor
        factors[name] = LayerFactors(down, up)
    return factors


class LoraSlot:
    """The slot adapter of one UNet: ``write`` puts a set in it (and makes it the active
    adapter), ``clear`` turns LoRAs off."""

    def __init__(self, unet: UNet2DConditionModel) -> None:
        self.unet = unet
        self.layers: frozenset[str] = frozenset()
        self._modules: dict[str, LoraLayer] = {}  # the slot's layers, found once per rebuild
        self.rank = 0
        self.rebuilds = 0  # times the slot was (re)made: each is a recompile of the parts

    def write(self, loras: Sequence[tuple[LoraFactors, float]]) -> None:
        """The set ``loras`` ((factors, weight) per LoRA) into the slot, growing it first if a
        layer or the rank does not fit."""
        layers = frozenset().union(*(factors for factors, _ in loras))
        rank = max((sum(f[layer].rank for f, _ in loras if layer in f) for layer in layers), default=1)
        if not layers <= self.layers or rank > self.rank:
            self._rebuild(self.layers | layers, max(self.rank, MIN_RANK, 1 << (rank - 1).bit_length()))
        with torch.no_grad():
            for layer, module in self._modules.items():
                down, up = module.lora_A[SLOT].weight, module.lora_B[SLOT].weight
                down.zero_()
                up.zero_()
                start = 0
                for factors, weight in loras:
                    if layer in factors:
                        part = factors[layer]
                        down[start:start + part.rank].copy_(part.down)
                        up[:, start:start + part.rank].copy_(part.up * weight)
                        start += part.rank
        self.unet.enable_lora()
        self.unet.set_adapters([SLOT], [1.0])  # the same adapter and scale every time: no guard moves

    def clear(self) -> None:
        if self.rank:
            self.unet.disable_lora()

    def _rebuild(self, layers: frozenset[str], rank: int) -> None:
        if self.rank:
            self.unet.delete_adapters(SLOT)
        pattern = "^(?:" + "|".join(re.escape(layer) for layer in sorted(layers)) + ")$"
        # alpha = rank: scale 1; the factors carry each LoRA's own scale
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=pattern), adapter_name=SLOT)
        self.layers, self.rank = layers, rank
        self._modules = {name: module for name, module in self.unet.named_modules() if name in layers}
        self.rebuilds += 1
