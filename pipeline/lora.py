"""LoRAs on a loaded model as named peft adapters: load once, switch sets per batch by weights.

Files are kohya (``lora_unet_*``, ``lora_te{,1,2}_*`` with ``lora_down``/``lora_up``/``alpha``)
or diffusers/peft (``unet.*.lora_A.weight``); diffusers' ``lora_state_dict`` converts the former,
and ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` inject them. An ``AdapterManager``
keeps up to ``max_loaded`` of them on one model (least recently used evicted) and activates a
set by setting each adapter's weight: switching sets reloads nothing. All requests of a batch
share one set, so the engine calls ``activate`` before the batch's UNet forward, and the
text-encoding stage before it encodes. A load is two parts: ``read`` (the file, off the model's
thread) and ``load`` (the injection, on it); servers do both when a request arrives, so the
``activate`` of a step only sets weights. A LoRA's parts go where their weights live: into the UNet
and text encoders the model holds (a Denoiser's model holds only the UNet, a TextEncoder's only
the text encoders), the rest of the file is not used there. A compiled UNet is the exception: it
holds one slot adapter that each set is written into (``pipeline.lora_slot``), so that a switch
never recompiles it; the manager keeps each LoRA's UNet factors off the model for that.
"""
from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.loaders import (
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.loaders.lora_base import (
    disable_lora_for_text_encoder,
    enable_lora_for_text_encoder,
    set_adapters_for_text_encoder,
)
from diffusers.utils.peft_utils import delete_adapter_layers
from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.errors import InvalidRequestError
from pipeline.library import LoraLibrary
from pipeline.lora_set import LoraSet, normalize_loras
from pipeline.lora_slot import LoraFactors, LoraSlot, take_factors
from pipeline.model import DiffusionModel
from pipeline.model_configs import text_encoder_names
from pipeline.pickles import SAFETENSORS

_UNET_MODULES = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in.", "conv_out.", "time_embedding.",
                 "add_embedding.")
_LORA_KEY = re.compile(r"lora_(down|up|A|B)\.|lora\.(down|up)\.|lora_linear_layer|\.alpha$|dora_scale"
                       r"|lora_magnitude_vector")
