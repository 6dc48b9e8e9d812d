"""Textual inversion embeddings and clip skip, in the pipeline: the folder (names confined to it,
pickles never read), the prompt words that name an embedding, the vectors reaching the
conditioning (against diffusers' ``load_textual_inversion`` and against a hand-made
substitution), the refusal of an embedding made for other text encoders, and clip skip against
diffusers' ``encode_prompt``."""
from __future__ import annotations

import os

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from deployments.messages import EncodeRequest
from pipeline.conditioning import encode_prompts
from pipeline.embeddings import LoadedEmbeddings, TextEmbedding, read_embedding
from pipeline.embedding_library import EmbeddingLibrary, embedding_spans, find_embeddings
from pipeline.errors import InvalidRequestError, NotFoundError
from pipeline.prompt_tokens import _embedding_ids, max_clip_skip
from tools.embedding_files import random_vectors, write_embedding, write_tripwire_pickle
from tools.tiny_shapes import MODEL_DIR as BUILTIN_MODEL


@pytest.fixture(scope="module")
def sd15_pipe():
    return StableDiffusionPipeline.from_pretrained(BUILTIN_MODEL, local_files_only=True)


@pytest.fixture(scope="module")
def sdxl_pipe(sdxl_folder):
    return StableDiffusionXLPipeline.from_pretrained(sdxl_folder, local_files_only=True)


def _embedding(model, tmp_path, name="mystyle", vectors=3, seed=0) -> TextEmbedding:
    path = write_embedding(tmp_path / f"{name}.safetensors", random_vectors(model, vectors, seed))
    return read_embedding(path, name)


def _equal(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-6) -> bool:
    return a.shape == b.shape and (a.float() - b.float()).abs().max().item() <= tolerance


# --- the folder -------------------------------------------------------------------------------

def test_library_lists_resolves_and_confines_names(tmp_path, builtin_model):
    folder = tmp_path / "embeddings"
    write_embedding(folder / "mystyle.safetensors", random_vectors(builtin_model, 2))
    write_embedding(tmp_path / "outside.safetensors", random_vectors(builtin_model, 1))
    os.symlink(tmp_path / "outside.safetensors", folder / "escape.safetensors")
    (folder / "broken.safetensors").write_bytes(b"not safetensors")
    library = EmbeddingLibrary(folder)
    assert library.names() == ["broken", "mystyle"]  # the symlink out is not listed
    assert library.resolve("mystyle") == (folder / "mystyle.safetensors").resolve()
    for bad in ("../outside", "sub/mystyle", "/etc/passwd", "..", ".hidden", "a\\b", "escape"):
        with pytest.raises(InvalidRequestError) as caught:
            library.resolve(bad, "negative_prompt")
        assert caught.value.field == "negative_prompt" and not isinstance(caught.value, NotFoundError)
    with pytest.raises(NotFoundError):
        library.resolve("nothing")
    loaded, skipped = library.listing()
    assert list(loaded) == ["mystyle"]
    assert (loaded["mystyle"].family, loaded["mystyle"].vectors, loaded["mystyle"].shape) == ("sd15", 2, 64)
    assert list(skipped) == ["broken"] and "not a readable safetensors" in skipped["broken"]


def test_pickles_are_listed_as_skipped_and_never_read(tmp_path):
    folder, marker = tmp_path / "embeddings", tmp_path / "unpickled"
    write_tripwire_pickle(folder / "evil.pt", marker)
    write_tripwire_pickle(folder / "worse.bin", marker)
    library = EmbeddingLibrary(folder)
    loaded, skipped = library.listing()
    assert loaded == {} and set(skipped) == {"evil", "worse"}
    assert "pickle" in skipped["evil"] and "convert it to .safetensors" in skipped["evil"]
    assert library.names() == []
    with pytest.raises(InvalidRequestError, match="pickle") as caught:
        library.lookup("a red circle", "blurry, evil")  # a word naming the pickle is refused
    assert caught.value.field == "negative_prompt"
    assert library.lookup("a red circle, evilness", None) == ()  # other words are words
    assert not marker.exists()


