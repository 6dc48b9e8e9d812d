"""Raydiance's Ray Serve layer: one thin deployment per pipeline stage, the HTTP API, the app builder.

``deployments.app:build_app`` is the entry point that ``serve run serve_config.yaml`` imports.
Everything heavy lives in ``pipeline/``; these modules only place it on replicas and wire it up.
"""

# First, before any deployment module pulls in torch: the moment a replica's imports begin, for
# the start-up breakdown each replica logs (``startup.StartupClock``).
from deployments import startup  # noqa: E402

__all__ = ["startup"]
