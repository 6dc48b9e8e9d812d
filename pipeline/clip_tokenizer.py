"""CLIP tokenizers built on this machine, never fetched: OpenAI's BPE merges ship inside PyPI packages.

A single-file checkpoint holds no tokenizer, and diffusers would fetch one from the hub. OpenAI's
``openai-clip`` package ships the BPE merges (``bpe_simple_vocab_16e6.txt.gz``); the vocabulary
is derived from them exactly as OpenAI's ``SimpleTokenizer`` does, then written as the
``vocab.json`` + ``merges.txt`` pair that ``CLIPTokenizer.from_pretrained`` reads (transformers
5.x can no longer build one from the two file paths).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.errors import ModelLoadError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
VOCAB_SIZE = 49408
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_MERGE_COUNT = VOCAB_SIZE - 2 * 256 - 2  # byte symbols, their word-final forms, BOS and EOS


def bpe_path() -> Path:
    """The BPE merges file inside the installed ``openai-clip`` package (located, not imported:
    importing it would pull in torchvision)."""
    spec = importlib.util.find_spec("clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(location) / BPE_FILE).is_file():
            return path
    raise ModelLoadError(f"the CLIP vocabulary ({BPE_FILE}) is missing: pip install openai-clip")


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab, merge lines) of OpenAI's CLIP tokenizer, 49408 tokens."""
    lines = gzip.decompress(bpe_path().read_bytes()).decode("utf-8").split("\n")
    merges = tuple(lines[1:1 + _MERGE_COUNT])  # line 0 is the version header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def tokenizer_from_files(vocab: dict[str, int], merges: list[str] | tuple[str, ...], *,
                         pad_token: str = EOS, max_length: int = MAX_LENGTH) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` from an in-memory vocabulary and merge lines, through a scratch folder."""
    with tempfile.TemporaryDirectory(prefix="raydiance-tokenizer-") as scratch:
        folder = Path(scratch)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True,
                                             model_max_length=max_length, pad_token=pad_token)


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer as SD1.5 and SDXL use it; SDXL's second tokenizer pads with ``"!"``."""
    vocab, merges = clip_vocabulary()
    return tokenizer_from_files(vocab, merges, pad_token=pad_token)
