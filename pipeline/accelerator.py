"""Where the stages run, as the config names it: apart from ``pipeline.device`` (which needs
torch) because the app builder and the placement read it too."""
from __future__ import annotations

from typing import Literal

Accelerator = Literal["auto", "cpu", "cuda"]
"""auto: GPUs when the Ray cluster has them, else CPUs; cpu: always CPUs; cuda: always GPUs."""
