"""The built-in model's tokenizer and the cost structure its UNet shares with SD1.5."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from tools.tiny_shapes.architecture import make_unet
from tools.tiny_shapes.world import WORDS


def test_every_world_word_is_one_token(builtin_model):
    tokenizer = builtin_model.tokenizers[0]
    for word in WORDS:
        assert len(tokenizer(word).input_ids) == 3, word  # bos, word, eos


def test_unknown_words_still_tokenize(builtin_model):
    ids = builtin_model.tokenizers[0]("a Dragon, on fire!").input_ids
    assert ids[0] == builtin_model.tokenizers[0].bos_token_id and len(ids) > 5


def test_first_down_block_costs_like_sd15():
    """Its share of a forward's FLOPs must sit in SD1.5's 5-25%, or cache results mean nothing."""
    with torch.device("meta"):
        unet = make_unet()
        sample, t = torch.randn(2, 4, 16, 16), torch.tensor([500, 500])
        context = torch.randn(2, 77, unet.config.cross_attention_dim)
        total = FlopCounterMode(display=False)
        with total:
            unet(sample, t, context)
        head = FlopCounterMode(display=False)
        with head:
            temb = unet.time_embedding(unet.time_proj(t))
            unet.down_blocks[0](unet.conv_in(sample), temb, encoder_hidden_states=context)
    share = head.get_total_flops() / total.get_total_flops()
    assert 0.05 <= share <= 0.25
