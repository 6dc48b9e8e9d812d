"""A compiled UNet for the engine: the head, tail and output layers of First Block Cache's split
(``pipeline.unet.split``), each through ``torch.compile``, as a ``UNetParts`` set.

What the engine needs and how it is met:

- Per-row timesteps: the timestep is a (rows,) tensor input of the compiled head, as eager.
- Variable batch sizes: the row (batch) dimension of every input is marked dynamic, so a few
  compiled graphs per part serve every row count (a 1-row batch is padded to 2 rows: dynamo
  specializes a size of 1; inductor still splits the dynamic rows into ranges, measured on the
  built-in model 2-15, 16-63 and 64 up, so the warm-up runs every power of two up to
  ``max_rows``). Under CUDA graphs, which record one graph per distinct shape, row
  counts are padded up to buckets (``row_buckets``: 2, 4, 8, 16, 32, ..., then multiples of the
  largest), so a replica records a handful of graphs, not one per row count. Padding rows are
  copies of the batch's last row; every part slices its output back to the real rows before
  returning, so a padding row never reaches the cache's decisions nor a request.
- First Block Cache's split: the head runs for all rows, the tail for the rows that missed, the
  output layers for those that need them, each its own compiled graph with a dynamic row count;
  the plain forward (no cache in the batch) is the same three graphs one after the other.
- LoRA sets: peft keeps adapters as extra modules and their scales as Python floats on them,
  and dynamo guards on both, so a compiled UNet takes its LoRAs through one fixed adapter that
  every set is written into (``pipeline.lora_slot``, used by ``AdapterManager`` for a model whose
  parts are compiled): switching among sets seen before compiles nothing (measured on the built-in
  model: 5 sets twice over, the second round added no graph; as separate adapters every switch
  recompiled the head and the tail). The recompile limit is raised to ``recompile_limit`` for
  what still compiles (the slot growing, new resolutions); beyond it dynamo runs that part
  eagerly, still correct.
- Resolutions: warm-up compiles the native latent size; the first request at another size
  compiles each part once more (the built-in model on this CPU: 88 s cold), after which dynamo
  has marked the spatial dims dynamic and every later size reuses that graph (checked at
  8, 12, 20 and 16 latents). Timesteps are cast to float32 first: no sampler recompiles.
- CUDA graphs on CUDA: ``mode`` defaults to ``reduce-overhead`` there (inductor + CUDA graphs,
  no autotuning: an SDXL compile stays in minutes) and to inductor's ``default`` elsewhere.
  A CUDA graph's outputs live in its static memory and are overwritten by its next replay, so
  there every part's output is cloned before it is handed on.
- Compile cache: inductor's on-disk caches (FX graph, AOTAutograd, autotuning) go to
  ``cache_dir`` (absent: ``TORCHINDUCTOR_CACHE_DIR`` where set, else
  ``~/.cache/raydiance/inductor``): a restarted replica re-traces with dynamo but reuses the
  generated kernels (the built-in model on this CPU: 61 s cold, 6 s from the cache).
- Compilation at replica start: ``compile_unet`` compiles and warms every part over the row
  buckets at the model's native size, on random inputs, and logs the time it took.

Nothing here imports Ray; the Denoiser calls ``compile_unet`` for models configured with
``compile: true``.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from diffusers import UNet2DConditionModel

from pipeline.unet.parts import UNetParts
from pipeline.unet.split import Head, check_supported, run_head, run_out, run_tail

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/raydiance/inductor"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
MIN_ROWS = 2  # dynamo specializes a dimension of size 1; smaller batches are padded to this


@dataclass(frozen=True)
class CompileOptions:
    """How a UNet is compiled (the Denoiser's ``compile_*`` knobs)."""

    mode: str | None = None  # torch.compile mode; None: reduce-overhead on CUDA, default elsewhere
    cache_dir: str | None = None  # None: TORCHINDUCTOR_CACHE_DIR where set, else DEFAULT_CACHE_DIR
    max_rows: int = 32  # the engine's max_batch_rows: warm-up covers the buckets up to it
    buckets: bool | None = None  # pad row counts to buckets; None: only under CUDA graphs
    recompile_limit: int = 64  # per part; dynamo's default (8) is soon reached by LoRA sets
    warm_up: bool = True


def row_buckets(max_rows: int) -> tuple[int, ...]:
    """2, 4, 8, ... up to the first power of two >= ``max_rows``."""
    buckets = [MIN_ROWS]
    while buckets[-1] < max_rows:
        buckets.append(buckets[-1] * 2)
    return tuple(buckets)


def padded_rows(rows: int, buckets: Sequence[int] | None) -> int:
    """The row count a batch of ``rows`` runs at: at least ``MIN_ROWS``; with ``buckets``, the
    smallest bucket that holds it, beyond the largest the next multiple of the largest."""
    rows = max(rows, MIN_ROWS)
    if not buckets:
        return rows
    for size in buckets:
        if size >= rows:
            return size
    largest = buckets[-1]
    return -(-rows // largest) * largest


def configure_cache(cache_dir: str | None) -> str:
    """Point inductor's on-disk caches at ``cache_dir``: an explicit setting wins; None keeps
    ``TORCHINDUCTOR_CACHE_DIR`` where set, else takes ``DEFAULT_CACHE_DIR``. Returns the folder."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir, default_cache_dir

    env = os.environ.get(CACHE_ENV)
    # torch writes its own default into the environment on first use: that is no one's setting
    set_by_user = env is not None and os.path.abspath(env) != os.path.abspath(default_cache_dir())
    if cache_dir is not None or not set_by_user:
        os.environ[CACHE_ENV] = str(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
    return inductor_cache_dir()


def default_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"


def _pad(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``t`` with copies of its last row appended up to ``rows``, contiguous, its dim 0 dynamic."""
    if t is None:
        return None
    if t.shape[0] < rows:
        t = torch.cat([t, t[-1:].expand(rows - t.shape[0], *t.shape[1:])])
    t = t.contiguous()  # an expanded input (stride 0) would compile a graph of its own
    torch._dynamo.maybe_mark_dynamic(t, 0)
    return t


class CompiledParts(UNetParts):
    """``torch.compile``d head, tail and output layers of one UNet (see the module's doc)."""

    compiled = True

    def __init__(self, unet: UNet2DConditionModel, options: CompileOptions = CompileOptions()) -> None:
        check_supported(unet)
        self.unet = unet
        self.options = options
        self.mode = options.mode or default_mode(unet.device)
        self.cudagraphs = unet.device.type == "cuda" and self.mode == "reduce-overhead"
        use_buckets = self.cudagraphs if options.buckets is None else options.buckets
        self.buckets = row_buckets(options.max_rows) if use_buckets else None
        self.cache_dir = configure_cache(options.cache_dir)
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, options.recompile_limit)
        self.compile_s = 0.0  # warm-up seconds (compiles, or cache loads, and first runs)

        def head(sample, timestep, encoder_hidden_states, text_embeds, time_ids):
            added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
            h = run_head(unet, sample, timestep, encoder_hidden_states, added)
            return h.emb, h.encoder_hidden_states, h.stem, h.hidden

        def tail(emb, encoder_hidden_states, stem, hidden, forward_upsample_size: bool):
            return run_tail(unet, Head(emb, encoder_hidden_states, stem, hidden, forward_upsample_size))

        def out(hidden):
            return run_out(unet, hidden)

        compile_ = lambda fn: torch.compile(fn, mode=self.mode)  # noqa: E731
        self._head, self._tail, self._out = compile_(head), compile_(tail), compile_(out)

    # --- the parts ---------------------------------------------------------------------------

    def begin_step(self) -> None:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _rows(self, rows: int) -> int:
        return padded_rows(rows, self.buckets)

    def _take(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The real rows of a compiled part's output (a copy under CUDA graphs, whose output
        memory the next replay overwrites)."""
        t = t[:rows]
        return t.clone() if self.cudagraphs else t

    def head(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
             encoder_hidden_states: torch.Tensor,
             added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> Head:
        self._check(unet)
        n = sample.shape[0]
        factor = 2 ** unet.num_upsamplers
        forward_upsample_size = any(dim % factor != 0 for dim in sample.shape[-2:])
        rows = self._rows(n)
        added = added_cond_kwargs or {}
        # as a float (the time projection's own first op): one graph for every sampler's dtype
        timestep = timestep.to(sample.device, torch.float32)
        outs = self._head(_pad(sample, rows), _pad(timestep, rows), _pad(encoder_hidden_states, rows),
                          _pad(added.get("text_embeds"), rows), _pad(added.get("time_ids"), rows))
        emb, ehs, stem, hidden = (self._take(t, n) for t in outs)
        return Head(emb, ehs, stem, hidden, forward_upsample_size)

    def tail(self, unet: UNet2DConditionModel, head: Head) -> torch.Tensor:
        self._check(unet)
        n = head.hidden.shape[0]
        rows = self._rows(n)
        out = self._tail(_pad(head.emb, rows), _pad(head.encoder_hidden_states, rows),
                         _pad(head.stem, rows), _pad(head.hidden, rows), head.forward_upsample_size)
        return self._take(out, n)

    def out(self, unet: UNet2DConditionModel, hidden: torch.Tensor) -> torch.Tensor:
        self._check(unet)
        n = hidden.shape[0]
        return self._take(self._out(_pad(hidden, self._rows(n))), n)

    def whole(self, unet: UNet2DConditionModel, sample: torch.Tensor, timestep: torch.Tensor,
              encoder_hidden_states: torch.Tensor,
              added_cond_kwargs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The plain forward as head, tail and output layers (the same ops, in the same order)."""
        head = self.head(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs)
        return self.out(unet, self.tail(unet, head))

    def _check(self, unet: UNet2DConditionModel) -> None:
        if unet is not self.unet:
            raise RuntimeError("compiled parts called with another UNet than the one compiled")

    # --- warm-up -----------------------------------------------------------------------------

    @torch.inference_mode()
    def warm_up(self, latent_size: tuple[int, int], tokens: int = 77,
                row_counts: Sequence[int] | None = None) -> float:
        """Compile (or load from the cache) and run every part at ``latent_size`` over
        ``row_counts`` (default: the powers of two up to ``max_rows``, ``row_buckets``: a dynamic
        row count still gets a graph per size range, measured 2-15, 16-63, 64-..., so each range
        the engine can reach is compiled here, not mid-request); returns the seconds it took."""
        unet = self.unet
        if row_counts is None:
            row_counts = self.buckets or row_buckets(self.options.max_rows)
        config = unet.config
        device, dtype = unet.device, unet.dtype
        generator = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device, dtype)

        start = time.perf_counter()
        for rows in row_counts:
            sample = rand(rows, config.in_channels, *latent_size)
            timestep = torch.linspace(999, 1, rows).to(device)
            ehs = rand(rows, tokens, config.cross_attention_dim)
            added = None
            if config.addition_embed_type == "text_time":
                pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
                h, w = latent_size
                size = [h * 8, w * 8, 0, 0, h * 8, w * 8]
                added = {"text_embeds": rand(rows, pooled),
                         "time_ids": torch.tensor(size, dtype=dtype, device=device).repeat(rows, 1)}
            for _ in range(3 if self.cudagraphs else 1):  # CUDA graphs record on the 2nd or 3rd run
                self.begin_step()
                head = self.head(unet, sample, timestep, ehs, added)
                self.out(unet, self.tail(unet, head))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        self.compile_s += elapsed
        return elapsed


def recompiles() -> int:
    """Graphs dynamo compiled in this process so far (all functions): a growing count after the
    warm-up means recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_unet(unet: UNet2DConditionModel, options: CompileOptions = CompileOptions(), *,
                 latent_size: tuple[int, int] | None = None, name: str = "unet",
                 log: Callable[[str], None] | None = None) -> CompiledParts:
    """Compile ``unet``'s parts and (with ``options.warm_up``) warm them at ``latent_size``
    (default: the UNet's ``sample_size``), logging the time taken."""
    parts = CompiledParts(unet, options)
    if options.warm_up:
        size = latent_size or (int(unet.config.sample_size),) * 2
        graphs = recompiles()
        seconds = parts.warm_up(size)
        message = (f"compiled UNet of {name!r} ({parts.mode}, rows {parts.buckets or 'dynamic'}, "
                   f"latents {size[0]}x{size[1]}): {seconds:.1f} s, {recompiles() - graphs} graphs, "
                   f"cache {parts.cache_dir}")
        (log or logger.info)(message)
    return parts
