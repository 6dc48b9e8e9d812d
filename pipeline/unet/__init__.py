"""The UNet forward as the engine runs it: many requests' rows in one batch with per-row
timesteps, the head/tail split at the first block, and caches as strategies of that forward."""