def test_malformed_files_are_refused_naming_the_prompt(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, str(tmp_path / "two.safetensors"))
    save_file({"emb_params": torch.zeros(80, 8)}, str(tmp_path / "long.safetensors"))
    save_file({"clip_l": torch.zeros(2, 8), "clip_g": torch.zeros(3, 16)}, str(tmp_path / "odd.safetensors"))
    save_file({"emb_params": torch.full((1, 8), float("nan"))}, str(tmp_path / "nan.safetensors"))
    for name, why in (("two", "not a textual inversion"), ("long", "at most 75"),
                      ("odd", "different numbers"), ("nan", "NaN")):
        with pytest.raises(InvalidRequestError, match=why) as caught:
            read_embedding(tmp_path / f"{name}.safetensors", name, field="negative_prompt")
        assert caught.value.field == "negative_prompt"


# --- prompt words -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,found", [
    ("a red mystyle circle", ["mystyle"]),
    ("(MyStyle:1.2), bad-hands-5", ["mystyle", "bad-hands-5"]),
    ("mystyles, my_style, xmystyle, bad-hands5", []),
    ("very-bad-hands-5", ["bad-hands-5"]),  # A1111 matches tokens: '-' splits words
    ("bad-hands, bad-hands-5", ["bad-hands", "bad-hands-5"]),  # the longest name first
    ("", []),
])
def test_a_word_equal_to_a_name_is_found(text, found):
    assert find_embeddings(text, ["mystyle", "bad-hands-5", "bad-hands"]) == found


def test_an_exact_name_wins_over_one_differing_in_case():
    assert [s[2] for s in embedding_spans("Style style STYLE", ["Style", "style"])] == [
        "Style", "style", "Style"]


@pytest.mark.parametrize("text", ["", "a red circle", "A  Red,(circle:1.2)  on blue!",
                                  " ".join(["red circle"] * 60)])
def test_token_ids_without_embeddings_are_the_tokenizers(builtin_model, text):
    tokenizer = builtin_model.tokenizers[0]
    expected = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True).input_ids
    assert _embedding_ids(tokenizer, text, [], {}) == (expected, [])


# --- vectors reach the conditioning -----------------------------------------------------------

def test_sd15_embedding_is_what_diffusers_textual_inversion_gives(builtin_model, sd15_pipe, tmp_path):
    """diffusers adds tokens <mystyle>, <mystyle>_1... to a copy of the tokenizer and encoder;
    ours writes the vectors into the token embeddings of this forward: the same conditioning."""
    embedding = _embedding(builtin_model, tmp_path)
    sd15_pipe.load_textual_inversion(embedding.vectors[0], token="<mystyle>",
                                     text_encoder=sd15_pipe.text_encoder, tokenizer=sd15_pipe.tokenizer)
    long = " ".join(["red"] * 73) + " mystyle"  # two of its three vectors fit in 75 tokens
    for prompt, negative in (("a red mystyle circle", "blue, MyStyle"), (long, None)):
        theirs = [p.replace("mystyle", "<mystyle>").replace("MyStyle", "<mystyle>") if p else p
                  for p in (prompt, negative)]
        expected, expected_negative = sd15_pipe.encode_prompt(
            theirs[0], "cpu", 1, True, negative_prompt=theirs[1])
        (ours,) = encode_prompts(builtin_model, [prompt], [negative], embeddings=[{"mystyle": embedding}])
        assert _equal(ours.prompt_embeds, expected[0]) and _equal(ours.negative_embeds, expected_negative[0])
    (plain,) = encode_prompts(builtin_model, ["a red mystyle circle"], [None])
    assert not _equal(plain.prompt_embeds, ours.prompt_embeds, 1e-2)


