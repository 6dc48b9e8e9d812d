"""The application builder: ``import_path: deployments.app:build_app`` in serve_config.yaml.

Validates the ``args`` (``AppArgs``), makes model paths absolute, reads each model's metadata
for the Ingress, picks each stage's placement, and binds the four deployments together.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from deployments.catalog import describe_model
from deployments.denoiser import Denoiser
from deployments.ingress import Ingress, IngressSettings
from deployments.placement import actor_options
from deployments.settings import AppArgs, StageSettings, resolve_model_path
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VAEDecoder


def parse_args(args: dict[str, Any] | AppArgs | None, base: Path | None = None) -> AppArgs:
    """Validated args with every model path absolute (replicas may run in another directory)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    models = {name: str(resolve_model_path(path, base)) for name, path in parsed.models.items()}
    return parsed.model_copy(update={"models": models})


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's builder: ``args`` is the ``args:`` mapping of the config file."""
    parsed = parse_args(args)
    catalog = {name: describe_model(name, Path(path)) for name, path in parsed.models.items()}
    stage = StageSettings(model_paths=parsed.models, default_model=parsed.default_model,
                          accelerator=parsed.accelerator)

    def place(deployment):
        return deployment.options(ray_actor_options=actor_options(
            deployment.name, parsed.accelerator, parsed.placement))

    text_encoder = place(TextEncoder).bind(stage, parsed.text_encoder)
    denoiser = place(Denoiser).bind(stage, parsed.denoiser)
    vae_decoder = place(VAEDecoder).bind(stage, parsed.vae_decoder)
    settings = IngressSettings(models=catalog, default_model=parsed.default_model,
                               limits=parsed.limits, request_timeout_s=parsed.request_timeout_s)
    return place(Ingress).bind(text_encoder, denoiser, vae_decoder, settings)
