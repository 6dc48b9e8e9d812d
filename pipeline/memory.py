"""What a process holds: each loaded component's tensor bytes, the process's RSS, CUDA memory.

The split into stages is worth only what it saves, so every replica can say what it holds;
these are the plain-torch measurements, the deployments report them.
"""
from __future__ import annotations

import ctypes
import itertools
import platform
import resource
import sys

import psutil
import torch

from pipeline.model import DiffusionModel

_LIBC = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
IDLE_BEFORE_RELEASE_S = 1.0
"""How long a replica waits idle before ``release_freed_memory``: a burst's requests arrive
closer together than this, and releasing between them would only fault the pages back in."""


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's parameters and buffers, a tensor shared between two names once."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum({t.data_ptr(): t.numel() * t.element_size() for t in tensors}.values())


def component_bytes(model: DiffusionModel) -> dict[str, int]:
    """Tensor bytes of each component ``model`` holds, by diffusers' component name."""
    return {name: tensor_bytes(module) for name, module in model.modules().items()}


def process_memory() -> dict[str, int | None]:
    """This process's resident memory now and at its peak, and on CUDA torch's allocated bytes
    now and at peak (None without CUDA)."""
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak if sys.platform == "darwin" else peak * 1024  # Linux counts KiB
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "rss_bytes": rss,
        "peak_rss_bytes": max(peak, rss),  # the kernel's peak lags a page or two behind
        "cuda_allocated_bytes": torch.cuda.memory_allocated() if cuda else None,
        "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }


def release_freed_memory() -> None:
    """Give the heap's freed pages back to the OS (glibc only; elsewhere nothing to do).

    After one large block is freed, glibc serves allocations under 32 MB from its heap and keeps
    them when freed: a replica's RSS then carries its last forward's activations for good
    (measured: a VAE replica at 1.7x its weights after one 256 px decode, 1.1x after this).
    Call it once a replica has been idle ``IDLE_BEFORE_RELEASE_S``: it costs ~10 ms, and the
    next forward ~3%.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
