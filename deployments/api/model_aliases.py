"""Other names for served models: what a client sends when it knows no model of this server.

OpenAI clients name OpenAI's models (Open WebUI with no image model chosen sends
``model: "dall-e-2"``), so by default ``dall-e-2``, ``dall-e-3`` and ``gpt-image-1`` name the
default model. ``model_aliases`` in the app's args replaces that mapping (``{}``: no aliases).
``ServedModels`` resolves them for every dialect; ``GET /v1/models`` lists them with ``alias_of``.

Checked when the app deploys: an alias must name a served model, and must not be the name of one
(a configured alias that shadows a model fails the deploy; a default one is dropped). A checkpoint
copied into the folder later under an alias's name is served under that name: the model wins.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

OPENAI_IMAGE_MODELS = ("dall-e-2", "dall-e-3", "gpt-image-1")


def checked_aliases(aliases: Mapping[str, str] | None, served: Sequence[str],
                    default_model: str) -> dict[str, str]:
    """The aliases to serve: ``aliases`` (None: OpenAI's names for ``default_model``), each
    naming one of the ``served`` models; ValueError (the deploy fails) otherwise."""
    if aliases is None:
        return {alias: default_model for alias in OPENAI_IMAGE_MODELS if alias not in served}
    for alias, target in aliases.items():
        if alias in served:
            raise ValueError(f"model_aliases: {alias!r} is the name of a served model; an alias "
                             "may not shadow one")
        if target not in served:
            raise ValueError(f"model_aliases: {alias!r} names {target!r}, which is not served; "
                             f"served: {', '.join(served)}")
    return dict(aliases)
