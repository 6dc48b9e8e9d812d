"""The UNet forward as the engine runs it: many requests' rows in one batch, each row at its own
timestep, and the caches as strategies of that forward.

- ``forward``: one request's rows, their concatenation (SDXL's added conditioning included) and
  the plain batched forward.
- ``split``: ``UNet2DConditionModel.forward`` cut at the First Block Cache head (head, tail,
  output layers), bitwise the forward of the diffusers version it names.
- ``parts``: the callable parts (head, tail, output layers, whole forward) a model runs them
  with, eager by default (``DiffusionModel.unet_parts``); ``compiled``: the same parts through
  ``torch.compile`` for a model configured with ``compile: true``.
- ``cache_config``, ``cache_state``, ``first_block_cache``: First Block Cache as a strategy: a
  config, a per-request state from ``new_state(steps)``, one ``forward(unet, rows, states)``.
"""