def test_vectors_equal_to_a_words_token_encode_as_that_word(builtin_model):
    """A hand-made substitution: an embedding whose one vector is the token embedding of
    ``circle`` makes ``a red mystyle`` encode exactly as ``a red circle``; the model is the same
    after (no token added, no hook left, no weight changed)."""
    tokenizer, encoder = builtin_model.tokenizers[0], builtin_model.text_encoders[0]
    (circle,) = tokenizer("circle", add_special_tokens=False).input_ids
    weights = encoder.get_input_embeddings().weight.detach().clone()
    embedding = TextEmbedding("mystyle", (weights[circle:circle + 1].clone(),))
    ours, expected = encode_prompts(builtin_model, ["a red mystyle on blue", "a red circle on blue"],
                                    [None, None], embeddings=[{"mystyle": embedding}, {}])
    assert torch.equal(ours.prompt_embeds, expected.prompt_embeds)
    assert len(tokenizer) == 571 and not encoder.get_input_embeddings()._forward_hooks
    assert torch.equal(encoder.get_input_embeddings().weight, weights)


def test_rows_of_one_batch_use_their_own_embeddings(builtin_model, tmp_path):
    one, two = _embedding(builtin_model, tmp_path, seed=1), _embedding(builtin_model, tmp_path, seed=2)
    together = encode_prompts(builtin_model, ["a mystyle circle"] * 3, [None] * 3,
                              embeddings=[{"mystyle": one}, {"mystyle": two}, {}])
    for conditioning, row in zip(together, [{"mystyle": one}, {"mystyle": two}, {}]):
        (alone,) = encode_prompts(builtin_model, ["a mystyle circle"], [None], embeddings=[row])
        assert _equal(conditioning.prompt_embeds, alone.prompt_embeds, 1e-5)


def test_sdxl_embedding_is_what_diffusers_textual_inversion_gives(sdxl_model, sdxl_pipe, tmp_path):
    """An SDXL file's clip_l goes to the first encoder, clip_g to the second (and to the pooled)."""
    embedding = _embedding(sdxl_model, tmp_path, vectors=2)
    assert embedding.family == "sdxl" and embedding.widths == (32, 48)
    for vectors, encoder, tokenizer in zip(embedding.vectors, ("text_encoder", "text_encoder_2"),
                                           ("tokenizer", "tokenizer_2")):
        sdxl_pipe.load_textual_inversion(vectors, token="<mystyle>", text_encoder=getattr(sdxl_pipe, encoder),
                                         tokenizer=getattr(sdxl_pipe, tokenizer))
    expected = sdxl_pipe.encode_prompt("a red <mystyle> circle", device="cpu", num_images_per_prompt=1,
                                       do_classifier_free_guidance=True, negative_prompt="<mystyle>, blue")
    (ours,) = encode_prompts(sdxl_model, ["a red mystyle circle"], ["mystyle, blue"],
                             embeddings=[{"mystyle": embedding}])
    for mine, theirs in zip((ours.prompt_embeds, ours.negative_embeds, ours.pooled, ours.negative_pooled),
                            expected):
        assert _equal(mine, theirs[0], 1e-5)


def test_an_embedding_for_other_text_encoders_is_refused_naming_the_prompt(
        builtin_model, sdxl_model, tmp_path):
    sd15 = _embedding(builtin_model, tmp_path / "sd15")
    sdxl = _embedding(sdxl_model, tmp_path / "sdxl")
    for model, embedding, family in ((sdxl_model, sd15, "SD1.5"), (builtin_model, sdxl, "SDXL")):
        for prompt, negative, field in (("a mystyle", None, "prompt"), ("a red", "mystyle", "negative_prompt")):
            with pytest.raises(InvalidRequestError, match=f"an {family} embedding") as caught:
                encode_prompts(model, [prompt], [negative], embeddings=[{"mystyle": embedding}])
            assert caught.value.field == field
    too_wide = TextEmbedding("mystyle", (torch.zeros(1, 768),))
    with pytest.raises(InvalidRequestError, match="768 wide.*takes 64"):
        encode_prompts(builtin_model, ["a mystyle"], [None], embeddings=[{"mystyle": too_wide}])