_QUIET_LOGGERS = ("transformers.integrations.peft", "transformers.utils.loading_report",
                  "diffusers.loaders.lora_base", "diffusers.loaders.peft", "diffusers.loaders.lora_pipeline",
                  "diffusers.utils.peft_utils", "peft")


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """A LoRA file's tensors and diffusers' adapter metadata; anything but safetensors (a
    pickle above all) is refused unread. An unreadable file is the request's to fix (it named
    that LoRA): an ``InvalidRequestError`` naming ``loras``, not a fault of the server."""
    if path.suffix.lower() != SAFETENSORS:
        raise InvalidRequestError("loras", f"{path.name}: only .safetensors LoRAs are loaded")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = (f.metadata() or {}).get("lora_adapter_metadata")
        return load_file(path), json.loads(metadata) if metadata else None
    except Exception as error:  # safetensors' own error types, bad JSON
        raise InvalidRequestError("loras", f"{path.name}: not a readable safetensors LoRA "
                                  f"({str(error)[:200]})") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Loading an adapter makes transformers log a table of every base weight as "missing";
    silence that, diffusers' notes and peft's warning about a second adapter (intended here)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _text_encoder_to_peft(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Kohya text-encoder keys come out of diffusers' conversion in its old naming, which its
    loader recognises only when an ``out_proj`` LoRA is present; name them the peft way here."""
    if any(".lora_A." in k or ".lora_B." in k for k in state_dict):
        return state_dict
    return convert_state_dict_to_peft(state_dict, original_type=StateDictType.DIFFUSERS_OLD)


@dataclass(frozen=True)
class PreparedLora:
    """A LoRA file read, checked and converted for one model, not yet injected into it."""

    name: str
    state_dict: dict[str, torch.Tensor]  # peft keys, prefixed by component (``unet.``, ...)
    alphas: dict[str, torch.Tensor] | None  # kohya's network alphas
    metadata: dict | None  # diffusers' adapter metadata (rank, alpha), where the file has it


class AdapterManager:
    """The LoRAs loaded on one model, at most ``max_loaded``, and the set now active.

    Adapters go into the UNet and text encoders that ``model`` holds, whichever those are. Holds
    those modules and not the model itself, so a map keyed weakly by the model can keep it.
    ``read`` (the files: checked, converted) touches no module and may run on any thread, so a
    server reads while the model runs; ``load`` and ``activate`` change modules: call them from
    the thread that runs the model.
    """

    def __init__(self, model: DiffusionModel, library: LoraLibrary, *, max_loaded: int = 8) -> None:
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.library, self.max_loaded = library, max_loaded
        self._model_name, self._family = model.name, model.family
        self._unet_config = FrozenDict(model.unet_config)
        self._encoder_names = text_encoder_names(model.family)
        # the components that take LoRAs, by diffusers' names: unet, text_encoder, text_encoder_2
        self._components = {name: module for name, module in model.modules().items() if name != "vae"}
        self._mixin = (StableDiffusionXLLoraLoaderMixin if model.family == "sdxl"
                       else StableDiffusionLoraLoaderMixin)
        self._adapters: OrderedDict[str, str] = OrderedDict()  # LoRA name -> adapter name, LRU first
        self._where: dict[str, list[str]] = {}  # adapter name -> names of the components holding it
        self._serial = 0
        self._active: LoraSet | None = ()  # None: the components' state is unknown (after a failure)
        self.loads = 0  # LoRA files loaded so far (a set switch that reloads nothing adds none)
        # A compiled UNet takes its LoRAs through one slot adapter (``pipeline.lora_slot``): each
        # LoRA's UNet factors are kept here, off the UNet, and a set is written into the slot.
        unet = self._components.get("unet")
        self.slot = LoraSlot(unet) if unet is not None and model.unet_parts.compiled else None
        self._unet_factors: dict[str, LoraFactors] = {}  # adapter name -> its UNet factors

    @property
    def loaded(self) -> tuple[str, ...]:
        """Names of the LoRAs held, least recently used first."""
        return tuple(self._adapters)

    def read(self, loras: Iterable[tuple[str, float]]) -> dict[str, PreparedLora]:
        """The files of the LoRAs of ``loras`` not held yet, read and checked: the slow part of a
        load, which touches no module (InvalidRequestError/ModelLoadError for an unusable file)."""
        wanted = self._checked(loras)
        return {name: self._prepare(name) for name, _ in wanted if name not in self._adapters}

    def load(self, loras: Iterable[tuple[str, float]],
             prepared: Mapping[str, PreparedLora] | None = None) -> LoraSet:
        """Put on the model the LoRAs of ``loras`` it lacks (from ``prepared`` where ``read``
        already read them), evicting the least recently used others; activates nothing."""
        wanted = self._checked(loras)
        names = {name for name, _ in wanted}
        for name, _ in wanted:
            if name in self._adapters:
                self._adapters.move_to_end(name)
                continue
            ready = (prepared or {}).get(name) or self._prepare(name)
            while len(self._adapters) >= self.max_loaded:
                victim = next(n for n in self._adapters if n not in names)
                self._unload(self._adapters.pop(victim))
            self._adapters[name] = self._inject(ready)
        return wanted

    def activate(self, loras: Iterable[tuple[str, float]]) -> LoraSet:
        """Make ``loras`` the active set (loading what is missing); returns it in canonical form.
        Costs nothing when the set is the one already active."""
        wanted = normalize_loras(loras)
        if wanted == self._active:
            return wanted
        self.load(wanted)
        self._apply(wanted)
        self._active = wanted
        return wanted

    def _checked(self, loras: Iterable[tuple[str, float]]) -> LoraSet:
        wanted = normalize_loras(loras)
        if len(wanted) > self.max_loaded:
            raise InvalidRequestError("loras", f"at most {self.max_loaded} LoRAs at once")
        return wanted

    def _apply(self, wanted: LoraSet) -> None:
        for name, component in self._components.items():
            held = [(self._adapters[n], w) for n, w in wanted if name in self._where[self._adapters[n]]]
            if name == "unet" and self.slot is not None:
                if held:
                    self.slot.write([(self._unet_factors[a], w) for a, w in held])
                else:
                    self.slot.clear()
            elif name == "unet":
                if held:
                    component.enable_lora()
                    component.set_adapters([a for a, _ in held], [w for _, w in held])
                elif getattr(component, "peft_config", None):
                    component.disable_lora()
            elif held:
                enable_lora_for_text_encoder(component)
                set_adapters_for_text_encoder([a for a, _ in held], component, [w for _, w in held])
            elif getattr(component, "peft_config", None):
                disable_lora_for_text_encoder(component)
            component.requires_grad_(False)  # peft marks active adapters trainable

    def _prepare(self, name: str) -> PreparedLora:
        """LoRA ``name``'s file read, its kind and layout checked, its keys made diffusers'."""
        path = self.library.resolve(name)
        state_dict, metadata = read_lora(path)
        if not state_dict or not all(_LORA_KEY.search(key) for key in state_dict):
            raise InvalidRequestError("loras", f"{name}: not a LoRA (LoHa, LoKr and other LyCORIS "
                                      "kinds are not supported)")
        try:
            with _quiet():
                state_dict, alphas = self._mixin.lora_state_dict(
                    state_dict, unet_config=self._unet_config)
        except ValueError as error:  # key names diffusers cannot place
            raise InvalidRequestError("loras", f"{name}: LoRA layout not understood ({error})") from None
        if all(k.startswith(_UNET_MODULES) for k in state_dict):  # a bare peft UNet adapter
            state_dict = {f"unet.{k}": v for k, v in state_dict.items()}
        known = ("unet.", *(p + "." for p in self._encoder_names))
        if not any(k.startswith(known) for k in state_dict):
            raise InvalidRequestError("loras", f"{name}: has no weights for this {self._family} "
                                      "model's UNet or text encoders")
        if metadata is not None and alphas:
            metadata = None  # diffusers takes one or the other; kohya alphas are the weights' own
        return PreparedLora(name, state_dict, alphas, metadata)

    def _inject(self, lora: PreparedLora) -> str:
        """Inject ``lora`` into this manager's parts as a fresh adapter; returns its name."""
        state_dict, alphas, metadata = lora.state_dict, lora.alphas, lora.metadata
        self._serial += 1
        adapter = f"lora_{self._serial}"
        self._where[adapter] = []
        try:
            with _quiet():
                if "unet" in self._components and any(k.startswith("unet.") for k in state_dict):
                    self._mixin.load_lora_into_unet(state_dict, alphas, self._components["unet"],
                                                    adapter_name=adapter, metadata=metadata)
                    self._where[adapter].append("unet")
                    if self.slot is not None:  # its factors kept, the adapter itself taken out
                        self._unet_factors[adapter] = take_factors(self._components["unet"], adapter,
                                                                   lora.name)
                        self._components["unet"].delete_adapters(adapter)
                for prefix in self._encoder_names:
                    part = {k: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
                    if prefix not in self._components or not part:
                        continue
                    part = {f"{prefix}.{k}": v for k, v in _text_encoder_to_peft(
                        {k[len(prefix) + 1:]: v for k, v in part.items()}).items()}
                    self._mixin.load_lora_into_text_encoder(
                        part, alphas, self._components[prefix], prefix=prefix, adapter_name=adapter,
                        metadata=metadata)
                    self._where[adapter].append(prefix)
        except InvalidRequestError:
            self._unload(adapter)
            raise
        except Exception as error:  # shapes that do not fit, modules the model lacks
            self._unload(adapter)
            raise InvalidRequestError("loras", f"{lora.name}: does not fit model {self._model_name!r} "
                                      f"({type(error).__name__}: {str(error)[:300]})") from None
        self.loads += 1
        return adapter

    def _unload(self, adapter: str) -> None:
        """Delete ``adapter`` wherever it was injected, even partly (a load that failed)."""
        self._where.pop(adapter, None)
        self._unet_factors.pop(adapter, None)
        for name, component in self._components.items():
            if adapter not in (getattr(component, "peft_config", None) or {}):
                continue
            with _quiet():
                if name == "unet":
                    component.delete_adapters(adapter)
                else:  # transformers' own delete_adapter wants peft >= 0.22, not yet released
                    delete_adapter_layers(component, adapter)
        self._active = None  # the next activate sets every component again
