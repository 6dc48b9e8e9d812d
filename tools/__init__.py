"""Tools for tests, benchmarks and training: random-weight models, the checkpoint writer, the
built-in model's world and trainer, and helpers that deploy the app on a local Ray with timeouts.

Not part of the product packages (``pipeline``, ``deployments``): the service never imports them.
"""
