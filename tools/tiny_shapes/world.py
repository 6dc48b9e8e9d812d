"""The tiny-shapes world: palette, prompts, procedural images and a pixel classifier.

Training draws its data here; tests and benchmarks judge generated images with ``classify``.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Scene:
    """One combination of the world: what a prompt asks for."""

    colour: str
    shape: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


ALL_SCENES: tuple[Scene, ...] = tuple(
    Scene(c, s, b) for s in SHAPES for c, b in itertools.permutations(COLOURS, 2)
)


def _held_out() -> frozenset[Scene]:
    """Four (colour, background) pairs per shape, none repeated, never seen in training."""
    rng = random.Random(20261125)
    pairs = list(itertools.permutations(COLOURS, 2))
    rng.shuffle(pairs)
    held = [Scene(c, shape, b) for shape, (c, b) in zip(SHAPES * 4, pairs[:12])]
    return frozenset(held)


HELD_OUT_SCENES: tuple[Scene, ...] = tuple(sorted(_held_out(), key=lambda s: s.prompt))
TRAIN_SCENES: tuple[Scene, ...] = tuple(s for s in ALL_SCENES if s not in _held_out())
WORDS: tuple[str, ...] = ("a", "on", "background", *SHAPES, *COLOURS)


def draw(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """Draw ``scene`` with a random size (40-70% of the side) and centre (within 8 px)."""
    scale = 4  # draw large and shrink: antialiased edges, as a real image has
    big = size * scale
    image = Image.new("RGB", (big, big), PALETTE[scene.background])
    pen = ImageDraw.Draw(image)
    extent = rng.uniform(0.40, 0.70) * big
    cx, cy = (big / 2 + rng.uniform(-8, 8) * scale for _ in range(2))
    half = extent / 2
    fill = PALETTE[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif scene.shape == "square":
        pen.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
    else:
        pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


_PALETTE_ARRAY = np.array(list(PALETTE.values()), dtype=np.float32)


def _nearest_palette(pixels: np.ndarray) -> np.ndarray:
    distances = ((pixels[..., None, :].astype(np.float32) - _PALETTE_ARRAY) ** 2).sum(-1)
    return distances.argmin(-1)


def classify(image: Image.Image) -> tuple[str, str]:
    """Return ``(shape colour, background colour)`` of a picture of this world.

    Background: the commonest nearest-palette colour of the border pixels. Shape: the commonest
    non-background nearest-palette colour in the central quarter of the image.
    """
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)))
    border = np.concatenate([pixels[:3].reshape(-1, 3), pixels[-3:].reshape(-1, 3),
                             pixels[:, :3].reshape(-1, 3), pixels[:, -3:].reshape(-1, 3)])
    background = np.bincount(_nearest_palette(border), minlength=len(COLOURS)).argmax()
    q = IMAGE_SIZE // 4
    centre = _nearest_palette(pixels[q:-q, q:-q].reshape(-1, 3))
    counts = np.bincount(centre, minlength=len(COLOURS))
    counts[background] = 0
    return COLOURS[int(counts.argmax())], COLOURS[int(background)]


def is_correct(image: Image.Image, scene: Scene) -> bool:
    """Both colours right: the acceptance measure of the built-in model."""
    return classify(image) == (scene.colour, scene.background)
