"""AUTOMATIC1111's ``<lora:name:weight>`` prompt syntax: the tags out of the prompt, into a list.

Clients written for A1111 (Open WebUI, SillyTavern) ask for LoRAs inside the prompt text. The
weight is optional (1.0); a third field (A1111's separate UNet weight) is refused rather than
silently read wrongly.
"""
from __future__ import annotations

import math
import re

from pipeline.errors import InvalidRequestError

_TAG = re.compile(r"<lora:([^<>]*)>", re.IGNORECASE)


def parse_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(the prompt without its ``<lora:...>`` tags, [(name, weight)] in the order written)."""
    loras: list[tuple[str, float]] = []
    for body in _TAG.findall(prompt):
        name, *rest = body.split(":")
        name = name.strip()
        if not name or len(rest) > 1:
            raise InvalidRequestError("prompt", f"<lora:{body}>: write <lora:name> or <lora:name:weight>")
        weight = 1.0
        if rest:
            try:
                weight = float(rest[0])
            except ValueError:
                raise InvalidRequestError("prompt", f"<lora:{body}>: weight {rest[0]!r} is not a number") from None
            if not math.isfinite(weight):
                raise InvalidRequestError("prompt", f"<lora:{body}>: weight must be finite")
        loras.append((name, weight))
    if not loras:
        return prompt, loras
    return re.sub(r"\s{2,}", " ", _TAG.sub(" ", prompt)).strip(), loras
