"""Fit a model's latent-to-RGB preview map (``vae/latent_rgb.json``) for a VAE that is not its
family's (the built-in model's): least squares from the VAE's latents of random colour-block
images to those images shrunk to the latent grid.

    python -m tools.fit_latent_rgb models/tiny-shapes [--images 256]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.loading import load_model
from pipeline.preview import LATENT_RGB_FILE, LatentRGB


def colour_blocks(rng: np.random.Generator, size: int, blocks: int = 4) -> np.ndarray:
    """(size, size, 3) in [-1, 1]: a grid of random flat colours, the previews' usual matter."""
    colours = rng.uniform(-1, 1, (blocks, blocks, 3)).astype(np.float32)
    return np.kron(colours, np.ones((size // blocks, size // blocks, 1), np.float32))


def fit(folder: Path, images: int, seed: int = 0) -> LatentRGB:
    model = load_model(folder, components=("vae",))
    size = model.configs.description.native_size
    rng = np.random.default_rng(seed)
    rows, targets = [], []
    with torch.inference_mode():
        for _ in tqdm(range(images), desc="encoding", unit="image"):
            pixels = torch.from_numpy(colour_blocks(rng, size)).permute(2, 0, 1)[None]
            latents = model.vae.encode(pixels).latent_dist.mode() * model.vae.config.scaling_factor
            small = torch.nn.functional.interpolate(pixels, size=latents.shape[-2:], mode="area")
            rows.append(latents[0].flatten(1).T)
            targets.append(small[0].flatten(1).T)
    x = torch.cat(rows).double()
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(x, torch.cat(targets).double()).solution
    residual = (x @ solution - torch.cat(targets).double()).abs().mean().item()
    print(f"mean absolute error {residual * 127.5:.1f}/255 per channel")
    return LatentRGB(tuple(tuple(round(v, 4) for v in row) for row in solution[:-1].tolist()),
                     tuple(round(v, 4) for v in solution[-1].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    latent_rgb = fit(args.folder, args.images)
    out = args.folder / LATENT_RGB_FILE
    out.write_text(json.dumps(latent_rgb.to_json(), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
