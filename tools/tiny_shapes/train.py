"""Train tiny-shapes from nothing on a CPU: ``python -m tools.tiny_shapes.train``.

Three phases, each with a progress bar: the VAE (reconstruction + a small KL term), the latent
scaling factor (1/std of the latents, as SD computes it), then the UNet and the CLIP text encoder
jointly (epsilon prediction, min-SNR weighting, an EMA of the weights). For classifier-free
guidance 10% of the rows get the empty prompt and ``--junk-uncond`` of them a prompt made only of
words from outside the world (``junk.py``); ``--junk-prompts`` of the others have such words
around their prompt. So words the world does not know change nothing, in a prompt or in a
negative prompt. Learning rates follow a cosine over a time budget, so the run takes the minutes
it is given on any machine. The result is an ordinary diffusers folder.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from tqdm import tqdm

from pipeline.loading import load_model
from tools.tiny_shapes import MODEL_DIR, architecture, junk, world
from tools.tiny_shapes.evaluate import NEGATIVE_PROMPTS, cases
from tools.tiny_shapes.evaluate import evaluate as negative_prompt_accuracy
from tools.tiny_shapes.tokenizer import save_tokenizer

EMPTY_PROMPTS = 0.1  # unconditional rows with the empty prompt

def draw_pool(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` training images (uint8, NCHW) and the index of the scene each shows."""
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, len(world.TRAIN_SCENES), size=count)
    images = np.stack([np.asarray(world.draw(world.TRAIN_SCENES[i], rng))
                       for i in tqdm(scenes, desc="drawing", unit="img", mininterval=2)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(scenes)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def cosine_lr(base: float, fraction: float, warmup: float = 0.03) -> float:
    if fraction < warmup:
        return base * fraction / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (fraction - warmup) / (1 - warmup))))


def random_crops(images: torch.Tensor, size: int) -> torch.Tensor:
    """One random ``size`` crop per image, on the 8-pixel grid of the latents' receptive field."""
    side = images.shape[-1]
    out = []
    for image in images:
        y, x = (int(v) * 8 for v in torch.randint(0, (side - size) // 8 + 1, (2,)))
        out.append(image[:, y:y + size, x:x + size])
    return torch.stack(out)


def train_vae(vae, pool: torch.Tensor, minutes: float, batch: int, lr: float, crop: int = 32) -> float:
    """A near-deterministic autoencoder (decode the posterior mode, KL weight 1e-6).

    Convolutions do not care where they are, so 32x32 crops teach the same mapping at a quarter
    of the cost of whole images: the budget buys four times the steps.
    """
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start, step, loss_avg = time.time(), 0, None
    bar = tqdm(total=round(minutes * 60), desc="vae", unit="s", mininterval=2)
    while (elapsed := time.time() - start) < minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, elapsed / (minutes * 60))
        x = random_crops(to_unit(pool[torch.randint(0, len(pool), (batch,))]), crop)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mode()).sample
        mse = F.mse_loss(recon, x)
        loss = mse + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        loss_avg = mse.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * mse.item()
        bar.n = min(round(elapsed), bar.total)
        bar.set_postfix(step=step, mse=f"{loss_avg:.4f}")
    bar.close()
    return loss_avg


