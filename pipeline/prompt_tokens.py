"""What a prompt becomes before CLIP: token ids with textual inversion vectors spliced in, and the
hidden layer clip skip picks.

Embeddings are applied as A1111 applies them (``EmbeddingsWithFixes``), not as diffusers'
``load_textual_inversion`` does: the prompt is tokenized once, each word that names an embedding
gives way to ``n`` placeholder ids, and during that one forward the token-embedding layer's
output has the embedding's vectors written at those positions (a forward hook, removed when the
forward ends). Nothing is added to the tokenizers, no embedding matrix is resized: the model
stays as loaded, shared by every request, and each row of a batch may use other embeddings
(or another version of a file) than its neighbours. Placeholder ids are 0, below EOS, so that the
pooled output (taken at the EOS token, found by ``argmax`` under the legacy ``eos_token_id: 2``
configs of SD1.5 and SDXL) stays where it belongs; tokens added past the vocabulary, as diffusers
adds them, would be taken for it.

Clip skip, A1111's "stop at last layers" (1 = the last layer, 2 = the penultimate...), is
diffusers' ``clip_skip`` + 1:
- SD1.5: ``hidden_states[-clip_skip]`` through the final layer norm (``clip_skip`` 1 is the usual
  ``last_hidden_state``), as A1111 and diffusers' ``StableDiffusionPipeline`` do;
- SDXL: ``hidden_states[-(clip_skip + 1)]`` of both encoders, no layer norm, as diffusers'
  ``StableDiffusionXLPipeline`` does (it always starts from the penultimate layer: 1 keeps that
  default, 2 takes the layer before); the pooled embedding stays the last layer's projection.
It applies to the prompt and the negative prompt alike, as in A1111 (diffusers skips for the
prompt alone).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from transformers import CLIPTokenizer

from pipeline.embeddings import TextEmbedding, check_fits
from pipeline.embedding_library import embedding_field, embedding_spans
from pipeline.errors import InvalidRequestError
from pipeline.model import DiffusionModel

PLACEHOLDER_ID = 0
RowEmbeddings = Mapping[str, TextEmbedding]
Fix = tuple[int, int, torch.Tensor]  # (row, first position, vectors) written into the batch


def max_clip_skip(model: DiffusionModel) -> int:
    """The most layers clip skip may leave out: every text encoder must keep one layer."""
    return min(int(encoder.config.num_hidden_layers) for encoder in model.text_encoders)


def check_encodable(model: DiffusionModel, prompt: str, negative_prompt: str | None,
                    embeddings: RowEmbeddings, clip_skip: int) -> None:
    """Refuses, naming the field, what this model cannot encode: a clip skip beyond its text
    encoders' layers, an embedding made for other text encoders."""
    limit = max_clip_skip(model)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= limit:
        raise InvalidRequestError("clip_skip", f"{clip_skip!r}: model {model.name!r} takes 1.."
                                  f"{limit} (1 = the last layer, 2 = the penultimate)")
    for name, embedding in embeddings.items():
        check_fits(embedding, model, embedding_field(name, prompt, negative_prompt))


def _embedding_ids(tokenizer: CLIPTokenizer, text: str, spans: list[tuple[int, int, str]],
                   vectors: Mapping[str, torch.Tensor]) -> tuple[list[int], list[tuple[int, torch.Tensor]]]:
    """``text``'s ids as ``tokenizer`` pads and truncates them, each span's tokens replaced by
    its vectors' placeholders; and (position, vectors) of each span kept."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    body: list[int] = []
    fixes: list[tuple[int, torch.Tensor]] = []
    placed: set[tuple[int, int, str]] = set()
    for token, (start, end) in zip(encoding.input_ids, encoding.offset_mapping):
        span = next((s for s in spans if start < s[1] and end > s[0]), None)
        if span is None:
            body.append(token)
        elif span not in placed:
            placed.add(span)
            fixes.append((len(body) + 1, vectors[span[2]]))  # + 1: after BOS
            body.extend([PLACEHOLDER_ID] * len(vectors[span[2]]))
    room = tokenizer.model_max_length - 2
    body = body[:room]
    fixes = [(at, v[:room + 1 - at]) for at, v in fixes if at <= room]
    padding = [tokenizer.pad_token_id] * (room - len(body))
    return [tokenizer.bos_token_id, *body, tokenizer.eos_token_id, *padding], fixes


def token_ids(tokenizer: CLIPTokenizer, texts: Sequence[str], rows: Sequence[RowEmbeddings],
              part: int) -> tuple[torch.Tensor, list[Fix]]:
    """(batch, 77) ids of ``texts`` and the vectors to write, for text encoder ``part`` (0: CLIP-L,
    1: SDXL's CLIP-G); a text naming none of its row's embeddings is tokenized as diffusers does."""
    plain = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    fixes: list[Fix] = []
    for row, (text, embeddings) in enumerate(zip(texts, rows, strict=True)):
        spans = embedding_spans(text, embeddings)
        if spans:
            vectors = {name: e.vectors[part] for name, e in embeddings.items()}
            ids, placed = _embedding_ids(tokenizer, text, spans, vectors)
            plain[row] = torch.tensor(ids, dtype=plain.dtype)
            fixes += [(row, at, v) for at, v in placed]
    return plain, fixes


@contextlib.contextmanager
def vectors_written(encoder: torch.nn.Module, fixes: list[Fix]) -> Iterator[None]:
    """During the block, ``encoder``'s token embeddings carry ``fixes`` (a forward hook on its
    input-embedding layer, removed on leaving: the model is the same before and after)."""
    if not fixes:
        yield
        return

    def write(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for row, at, vectors in fixes:
            output[row, at:at + vectors.shape[0]] = vectors.to(output.device, output.dtype)
        return output

    handle = encoder.get_input_embeddings().register_forward_hook(write)
    try:
        yield
    finally:
        handle.remove()


def skipped_layers(model: DiffusionModel, encoder: torch.nn.Module, output: object,
                   clip_skips: Sequence[int]) -> torch.Tensor:
    """Each row's hidden states at its clip skip (see the module's docstring)."""
    if model.family != "sd15":
        if all(k == clip_skips[0] for k in clip_skips):
            return output.hidden_states[-(clip_skips[0] + 1)]
        return torch.stack([output.hidden_states[-(k + 1)][row] for row, k in enumerate(clip_skips)])
    if all(k == 1 for k in clip_skips):
        return output[0]  # last_hidden_state: the last layer through the final layer norm
    norm = getattr(encoder, "text_model", encoder).final_layer_norm
    return torch.stack([output[0][row] if k == 1 else norm(output.hidden_states[-k][row])
                        for row, k in enumerate(clip_skips)])
