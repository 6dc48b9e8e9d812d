"""One image's denoising: what it asks for (``DenoiseParams``) and its state between steps.

``DenoiseParams`` crosses stage boundaries (Ingress to Denoiser): plain values only. A
``Trajectory`` is the runner's side of one request: its own sampler (a diffusers scheduler,
which keeps state), its own ``torch.Generator``, its latents, its conditioning rows and its cache
state. ``unet_rows`` gives the rows it adds to the next batched forward; ``advance`` takes back
its slice of the output, applies guidance, steps the sampler, watches the latents for NaN and
infinity (``diverged_at``), and after the last step leaves them on the CPU (``final``), all on
the thread that runs the UNet.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from pipeline.conditioning import Conditioning
from pipeline.errors import InvalidRequestError
from pipeline.init_image import InitImage, inpainting_conditioning
from pipeline.model import DiffusionModel
from pipeline.preview import LatentRGB
from pipeline.request_params import DenoiseParams
from pipeline.samplers import make_sampler
from pipeline.unet.first_block_cache import FirstBlockCache
from pipeline.unet.forward import ConditionRows, UNetRows


def _initial_latents(model: DiffusionModel, params: DenoiseParams,
                    generator: torch.Generator) -> torch.Tensor:
    """The request's starting noise, drawn on the CPU generator (so a seed gives the same image
    on any device) and moved to the UNet's device, by diffusers' ``randn_tensor``."""
    factor = model.vae_scale_factor
    if params.width % factor or params.height % factor:
        raise InvalidRequestError("width", f"width and height must be multiples of {factor}")
    shape = (1, model.latent_channels, params.height // factor, params.width // factor)
    return randn_tensor(shape, generator=generator, device=model.unet.device, dtype=model.unet.dtype)


def _step_kwargs(sampler: SchedulerMixin, generator: torch.Generator) -> dict[str, Any]:
    """What this sampler's ``step`` takes besides the sample: the request's generator for the
    ancestral ones, ``eta=0`` for DDIM (as diffusers' pipelines pass)."""
    accepted = inspect.signature(sampler.step).parameters
    kwargs: dict[str, Any] = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = 0.0
    return kwargs


class FiniteWatch:
    """Whether a request's latents are still finite, learnt without making a step wait for the
    device.

    ``watch`` queues a check (``isfinite().all()``) behind the step that made the latents; on
    CUDA its answer is copied into pinned host memory behind an event, and a later step reads
    it once the event has passed (no sync: a diverging request stops a step or two late rather
    than every step waiting). On the CPU the answer is there at once. Other devices (MPS) are
    checked only on the finished latents, already on the CPU.
    """

    def __init__(self) -> None:
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None, int] | None = None

    def watch(self, latents: torch.Tensor, step: int) -> int | None:
        """Check ``latents`` (those after ``step`` steps) unless a check is still on its way;
        returns the step after which the latents were found not finite, or None."""
        found = self.poll()
        if found is None and self._pending is None:
            self._pending = self._queue(latents, step)
            found = self.poll()
        return found

    def poll(self) -> int | None:
        """The answer of the check on its way, if it has arrived: the step, if not finite."""
        if self._pending is None:
            return None
        flag, event, step = self._pending
        if event is not None and not event.query():
            return None
        self._pending = None
        return None if bool(flag) else step

    @staticmethod
    def _queue(latents: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.cuda.Event | None, int] | None:
        if latents.device.type == "cpu":
            return torch.isfinite(latents).all(), None, step
        if latents.device.type != "cuda":
            return None
        flag = torch.isfinite(latents).all().to("cpu", non_blocking=True)  # pinned, asynchronous
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(latents.device))
        return flag, event, step


