"""One local Ray and one Raydiance app for every test in this package, over real HTTP.

Package-scoped (the same thing as session-scoped for the tests here): Ray and Serve start once,
and stop when the package's last test is done, so that tests/placement can start its own
multi-node cluster afterwards.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tools.tiny_shapes import MODEL_DIR  # noqa: E402

APP_NAME = "raydiance"
LIMITS = {"max_width": 256, "max_height": 256, "max_steps": 50, "max_images": 4,
          "max_prompt_chars": 300, "max_input_bytes": 65536}  # a body limit of ~1.17 MiB


@dataclass
class Service:
    url: str
    client: httpx.Client
    checkpoints_dir: Path
    loras_dir: Path
    embeddings_dir: Path | None = None

    def generate(self, **body) -> httpx.Response:
        return self.client.post("/v1/generate", json=body)


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def model_folders(root: Path) -> tuple[Path, Path]:
    """A checkpoints folder holding the built-in model as one single-file checkpoint
    (``tiny-single``), a small random SD1.5 as a diffusers folder (``random-sd15``) and a small
    random SDXL as a single file (``random-sdxl``); and a loras folder with two LoRAs in both
    formats (``a_kohya``, ``a_peft``, ``b_kohya``, ``b_peft``), all made here."""
    from tools.checkpoint_writer import save_checkpoint
    from pipeline.loading import load_model
    from tools.random_models import build_random_sd15, build_random_sdxl, write_lora_pair

    checkpoints, loras = root / "checkpoints", root / "loras"
    loras.mkdir(parents=True)
    model = load_model(MODEL_DIR)
    save_checkpoint(model, checkpoints / "tiny-single.safetensors")
    build_random_sd15(checkpoints / "random-sd15", latent_size=16)
    save_checkpoint(build_random_sdxl(root / "random-sdxl", latent_size=16),
                    checkpoints / "random-sdxl.safetensors")
    write_lora_pair(model, loras, "a", seed=1)
    write_lora_pair(model, loras, "b", seed=2)
    return checkpoints, loras


def embedding_folder(root: Path) -> Path:
    """An embeddings folder: ``tinystyle`` (SD1.5, for tiny-shapes' 64-wide CLIP, 2 vectors),
    ``swapstyle`` (the same shape, for replacing), ``xlstyle`` (SDXL, for random-sdxl's 32 + 48)
    and ``evil.pt``, a pickle that leaves ``root / "unpickled"`` behind if anything reads it."""
    import torch

    from tools.embedding_files import write_embedding, write_tripwire_pickle

    folder, generator = root / "embeddings", torch.Generator().manual_seed(14)
    write_embedding(folder / "tinystyle.safetensors", torch.randn(2, 64, generator=generator))
    write_embedding(folder / "swapstyle.safetensors", torch.randn(1, 64, generator=generator))
    write_embedding(folder / "xlstyle.safetensors", (torch.randn(2, 32, generator=generator),
                                                      torch.randn(2, 48, generator=generator)))
    write_tripwire_pickle(folder / "evil.pt", root / "unpickled")
    return folder


@pytest.fixture(scope="package")
def service(tmp_path_factory):
    import ray
    from ray import serve

    from deployments.app import build_app
    from tools.local_serve import deploy, free_port, wait_http

    library = tmp_path_factory.mktemp("library")
    checkpoints, loras = model_folders(library)
    embeddings = embedding_folder(library)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        app = build_app({"models": {"tiny-shapes": str(MODEL_DIR)}, "accelerator": "cpu",
                         "limits": LIMITS, "checkpoints_dir": str(checkpoints),
                         "loras_dir": str(loras), "embeddings_dir": str(embeddings),
                         "max_models_per_replica": 2})
        deploy(app, APP_NAME, timeout_s=240)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout_s=60)
        with httpx.Client(base_url=url, timeout=120.0) as client:
            yield Service(url, client, checkpoints, loras, embeddings)
    finally:
        serve.shutdown()
        ray.shutdown()
