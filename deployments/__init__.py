"""Raydiance's Ray Serve layer: one thin deployment per pipeline stage, the HTTP API, the app builder.

``deployments.app:build_app`` is the entry point that ``serve run serve_config.yaml`` imports.
Everything heavy lives in ``pipeline/``; these modules only place it on replicas and wire it up.
"""
