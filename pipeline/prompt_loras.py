"""AUTOMATIC1111's ``<lora:name:weight>`` prompt syntax: the tags out of the prompt, into a list.

Clients written for A1111 (Open WebUI, SillyTavern) ask for LoRAs inside the prompt text. The
weight is optional (1.0); a third field (A1111's separate UNet weight) is refused rather than
silently read wrongly.
"""
from __future__ import annotations

import re

from pipeline.errors import InvalidRequestError

MAX_LORA_WEIGHT = 10.0
"""The bound on a LoRA's weight, in every dialect: |weight| <= 10. Useful weights are about
-2..2; a LoRA's delta scaled by 1e30 overflows the UNet's activations to inf/NaN (a black
image), so far beyond any useful weight is refused rather than computed."""

_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its ``<lora:...>`` tags, [(name, weight)] in the order written)."""
    loras: list[tuple[str, float]] = []
    for body in _TAG.findall(prompt):
        name, *rest = body.split(":")
        name = name.strip()
        if not name or len(rest) > 1:
            raise InvalidRequestError("prompt", f"<lora:{body}>: write <lora:name> or <lora:name:weight>")
        loras.append((name, _weight(body, rest[0]) if rest else 1.0))
    if not loras:
        return prompt, loras
    return re.sub(r"\s{2,}", " ", _TAG.sub(" ", prompt)).strip(), loras


def _weight(tag: str, text: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise InvalidRequestError("prompt", f"<lora:{tag}>: weight {text!r} is not a number") from None
    if not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:  # NaN fails this too
        raise InvalidRequestError("prompt", f"<lora:{tag}>: weight must be a finite number in "
                                  f"-{MAX_LORA_WEIGHT:g}..{MAX_LORA_WEIGHT:g}")
    return weight
