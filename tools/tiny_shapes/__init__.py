"""tiny-shapes: the small Stable Diffusion-architecture model that ships with Raydiance.

Its world is 64x64 images of one flat shape on a flat background, prompted as
``a {colour} {shape} on a {colour} background``. It exists so that the service runs with no GPU
and no download, and so that tests can tell a right picture from a wrong one by its colours.
"""

from deployments.settings import BUILTIN_MODEL_DIR as MODEL_DIR

__all__ = ["MODEL_DIR"]
