"""The application's arguments (``args:`` in serve_config.yaml), validated by pydantic.

Kept apart from ``app.py`` so that replicas import the settings without importing the builder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from pipeline.accelerator import Accelerator
from pipeline.library import ModelCatalog

from deployments.api.admission import BackpressureSettings
from deployments.api.auth import CorsSettings
from deployments.api.keys import AuthSettings
from deployments.api.protocol import MAX_SIDE, ImageCount, ImageSide, Name, Steps


PROJECT_ROOT = Path(__file__).resolve().parents[1]
BUILTIN_MODEL_DIR = PROJECT_ROOT / "models" / "tiny-shapes"
"""The built-in model (tiny-shapes) in a source checkout (installed with ``pip install -e``)."""
STAGES = ("Ingress", "TextEncoder", "Denoiser", "VAEDecoder", "JobQueue")


class _Strict(BaseModel):
    # A typo in serve_config.yaml should fail the deploy, not be silently ignored.
    model_config = ConfigDict(extra="forbid")


InputPixels = Annotated[int, Field(ge=64 * 64, le=MAX_SIDE * MAX_SIDE, description=(
    "pixels (width x height) of an image a request sends; at most 8192x8192, below Pillow's "
    "decompression-bomb threshold"))]
InputBytes = Annotated[int, Field(ge=1024, le=1 << 30, description="bytes of one image a request "
                                  "sends, decoded from base64")]


class Limits(_Strict):
    """What one request may ask for, on top of its fields' fixed bounds; each limit has its
    field's type (a ``max_width`` that is no valid width fails the deploy). Checked in one place,
    ``ServedModels.resolve``: a request beyond them is answered 4xx naming its field."""

    model_config = ConfigDict(frozen=True)

    max_width: ImageSide = 1024
    max_height: ImageSide = 1024
    max_steps: Steps = 100
    max_images: ImageCount = 4
    max_prompt_chars: PositiveInt = 2000
    # Images callers send (init images, masks, images to upscale or read), each; checked in
    # ``deployments.api.image_input``. The pixel bound is also the largest upscale answered.
    max_input_pixels: InputPixels = 2048 * 2048
    max_input_bytes: InputBytes = 16 << 20


class BatchSettable(Protocol):
    """A ``@serve.batch`` method, as its setters see it (settings never import Ray)."""

    def set_max_batch_size(self, size: int) -> None: ...
    def set_batch_wait_timeout_s(self, timeout_s: float) -> None: ...


class BatchKnobs(_Strict):
    """@serve.batch settings of a batched stage (text encoder, VAE decoder)."""

    max_batch_size: PositiveInt = 8
    # How long the first request of a batch waits for company. Small: at concurrency 1 this is
    # pure added latency; under load batches fill while the previous batch computes anyway.
    batch_wait_timeout_s: float = Field(0.002, ge=0.0)

    def apply_to(self, batched: BatchSettable) -> None:
        """Set these on a replica's ``@serve.batch`` method (its decorator holds the defaults)."""
        batched.set_max_batch_size(self.max_batch_size)
        batched.set_batch_wait_timeout_s(self.batch_wait_timeout_s)


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class DenoiserKnobs(_Strict):
    """The Denoiser's step-batching engine.

    ``max_batch_rows``: UNet rows per forward (a request with guidance takes 2 rows, without 1);
    requests share a forward while their rows fit, and a request with more rows than this still
    runs, alone. So 1 runs every request alone, 2 runs each guided request alone but pairs
    unguided ones; a GPU wants as many as fit its memory.

    ``compile_mode`` and ``compile_cache_dir``: how the UNets of models configured with
    ``compile: true`` are compiled (``pipeline.unet.compiled``): torch.compile's mode (absent:
    reduce-overhead, i.e. CUDA graphs, on CUDA; default elsewhere) and inductor's on-disk cache,
    which a restarted replica reuses (absent: TORCHINDUCTOR_CACHE_DIR where set, else
    ``pipeline.unet.compiled.DEFAULT_CACHE_DIR``, ~/.cache/raydiance/inductor).
    """

    max_batch_rows: PositiveInt = 32
    compile_mode: CompileMode | None = None
    compile_cache_dir: str | None = None


ActorOptions = dict[str, Any]


def _cpu_placement() -> dict[str, ActorOptions]:
    # Fractions that fit 2 cores with room for a second Denoiser replica when autoscaling.
    return {"Ingress": {"num_cpus": 0.1}, "TextEncoder": {"num_cpus": 0.1},
            "Denoiser": {"num_cpus": 0.8}, "VAEDecoder": {"num_cpus": 0.1},
            "JobQueue": {"num_cpus": 0.05}}


def _gpu_placement() -> dict[str, ActorOptions]:
    # CLIP and VAE are small: they share one card (fractions); the UNet owns a whole card.
    return {"Ingress": {"num_cpus": 0.1},
            "TextEncoder": {"num_cpus": 0.5, "num_gpus": 0.25},
            "Denoiser": {"num_cpus": 1.0, "num_gpus": 1.0},
            "VAEDecoder": {"num_cpus": 0.5, "num_gpus": 0.25},
            "JobQueue": {"num_cpus": 0.1}}


class Placement(_Strict):
    """``ray_actor_options`` per stage for CPU and GPU clusters; ``accelerator`` picks the set.

    A stage a table leaves out keeps its default options (a config written before a stage
    existed still places it sensibly, not at Serve's default of a whole CPU). A
    ``ray_actor_options`` under ``deployments:`` in the config file replaces these entirely.
    """

    cpu: dict[str, ActorOptions] = Field(default_factory=_cpu_placement)
    gpu: dict[str, ActorOptions] = Field(default_factory=_gpu_placement)

    @model_validator(mode="after")
    def _known_stages(self) -> "Placement":
        for kind in ("cpu", "gpu"):
            unknown = set(getattr(self, kind)) - set(STAGES)
            if unknown:
                raise ValueError(f"placement.{kind}: unknown stage(s) {sorted(unknown)}; "
                                 f"stages are {', '.join(STAGES)}")
        self.cpu = {**_cpu_placement(), **self.cpu}
        self.gpu = {**_gpu_placement(), **self.gpu}
        return self


