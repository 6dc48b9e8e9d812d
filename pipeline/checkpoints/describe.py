"""A single-file checkpoint's family and configs, from its header alone (key names, shapes,
metadata): no weight is read, and neither torch nor diffusers is imported, so the API process
describes checkpoints through this while the stages load them (``pipeline.checkpoints.load``).
"""
from __future__ import annotations

from pathlib import Path

from pipeline.checkpoints.configs import assemble, pooled_width, unet_dimensions, vae_dimensions
from pipeline.checkpoints.layout import UNET, VAE, Header, detect_family, read_header, with_prefix
from pipeline.configs import bundled_config
from pipeline.errors import ModelLoadError
from pipeline.model_configs import Family, ModelConfigs, ModelDescription


def read_configs(path: Path) -> tuple[Header, ModelConfigs]:
    """The file's header, and its family and UNet, VAE and scheduler configs from it alone."""
    header = read_header(path)
    family: Family = detect_family(header.shapes)  # type: ignore[assignment]
    settings = header.settings
    try:
        unet = assemble(family, "unet", unet_dimensions(with_prefix(header.shapes, UNET),
                                                        pooled_width(header.shapes)), settings)
        vae = assemble(family, "vae", vae_dimensions(with_prefix(header.shapes, VAE)), settings)
    except KeyError as error:  # a tensor the layout needs is not in the file
        raise ModelLoadError(f"{path.name}: incomplete {family} checkpoint (no {error.args[0]!r})") from None
    scheduler = dict(settings.get("scheduler") or bundled_config(family, "scheduler"))
    if "v_pred" in header.shapes:  # ComfyUI's marker keys for v-prediction / zero-terminal-SNR models
        scheduler["prediction_type"] = "v_prediction"
    if "ztsnr" in header.shapes:
        scheduler["rescale_betas_zero_snr"] = True
    index = {**bundled_config(family, "model_index"), **settings.get("model_index", {})}
    return header, ModelConfigs.with_index(family, index, unet=unet, vae=vae, scheduler=scheduler)


def describe_checkpoint(path: str | Path) -> ModelDescription:
    """Family, native size and VAE scale from the file's header alone."""
    return read_configs(Path(path))[1].description