@torch.no_grad()
def encode_pool(vae, pool: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The posterior means of the pool's latents (the VAE was trained on the mode)."""
    means = []
    for i in tqdm(range(0, len(pool), batch), desc="encoding", mininterval=2):
        means.append(vae.encode(to_unit(pool[i:i + batch])).latent_dist.mean)
    return torch.cat(means)


def prompt_maker(seed: int, junk_prompts: float, junk_uncond: float) -> Callable[[torch.Tensor], list[str]]:
    """Scene indices to training prompts: ``EMPTY_PROMPTS`` of the rows the empty prompt and
    ``junk_uncond`` of them only out-of-world text (both unconditional, for classifier-free
    guidance); of the rest, ``junk_prompts`` padded with out-of-world text."""
    rng = random.Random(seed)

    def make(indices: torch.Tensor) -> list[str]:
        prompts = []
        for i in indices.tolist():
            draw = rng.random()
            if draw < EMPTY_PROMPTS:
                prompts.append("")
            elif draw < EMPTY_PROMPTS + junk_uncond:
                prompts.append(junk.unconditional_prompt(rng))
            elif rng.random() < junk_prompts:
                prompts.append(junk.padded_prompt(world.TRAIN_SCENES[i].prompt, rng))
            else:
                prompts.append(world.TRAIN_SCENES[i].prompt)
        return prompts

    return make


def train_denoiser(unet, text_encoder, tokenizer, means, scenes, scaling: float,
                   minutes: float, batch: int, lr: float, ema_decay: float,
                   make_prompts: Callable[[torch.Tensor], list[str]]) -> tuple[torch.nn.Module, torch.nn.Module]:
    noise_schedule = DDPMScheduler.from_config(architecture.make_scheduler().config)
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    ema = [copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)]
    start, step, loss_avg = time.time(), 0, None
    bar = tqdm(total=round(minutes * 60), desc="unet+clip", unit="s", mininterval=2)
    while (elapsed := time.time() - start) < minutes * 60:
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(lr, elapsed / (minutes * 60))
        pick = torch.randint(0, len(means), (batch,))
        latents = means[pick] * scaling
        ids = tokenizer(make_prompts(scenes[pick]), padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,))
        noise = torch.randn_like(latents)
        noisy = noise_schedule.add_noise(latents, noise, t)
        context = text_encoder(ids)[0]
        prediction = unet(noisy, t, context).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 weighting
        loss = (weight * ((prediction - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for averaged, live in zip(ema, (unet, text_encoder)):
                for a, p in zip(averaged.parameters(), live.parameters()):
                    a.lerp_(p, 1 - decay)
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.n = min(round(elapsed), bar.total)
        bar.set_postfix(step=step, loss=f"{loss_avg:.4f}")
    bar.close()
    return ema[0], ema[1]


@torch.no_grad()
def evaluate(folder: Path, seeds: int = 2) -> dict[str, float]:
    """Prompt accuracy with diffusers' own pipeline: Euler, 20 steps, guidance 5."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    result = {}
    for name, scenes in (("trained", world.TRAIN_SCENES), ("held_out", world.HELD_OUT_SCENES)):
        correct = total = 0
        for seed in range(seeds):
            generator = torch.Generator().manual_seed(seed)
            for i in range(0, len(scenes), 32):
                chunk = scenes[i:i + 32]
                images = pipe([s.prompt for s in chunk], num_inference_steps=20, guidance_scale=5.0,
                              generator=generator).images
                correct += sum(world.is_correct(im, s) for im, s in zip(images, chunk))
                total += len(chunk)
        result[name] = correct / total
    return result


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--images", type=int, default=24000)
    parser.add_argument("--vae-minutes", type=float, default=5.0)
    parser.add_argument("--unet-minutes", type=float, default=40.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.995,
                        help="an EMA much longer than the run lags behind a model still improving")
    parser.add_argument("--resume", action="store_true",
                        help="continue training the UNet and text encoder saved in --out (VAE kept)")
    parser.add_argument("--junk-prompts", type=float, default=0.5,
                        help="share of conditional rows whose prompt is padded with out-of-world "
                             "words (tools/tiny_shapes/junk.py)")
    parser.add_argument("--junk-uncond", type=float, default=0.1,
                        help="share of rows made unconditional with out-of-world words only, "
                             "besides those with the empty prompt (EMPTY_PROMPTS)")
    return parser.parse_args()


def load_or_build(args: argparse.Namespace, pool: torch.Tensor) -> tuple:
    """(tokenizer, vae, unet, text_encoder, vae_mse): resumed from ``args.out`` or new, with
    the tokenizer written and the VAE trained."""
    if args.resume:
        previous = StableDiffusionPipeline.from_pretrained(args.out, local_files_only=True)
        unet, text_encoder = previous.unet.train(), previous.text_encoder.train()
        unet.requires_grad_(True)
        text_encoder.requires_grad_(True)
        mse = json.loads((args.out / "training_report.json").read_text())["vae_mse"]
        return previous.tokenizer, previous.vae, unet, text_encoder, mse
    tokenizer = save_tokenizer(world.WORDS, args.out / "tokenizer")
    vae = architecture.make_vae()
    mse = train_vae(vae, pool, args.vae_minutes, batch=16, lr=2e-3)
    return tokenizer, vae, architecture.make_unet(), architecture.make_text_encoder(tokenizer), mse


def write_report(args: argparse.Namespace, mse: float, scaling: float) -> dict:
    """Measure the saved model and add this run to ``training_report.json``."""
    accuracy = evaluate(args.out)
    with_negatives = negative_prompt_accuracy(load_model(args.out), cases(4, 24, 2), NEGATIVE_PROMPTS)
    report_file = args.out / "training_report.json"
    runs = json.loads(report_file.read_text()).get("runs", []) if args.resume else []
    command = "python -m tools.tiny_shapes.train " + " ".join(sys.argv[1:])
    run = ({"command": command} | {k: v for k, v in vars(args).items() if k != "out"}
           | {"accuracy": accuracy, "negative_prompt_accuracy": with_negatives})
    report = {"vae_mse": mse, "scaling_factor": scaling, "accuracy": accuracy,
              "accuracy_measure": "diffusers StableDiffusionPipeline, Euler 20 steps, guidance 5, "
                                  "2 seeds per prompt; both colours right",
              "negative_prompt_accuracy": with_negatives,
              "negative_prompt_accuracy_measure": "python -m tools.tiny_shapes.evaluate "
                                                  "--held-out-seeds 4 --train-scenes 24",
              "runs": [*runs, run]}
    report_file.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    pool, scenes = draw_pool(args.images, args.seed)
    tokenizer, vae, unet, text_encoder, mse = load_or_build(args, pool)
    vae.eval().requires_grad_(False)
    means = encode_pool(vae, pool)
    scaling = float(vae.config.scaling_factor) if args.resume else float(1.0 / means.std())
    vae.register_to_config(scaling_factor=scaling)
    make_prompts = prompt_maker(args.seed, args.junk_prompts, args.junk_uncond)
    unet, text_encoder = train_denoiser(unet, text_encoder, tokenizer, means, scenes, scaling,
                                        args.unet_minutes, args.batch, lr=args.lr,
                                        ema_decay=args.ema_decay, make_prompts=make_prompts)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=architecture.make_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(json.dumps(write_report(args, mse, scaling), indent=2))


if __name__ == "__main__":
    main()