def test_a_replaced_file_is_read_again_and_keys_the_cache_apart(builtin_model, tmp_path):
    path = tmp_path / "mystyle.safetensors"
    write_embedding(path, random_vectors(builtin_model, 1, seed=1))
    library = EmbeddingLibrary(tmp_path)
    loaded = LoadedEmbeddings(library)
    requested = library.lookup("a mystyle", None)
    first = loaded.read(requested, "a mystyle", None)["mystyle"]
    assert loaded.read(requested, "a mystyle", None)["mystyle"] is first  # kept
    replacement = tmp_path / "new.tmp"
    write_embedding(replacement, random_vectors(builtin_model, 2, seed=2))
    os.replace(replacement, path)  # an atomic replacement: same name, new inode
    again = library.lookup("a mystyle", None)
    second = loaded.read(again, "a mystyle", None)["mystyle"]
    assert len(second) == 2 and not torch.equal(second.vectors[0][:1], first.vectors[0])
    assert again != requested
    assert EncodeRequest("m", "a mystyle", None, (), requested) != EncodeRequest("m", "a mystyle", None, (), again)
    assert EncodeRequest("m", "p", clip_skip=1) != EncodeRequest("m", "p", clip_skip=2)


# --- clip skip --------------------------------------------------------------------------------

def test_sd15_clip_skip_2_is_diffusers_clip_skip_1(builtin_model, sd15_pipe):
    """A1111's 2 (the penultimate layer, through the final layer norm) is diffusers' clip_skip=1.
    diffusers 0.42 reads ``text_encoder.text_model.final_layer_norm``, which transformers 5's
    CLIPTextModel no longer has (its layer norm is its own): pointed at the model for the test."""
    encoder = sd15_pipe.text_encoder
    if not hasattr(encoder, "text_model"):
        object.__setattr__(encoder, "text_model", encoder)
    prompt = "a red circle on a blue background"
    expected, _ = sd15_pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=1)
    default, _ = sd15_pipe.encode_prompt(prompt, "cpu", 1, False)
    skipped, last = encode_prompts(builtin_model, [prompt] * 2, [None] * 2, clip_skip=[2, 1])
    assert _equal(skipped.prompt_embeds, expected[0], 1e-5)
    assert _equal(last.prompt_embeds, default[0], 1e-5)
    assert not _equal(skipped.prompt_embeds, last.prompt_embeds, 1e-2)
    (with_negative,) = encode_prompts(builtin_model, [prompt], [prompt], clip_skip=2)
    assert torch.equal(with_negative.negative_embeds, with_negative.prompt_embeds)  # A1111: both


def test_sdxl_clip_skip_counts_from_the_penultimate_layer_as_diffusers(sdxl_model, sdxl_pipe):
    prompt = "a red circle on a blue background"
    expected, _, pooled, _ = sdxl_pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False, clip_skip=1)
    (ours,) = encode_prompts(sdxl_model, [prompt], [None], clip_skip=2)
    (default,) = encode_prompts(sdxl_model, [prompt], [None])
    assert _equal(ours.prompt_embeds, expected[0], 1e-5) and _equal(ours.pooled, pooled[0], 1e-5)
    assert torch.equal(ours.pooled, default.pooled) and not _equal(ours.prompt_embeds, default.prompt_embeds, 1e-3)


@pytest.mark.parametrize("clip_skip", [0, 3, -1, True])
def test_clip_skip_beyond_the_models_layers_is_refused(builtin_model, clip_skip):
    assert max_clip_skip(builtin_model) == 2  # tiny-shapes' CLIP has two layers
    with pytest.raises(InvalidRequestError, match="takes 1..2") as caught:
        encode_prompts(builtin_model, ["a red circle"], [None], clip_skip=clip_skip)
    assert caught.value.field == "clip_skip"
