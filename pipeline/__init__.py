"""Raydiance's engine in plain torch + diffusers: loading, text encoding, denoising, decoding.

Nothing here imports Ray: everything runs and is tested in one process, and the Ray Serve
deployments in ``deployments/`` are thin wrappers over it.
"""
