"""The shapes of the tiny-shapes components, shaped like SD1.5's at a small scale."""
from __future__ import annotations

from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

LATENT_SIZE = 16  # 64 px images, 4x VAE downsampling
TEXT_HIDDEN = 64


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=TEXT_HIDDEN, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    """Three levels, cross-attention down and up, the first level at full latent resolution.

    The first down block costs about 12% of a forward, inside the 5-25% of real SD1.5 UNets,
    so that First Block Cache measured here means something for them.
    """
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=8,
    )


def make_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
    )


def make_scheduler() -> EulerDiscreteScheduler:
    """SD1.5's noise schedule; ``clip_sample``/``set_alpha_to_one`` off so that DDIM built from
    this config does not clip latents."""
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading",
        steps_offset=1,
    )
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False)
    return scheduler