class JobSettings(_Strict):
    """The job registry's bounds: nothing it keeps grows without limit."""

    ttl_s: PositiveFloat = 3600.0  # a finished job and its images are dropped this long after
    max_queued: PositiveInt = 256  # beyond: 429 with Retry-After
    max_running: PositiveInt = 16  # jobs admitted to the Denoisers at once; the rest wait in order
    max_jobs: PositiveInt = 10000  # records kept; beyond, the oldest finished ones go
    image_bytes: PositiveInt = 512 << 20  # PNG bytes stored; beyond, the oldest finished jobs go
    # Image URLs start with this (e.g. https://images.example.com, with the app's route prefix
    # if it has one: it is used as given); absent: the request's own scheme, host and prefix.
    public_base_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")


class ModelEntry(_Strict):
    """A configured model given as an object instead of a bare path: ``{path: ..., compile: true}``.

    ``compile``: the Denoiser compiles this model's UNet at load (torch.compile, warmed over its
    batch sizes; ``pipeline.unet.compiled``). Opt-in per model, a deployment setting only: no
    request can change it. The other stages ignore it.
    """

    path: str
    compile: bool = False


def entry_path(entry: str | ModelEntry) -> str:
    return entry if isinstance(entry, str) else entry.path


class AppArgs(_Strict):
    """Everything ``build_app`` needs; see serve_config.yaml for each knob explained."""

    # name: path, or name: {path: ..., compile: true} (ModelEntry)
    models: dict[str, str | ModelEntry] = Field(
        default_factory=lambda: {"tiny-shapes": str(BUILTIN_MODEL_DIR)})
    # A ComfyUI/A1111-style folder of checkpoints (*.safetensors single files and diffusers
    # folders), each served under its file or folder name; read per request, so new files serve
    # at once. And a folder of LoRAs (*.safetensors, kohya or diffusers/peft), named by stem.
    checkpoints_dir: str | None = None
    loras_dir: str | None = None
    # A1111's embeddings folder: textual inversion *.safetensors, used by name in prompts.
    embeddings_dir: str | None = None
    default_model: str | None = None
    # Other names a request may give a served model (alias: model). Absent: OpenAI's image model
    # names (dall-e-2, dall-e-3, gpt-image-1) name default_model, as OpenAI clients send them.
    model_aliases: dict[Name, Name] | None = None
    # Models each stage replica keeps loaded (Ray Serve model multiplexing routes a request to a
    # replica holding its model; the least recently used is dropped beyond this), and LoRAs
    # each model keeps loaded as adapters.
    max_models_per_replica: PositiveInt = 2
    max_loras_per_model: PositiveInt = 8
    accelerator: Accelerator = "auto"
    limits: Limits = Field(default_factory=Limits)
    text_encoder: BatchKnobs = Field(default_factory=BatchKnobs)
    vae_decoder: BatchKnobs = Field(default_factory=BatchKnobs)
    denoiser: DenoiserKnobs = Field(default_factory=DenoiserKnobs)
    placement: Placement = Field(default_factory=Placement)
    request_timeout_s: PositiveFloat = 300.0
    # API keys (absent: none needed) and the browser origins allowed to call (none by default).
    auth: AuthSettings | None = None
    cors: CorsSettings = Field(default_factory=CorsSettings)
    # Work requests one Ingress replica holds at once; beyond: 503 (or 429) with Retry-After.
    backpressure: BackpressureSettings = Field(default_factory=BackpressureSettings)
    jobs: JobSettings = Field(default_factory=JobSettings)

    @model_validator(mode="after")
    def _something_is_served(self) -> "AppArgs":
        if not self.models and not self.checkpoints_dir:
            raise ValueError("models: name at least one model (name: path), or give checkpoints_dir")
        if self.default_model is None and self.models:
            self.default_model = next(iter(self.models))
        return self

    def model_paths(self) -> dict[str, str]:
        """The configured models by name: their paths."""
        return {name: entry_path(entry) for name, entry in self.models.items()}

    def compiled_models(self) -> list[str]:
        """The configured models whose UNet the Denoiser compiles."""
        return [name for name, entry in self.models.items()
                if isinstance(entry, ModelEntry) and entry.compile]


class StageSettings(_Strict):
    """What a model-holding replica needs: where the models are and which device to use."""

    model_paths: dict[str, str]
    compiled_models: list[str] = Field(default_factory=list)  # their UNets compiled by the Denoiser
    checkpoints_dir: str | None = None
    loras_dir: str | None = None
    embeddings_dir: str | None = None
    default_model: str
    accelerator: Accelerator
    max_models_per_replica: PositiveInt = 2
    max_loras_per_model: PositiveInt = 8

    def catalog(self) -> ModelCatalog:
        return ModelCatalog(self.model_paths, self.checkpoints_dir)


def resolve_model_path(path: str, base: Path | None = None) -> Path:
    """An absolute model path: relative ones against ``base`` (the cwd), then the project root.

    ``serve run`` is normally started beside serve_config.yaml, so the cwd is the config's
    folder; the project-root fallback lets ``models/tiny-shapes`` work from anywhere.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute():
        return candidate
    for root in (base or Path.cwd(), PROJECT_ROOT):
        if (root / candidate).exists():
            return (root / candidate).resolve()
    return ((base or Path.cwd()) / candidate).resolve()
