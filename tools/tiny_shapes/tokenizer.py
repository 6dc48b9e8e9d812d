"""A CLIP BPE vocabulary for the tiny-shapes words, built here rather than downloaded.

Byte-level symbols (as CLIP's) plus one merge chain per known word, so each known word is one
token and any other text still tokenizes, byte by byte.
"""
from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def build_vocabulary(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) such that each of ``words`` encodes to a single token."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Earlier merges fire first; chain the remaining symbols left to right. New merges rank
        # after all old ones, so they never change how an earlier word splits.
        symbols = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(words: tuple[str, ...], folder: Path) -> CLIPTokenizer:
    """Write a ``CLIPTokenizer`` folder for ``words`` and load it back from disk."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(words)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(
        folder, local_files_only=True, model_max_length=MAX_LENGTH, pad_token=EOS
    )
    tokenizer.save_pretrained(folder)
    for word in words:
        ids = tokenizer(word).input_ids
        if len(ids) != 3:
            raise AssertionError(f"{word!r} did not become one token: {ids}")
    return tokenizer
