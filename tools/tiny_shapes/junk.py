"""Text from outside the tiny-shapes world, mixed into training prompts.

Real clients send words the world does not know: quality tags in the prompt, and a negative
prompt by default ("lowres, bad anatomy, ..., blurry"). Training on prompts padded with such
words, and on unconditional rows made only of them, teaches the model that they mean nothing:
under classifier-free guidance a negative prompt of them then acts as the empty prompt does.

The list below is fixed; ``evaluate.NEGATIVE_PROMPTS["unseen_words"]`` holds words kept out of it,
to see whether ignoring them generalises.
"""
from __future__ import annotations

import random

from tools.tiny_shapes import world

OUT_OF_WORLD: tuple[str, ...] = (
    # quality and negative-prompt tags
    "masterpiece", "best quality", "high quality", "highres", "absurdres", "ultra detailed",
    "8k", "4k", "uhd", "hdr", "sharp focus", "detailed", "intricate details", "lowres",
    "low quality", "worst quality", "normal quality", "bad quality", "jpeg artifacts", "blurry",
    "blur", "bad anatomy", "bad hands", "extra fingers", "missing fingers", "text", "error",
    "cropped", "signature", "watermark", "username", "logo", "noise", "nsfw", "score_9",
    "score_8_up", "score_7_up", "source_anime", "rating_safe", "easynegative", "embedding:bad",
    # subject and style words
    "1girl", "solo", "portrait", "landscape", "anime", "photo", "photorealistic", "realistic",
    "cinematic lighting", "studio lighting", "illustration", "digital art", "concept art",
    "oil painting", "watercolor", "sketch", "minimalist", "flat colors", "simple", "trending on artstation",
    "by greg rutkowski", "by alphonse mucha", "artstation", "pixiv", "octane render",
    "unreal engine", "bokeh", "depth of field", "vibrant", "dramatic", "cute", "beautiful",
    "the", "of", "and", "with", "in", "is", "an", "picture", "image", "shape", "colour", "color",
)
SEPARATORS: tuple[str, ...] = (", ", ", ", ", ", " ", ",", " | ", ". ", "; ", "\n")
PUNCTUATION = "()[]{}<>:;,.!?'\"-_+=*/\\|#@&%$^~`"
_WORLD_WORDS = frozenset(world.WORDS)


def byte_junk(rng: random.Random) -> str:
    """A made-up word: letters, digits, punctuation and now and then a non-ASCII character."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789" + PUNCTUATION + "éüß日本語🙂"
    while True:
        word = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        if word.strip() and word.lower() not in _WORLD_WORDS:
            return word


def piece(rng: random.Random) -> str:
    """One out-of-world piece: a listed word (sometimes weighted, A1111 style) or byte junk."""
    if rng.random() < 0.25:
        return byte_junk(rng)
    word = rng.choice(OUT_OF_WORLD)
    if rng.random() < 0.1:
        word = f"({word}:{rng.uniform(0.5, 1.5):.1f})"
    return word


def junk_text(rng: random.Random, pieces: int, max_bytes: int | None = None) -> str:
    """``pieces`` out-of-world pieces joined by prompt-like separators, at most ``max_bytes`` long
    (UTF-8; each byte is at most one token, so this bounds the token count too)."""
    text = ""
    for _ in range(pieces):
        candidate = (text + rng.choice(SEPARATORS) if text else "") + piece(rng)
        if max_bytes is not None and len(candidate.encode()) > max_bytes:
            break
        text = candidate
    return text


def padded_prompt(prompt: str, rng: random.Random) -> str:
    """``prompt`` with out-of-world text before it (short: the prompt stays inside CLIP's 77
    tokens), after it, or both."""
    where = rng.choice(("before", "after", "after", "both"))
    before = junk_text(rng, rng.randint(1, 4), max_bytes=60) if where != "after" else ""
    after = junk_text(rng, rng.randint(1, 16)) if where != "before" else ""
    return rng.choice(SEPARATORS).join(t for t in (before, prompt, after) if t)


def unconditional_prompt(rng: random.Random) -> str:
    """A prompt made only of out-of-world text, from one word to past CLIP's 77 tokens."""
    return junk_text(rng, rng.randint(1, 20))