class Trajectory:
    """One request's denoising, advanced one step at a time by whoever runs the UNet."""

    def __init__(self, model: DiffusionModel, conditioning: Conditioning, params: DenoiseParams,
                 init: InitImage | None = None) -> None:
        if params.steps < 1:
            raise InvalidRequestError("steps", "must be at least 1")
        self.model = model  # held: a model evicted from its store meanwhile stays usable
        self.params = params
        unet = model.unet
        generator = torch.Generator("cpu").manual_seed(params.seed)  # this request's alone
        self.sampler = make_sampler(params.sampler, params.schedule, model.scheduler_config,
                                    params.steps, unet.device, model.family, seed=params.seed)
        self.timesteps = self.sampler.timesteps
        self.init = init
        self.noise = _initial_latents(model, params, generator)
        self.latents = self._start()
        self.guided = params.guidance_scale > 1.0
        self.condition = ConditionRows.build(unet, conditioning, self.guided, (params.height, params.width))
        self._step_kwargs = _step_kwargs(self.sampler, generator)
        self._extra = inpainting_conditioning(init, self.latents) if model.is_inpainting else None
        self.step_index = 0
        self.cache = FirstBlockCache(params.cache).new_state(len(self.timesteps)) if params.cache else None
        self.diverged_at: int | None = None  # the step after which the latents were not finite
        self.final: torch.Tensor | None = None  # the finished latents, on the CPU
        self.previewer: LatentRGB | None = None  # set by a caller that watches the steps
        self.preview: np.ndarray | None = None  # the latest step's look, (h, w, 3) uint8
        self._finite = FiniteWatch()
        if self.done:  # an init image at strength 0: nothing to denoise
            self._finish()

    def _start(self) -> torch.Tensor:
        """The first latents. From noise; or, from an init image, as diffusers' img2img
        pipelines do: the schedule's first ``steps * (1 - strength)`` steps dropped and the
        image noised to where the rest begins, with this request's own noise."""
        if self.init is None:
            return self.noise * self.sampler.init_noise_sigma
        steps, order = self.params.steps, self.sampler.order
        skipped = steps - min(int(steps * self.params.strength), steps)
        self.timesteps = self.timesteps[skipped * order:]
        if hasattr(self.sampler, "set_begin_index"):
            self.sampler.set_begin_index(skipped * order)
        latents = self.init.start_latents(self.noise)
        if not len(self.timesteps):
            return latents
        return self.sampler.add_noise(latents, self.noise, self.timesteps[:1])

    def _keep_unmasked(self) -> None:
        """Inpainting: outside the mask the latents are the init image's, noised to the next
        step's level (diffusers' inpainting pipeline with a 4-channel UNet)."""
        mask = self.init.mask.to(self.latents.device, self.latents.dtype)
        original = self.init.latents.to(self.latents.device, self.latents.dtype)
        if not self.done:
            original = self.sampler.add_noise(original, self.noise,
                                              self.timesteps[self.step_index:self.step_index + 1])
        self.latents = original * (1 - mask) + self.latents * mask

    @property
    def rows(self) -> int:
        return 2 if self.guided else 1

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def decisions(self) -> tuple[bool, ...]:
        """Per step so far: True where the cache skipped it."""
        return tuple(self.cache.decisions) if self.cache else (False,) * self.step_index

    def unet_rows(self) -> UNetRows:
        t = self.timesteps[self.step_index]
        sample = self.sampler.scale_model_input(torch.cat([self.latents] * self.rows), t)
        if self._extra is not None:  # an inpainting UNet: mask and masked image beside
            sample = torch.cat([sample, self._extra.expand(self.rows, -1, -1, -1)], dim=1)
        return UNetRows(sample, t.expand(self.rows), self.condition)

    def advance(self, noise_pred: torch.Tensor) -> None:
        """Apply guidance to this request's rows of the UNet output, step its sampler and watch
        the new latents (``diverged_at``); after the last step they go to the CPU (``final``)."""
        if noise_pred.shape[0] != self.rows:
            raise RuntimeError(f"request got {noise_pred.shape[0]} output rows, expected {self.rows}")
        if self.guided:
            uncond, cond = noise_pred.chunk(2)
            noise_pred = uncond + self.params.guidance_scale * (cond - uncond)
        t = self.timesteps[self.step_index]
        stepped = self.sampler.step(noise_pred, t, self.latents, **self._step_kwargs,
                                    return_dict=False)
        self.latents = stepped[0]
        self.step_index += 1
        if self.previewer is not None:
            self._preview(stepped)
        if self.init is not None and self.init.mask is not None and self._extra is None:
            self._keep_unmasked()  # an inpainting UNet keeps them itself
        if self.cache is not None and self.cache.step_index != self.step_index:
            raise RuntimeError(f"cache state at step {self.cache.step_index}, request at {self.step_index}")
        found = self._finish() if self.done else self._finite.watch(self.latents, self.step_index)
        if self.diverged_at is None:
            self.diverged_at = found

    def _preview(self, stepped: tuple) -> None:
        """The step's look: of the sampler's estimate of the final image where it gives one
        (Euler, DDIM, Heun...: what A1111 and ComfyUI preview), else of the latents."""
        estimate = stepped[1] if len(stepped) > 1 else None
        if not isinstance(estimate, torch.Tensor) or estimate.shape != self.latents.shape:
            estimate = self.latents
        self.preview = self.previewer(estimate[0])

    def _finish(self) -> int | None:
        """The latents to the CPU (the one wait for the device a request costs, here on the
        UNet's thread rather than on an event loop) and checked there; a check still on its way
        has its answer now. Returns the step after which they were found not finite, if so."""
        self.final = self.latents.detach().to("cpu")
        found = self._finite.poll()
        if found is None and not bool(torch.isfinite(self.final).all()):
            found = self.step_index
        return found
