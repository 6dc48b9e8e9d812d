"""Shared fixtures: the built-in model and small random-weight models built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # two busy cores: one torch thread per process runs fastest

REPO = Path(__file__).resolve().parents[1]
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL  # noqa: E402


@pytest.fixture(scope="session")
def builtin_model():
    from pipeline.loading import load_model

    return load_model(BUILTIN_MODEL)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    from tools.random_models import build_random_sdxl

    return build_random_sdxl(tmp_path_factory.mktemp("random-sdxl"), latent_size=16)


@pytest.fixture(scope="session")
def sdxl_model(sdxl_folder):
    from pipeline.loading import load_model

    return load_model(sdxl_folder)
