"""The diffusers configs of SD1.5 and SDXL base, bundled so that single-file checkpoints load offline.

These are the files ``from_single_file`` would fetch from the hub (stable-diffusion-v1-5 and
stable-diffusion-xl-base-1.0): ``model_index.json``, ``<component>/config.json``,
``scheduler/scheduler_config.json`` and the tokenizers' ``tokenizer_config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parent


def bundled_config(family: str, component: str) -> dict[str, Any]:
    """A fresh copy of ``family``'s config for ``component`` ("unet", "vae", "text_encoder",
    "text_encoder_2", "scheduler", "tokenizer", "tokenizer_2" or "model_index")."""
    folder = CONFIG_DIR / family
    if component == "model_index":
        path = folder / "model_index.json"
    elif component == "scheduler":
        path = folder / "scheduler" / "scheduler_config.json"
    elif component.startswith("tokenizer"):
        path = folder / component / "tokenizer_config.json"
    else:
        path = folder / component / "config.json"
    return json.loads(path.read_text())
