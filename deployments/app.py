"""The application builder: ``import_path: deployments.app:build_app`` in serve_config.yaml.

Validates the ``args`` (``AppArgs``), makes model paths absolute, reads each model's metadata
for the Ingress, picks each stage's placement, and binds the deployments together: the three
stages, the job queue over them, and the Ingress.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from deployments.api.ingress import Ingress, IngressSettings
from deployments.api.model_aliases import checked_aliases
from deployments.denoiser import Denoiser
from deployments.job_queue import JobQueue
from deployments.placement import actor_options
from deployments.settings import AppArgs, ModelEntry, StageSettings, entry_path, resolve_model_path
from deployments.text_encoder import TextEncoder
from deployments.vae_decoder import VAEDecoder


def parse_args(args: dict[str, Any] | AppArgs | None, base: Path | None = None) -> AppArgs:
    """Validated args with every model path absolute (replicas may run in another directory)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    models = {name: _resolved(entry, base) for name, entry in parsed.models.items()}
    folders = {}
    for key in ("checkpoints_dir", "loras_dir", "embeddings_dir"):
        value = getattr(parsed, key)
        if value is not None:
            folder = resolve_model_path(value, base)
            if not folder.is_dir():
                raise ValueError(f"{key}: {folder} is not a directory")
            folders[key] = str(folder)
    return parsed.model_copy(update={"models": models, **folders})


def _resolved(entry: str | ModelEntry, base: Path | None) -> str | ModelEntry:
    """A model entry with its path absolute, in the form it was given."""
    path = str(resolve_model_path(entry_path(entry), base))
    return path if isinstance(entry, str) else entry.model_copy(update={"path": path})


def stage_settings(parsed: AppArgs) -> StageSettings:
    """The replicas' settings; checks every configured model's files (a bad path fails the
    deploy, not the first request) and picks the default model."""
    stage = StageSettings(model_paths=parsed.model_paths(), compiled_models=parsed.compiled_models(),
                          checkpoints_dir=parsed.checkpoints_dir,
                          loras_dir=parsed.loras_dir, embeddings_dir=parsed.embeddings_dir,
                          default_model=parsed.default_model or "",
                          accelerator=parsed.accelerator,
                          max_models_per_replica=parsed.max_models_per_replica,
                          max_loras_per_model=parsed.max_loras_per_model)
    catalog = stage.catalog()
    for name in parsed.models:
        catalog.describe(name)
    names = catalog.names()
    default = parsed.default_model or (names[0] if names else None)
    if default is None:
        raise ValueError(f"checkpoints_dir: {parsed.checkpoints_dir} holds no models")
    if default not in names:
        raise ValueError(f"default_model: {default!r} is not served; served: {', '.join(names)}")
    return stage.model_copy(update={"default_model": default})


def build_app(args: dict[str, Any]) -> serve.Application:
    """Ray Serve's builder: ``args`` is the ``args:`` mapping of the config file."""
    parsed = parse_args(args)
    stage = stage_settings(parsed)

    def place(deployment):
        return deployment.options(ray_actor_options=actor_options(
            deployment.name, parsed.accelerator, parsed.placement))

    text_encoder = place(TextEncoder).bind(stage, parsed.text_encoder)
    denoiser = place(Denoiser).bind(stage, parsed.denoiser)
    vae_decoder = place(VAEDecoder).bind(stage, parsed.vae_decoder)
    job_queue = place(JobQueue).bind(text_encoder, denoiser, vae_decoder, parsed.jobs,
                                     parsed.request_timeout_s)
    aliases = checked_aliases(parsed.model_aliases, stage.catalog().names(), stage.default_model)
    settings = IngressSettings(stage=stage, limits=parsed.limits,
                               request_timeout_s=parsed.request_timeout_s, auth=parsed.auth,
                               cors=parsed.cors, backpressure=parsed.backpressure,
                               model_aliases=aliases, jobs=parsed.jobs)
    return place(Ingress).bind(text_encoder, denoiser, vae_decoder, job_queue, settings)
