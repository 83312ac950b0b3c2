"""ComfyUI adapter for the exemplar mixture: an exact denoiser wrapped as a real MODEL.

The model is a stock ``comfy.model_base.BaseModel`` over 3-channel pixel latents whose
``diffusion_model`` returns the eps / v / flow output of the closed-form posterior mean, so it runs
through ComfyUI's own sampling machinery (model sampling, CFG, samplers, schedulers) and gives
ground truth for tests and demos.

Like Stable Diffusion, which diffuses VAE latents scaled by 0.18215, the model diffuses pixels scaled
by ``latent_scale`` (0.125 by default). Unscaled 32x32 RGB images are so far apart that the posterior
settles on one exemplar before the first step of an SD schedule (sigma 14.6), which would hide the very
blur that nested diffusion removes; at 0.125 the early denoised estimates are the blurry blends a real
model shows. LATENT values stay plain pixels in [-1, 1], so the stock ``pixel_space`` VAE decodes them.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.supported_models_base
import torch
from comfy_api.latest import io

from ...nested_core import NestedDiffusionError
from .exemplars import (
    EXEMPLAR_NAMES,
    default_exemplars,
    log_prior_from_weights,
    posterior_mean_flow,
    posterior_mean_ve,
    prediction_from_mean,
)

PREDICTIONS = ("eps", "v_prediction", "flow")
DEFAULT_LATENT_SCALE = 0.125
_MODEL_TYPES = {
    "eps": comfy.model_base.ModelType.EPS,
    "v_prediction": comfy.model_base.ModelType.V_PREDICTION,
    "flow": comfy.model_base.ModelType.FLOW,
}


class ExemplarLatentFormat(comfy.latent_formats.LatentFormat):
    """RGB pixels in [-1, 1], multiplied by ``scale`` for diffusion; previews map them straight back to RGB."""

    latent_channels = 3

    def __init__(self, scale: float = DEFAULT_LATENT_SCALE):
        self.scale_factor = scale
        self.latent_rgb_factors = [[1.0 / scale if row == col else 0.0 for col in range(3)] for row in range(3)]


class ExemplarMixtureConfig(comfy.supported_models_base.BASE):
    """Model config: RGB pixel latents, no extra UNet settings, float32 weights."""

    unet_config: ClassVar[dict] = {}
    unet_extra_config: ClassVar[dict] = {}  # BASE would add UNet attention settings
    latent_format = ExemplarLatentFormat
    supported_inference_dtypes: ClassVar[list] = [torch.float32]
    memory_usage_factor = 0.01


class ExemplarDenoiser(torch.nn.Module):
    """The ``diffusion_model``: exact posterior mean turned into the model's raw output.

    Receives what ``BaseModel._apply_model`` hands any diffusion model: ``xc`` (``x / sqrt(sigma^2
    + 1)`` for eps/v, ``x`` for flow) and the timestep ``t``. The exact sigma is taken from
    ``transformer_options["sigmas"]`` (set by ComfyUI's ``calc_cond_batch``) when present, since
    discrete eps/v timesteps are rounded to integers; otherwise it is recovered from ``t``.
    Conditioning (context, y, control, ...) is accepted and ignored.
    """

    def __init__(
        self,
        prediction: str = "eps",
        exemplar_shape: tuple[int, int, int, int] = (8, 3, 32, 32),
        spread: float = 0.05,
        sampling_settings: dict | None = None,
        in_channels: int = 3,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        operations=None,
        **kwargs,
    ) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.spread = float(spread)
        self.dtype = torch.float32
        self.names: tuple[str, ...] = ()
        self.register_buffer("exemplars", torch.zeros(exemplar_shape, dtype=torch.float32, device=device))
        settings = dict(sampling_settings or {})
        self.multiplier = float(settings.get("multiplier", 1000))
        # eps/v: own copy of the discrete schedule, to map timesteps back to sigmas.
        self._schedule = None
        if prediction != "flow":
            self._schedule = comfy.model_sampling.ModelSamplingDiscrete(SimpleNamespace(sampling_settings=settings))

    def sigma_from_timestep(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The sigma a timestep stands for: ``t / multiplier`` (flow) or the schedule's sigma(t)."""
        if self.prediction == "flow":
            return timesteps.float() / self.multiplier
        return self._schedule.sigma(timesteps.float())

    def _sigma(self, x: torch.Tensor, timesteps: torch.Tensor, transformer_options: dict | None) -> torch.Tensor:
        sigmas = (transformer_options or {}).get("sigmas", None)
        if torch.is_tensor(sigmas) and sigmas.numel() > 0 and x.shape[0] % sigmas.numel() == 0:
            return sigmas.reshape(-1).to(x.device, torch.float64).repeat(x.shape[0] // sigmas.numel())
        sigma = self.sigma_from_timestep(timesteps.reshape(-1)).to(x.device, torch.float64)
        return sigma.expand(x.shape[0]) if sigma.numel() == 1 else sigma

    def log_prior(self, context, batch: int) -> torch.Tensor | None:
        """The conditioning picks exemplars: its first token holds one weight per exemplar (zeros: all of them).
        Conditioning of another width (a CLIP embedding, the 8-wide empty one with other exemplars) means no choice."""
        if not torch.is_tensor(context) or context.ndim != 3 or context.shape[-1] != self.exemplars.shape[0]:
            return None
        weights = context[:, 0, :]
        if weights.shape[0] != batch:
            weights = weights[:1].expand(batch, -1)
        return log_prior_from_weights(weights)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, transformer_options=None, **kwargs):
        sigma = self._sigma(x, timesteps, transformer_options)
        scale = (sigma**2 + 1).sqrt().reshape(-1, 1, 1, 1)
        prior = self.log_prior(context, x.shape[0])
        if self.prediction == "flow":
            latent = x.to(torch.float64)
            mean = posterior_mean_flow(latent, sigma, self.exemplars, self.spread, prior)
        else:
            latent = x.to(torch.float64) * scale  # undo EPS.calculate_input
            mean = posterior_mean_ve(latent, sigma, self.exemplars, self.spread, prior)
        return prediction_from_mean(latent, sigma, mean, self.prediction).to(x.dtype)


def build_exemplar_model(
    exemplars: torch.Tensor, spread: float, prediction: str, shift: float = 1.0,
    latent_scale: float = DEFAULT_LATENT_SCALE, names: tuple[str, ...] = (),
) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL whose denoiser is exact for the mixture of ``exemplars`` ([K, 3, H, W], [-1, 1]).

    ``prediction``: ``"eps"`` / ``"v_prediction"`` (SD1.5-style discrete linear schedule) or
    ``"flow"`` (``ModelSamplingDiscreteFlow`` with ``shift``, multiplier 1000). ``spread`` is in
    pixel units; the denoiser works in diffusion space (pixels times ``latent_scale``).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if exemplars.ndim != 4 or exemplars.shape[1] != 3:
        raise ValueError(f"exemplars must be [K, 3, H, W], got {tuple(exemplars.shape)}")
    if spread <= 0:
        raise ValueError(f"spread must be > 0, got {spread}")
    if latent_scale <= 0:
        raise ValueError(f"latent_scale must be > 0, got {latent_scale}")
    sampling_settings = {"shift": float(shift), "multiplier": 1000} if prediction == "flow" else {}
    config = ExemplarMixtureConfig(
        {
            "in_channels": 3,
            "prediction": prediction,
            "exemplar_shape": tuple(exemplars.shape),
            "spread": float(spread) * latent_scale,
            "sampling_settings": sampling_settings,
        }
    )
    config.sampling_settings = dict(sampling_settings)
    config.latent_format = ExemplarLatentFormat(latent_scale)
    offload_device = comfy.model_management.unet_offload_device()
    model = comfy.model_base.BaseModel(
        config, model_type=_MODEL_TYPES[prediction], device=offload_device, unet_model=ExemplarDenoiser
    )
    with torch.no_grad():
        model.diffusion_model.exemplars.copy_(exemplars.detach().to(torch.float32) * latent_scale)
    model.diffusion_model.names = tuple(names)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=offload_device
    )


def empty_conditioning() -> list:
    """A CONDITIONING the exemplar model accepts: one 8-dim zero token, no extras (needs no CLIP)."""
    return [[torch.zeros(1, 1, 8), {}]]


def exemplar_names(model) -> list[str]:
    """Names a prompt can use: the built-in set's names, or "exemplar 1".. for exemplars from images."""
    denoiser = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(denoiser, ExemplarDenoiser):
        raise NestedDiffusionError("model must come from Exemplar Mixture Model (testing): only it understands exemplar prompts")
    count = denoiser.exemplars.shape[0]
    return list(denoiser.names) if denoiser.names else [f"exemplar {index + 1}" for index in range(count)]


def prompt_weights(text: str, names: list[str]) -> torch.Tensor:
    """'red disc, smiley' or '1, 8' (1-based) -> one weight per exemplar; empty text = no preference."""
    weights = torch.zeros(len(names))
    lowered = [name.lower() for name in names]
    for part in (piece.strip().lower() for piece in text.split(",")):
        if not part:
            continue
        if part.isdigit() and 1 <= int(part) <= len(names):
            weights[int(part) - 1] = 1.0
        elif part in lowered:
            weights[lowered.index(part)] = 1.0
        else:
            raise NestedDiffusionError(
                f"text names {part!r}, which is not an exemplar of this model: use {', '.join(names)} "
                f"or their numbers 1 to {len(names)}"
            )
    return weights


def image_to_exemplars(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in [0, 1] -> exemplars ``[B, 3, H, W]`` in [-1, 1]."""
    pixels = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return (pixels.movedim(-1, 1).float() * 2.0 - 1.0).contiguous()


class NestedExemplarModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedExemplarModel",
            display_name="Exemplar Mixture Model (testing)",
            category="sampling/nested/testing",
            description=(
                "An exact-denoiser model for teaching and testing, not an image generator: the data "
                "are small Gaussian clouds around a few exemplar images, so the denoiser is known in "
                "closed form. Sample with a latent of the exemplars' size (EmptyChromaRadianceLatentImage) "
                "and view with the 'pixel_space' VAE; every correct sampler lands on an exemplar."
            ),
            inputs=[
                io.Combo.Input("prediction", options=list(PREDICTIONS), default="eps",
                               tooltip="The model family to imitate: eps / v-prediction (SD-style) or flow (SD3/Flux-style)."),
                io.Float.Input("spread", default=0.05, min=0.001, max=1.0, step=0.001,
                               tooltip="Std of the Gaussian cloud around each exemplar (pixel units in [-1, 1])."),
                io.Int.Input("image_size", default=32, min=16, max=128, step=8,
                             tooltip="Size of the built-in exemplars; the latent must match it."),
                io.Float.Input("shift", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="Flow models only: the timestep shift of the sampling schedule."),
                io.Float.Input("latent_scale", default=DEFAULT_LATENT_SCALE, min=0.01, max=1.0, step=0.005,
                               tooltip="Pixels are diffused times this factor (as SD scales its latents); smaller "
                                       "keeps the early denoised estimates blurry blends for longer."),
                io.Image.Input("exemplars", optional=True,
                               tooltip="Optional images to use as exemplars instead of the built-in set."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="Empty conditioning for positive and negative: no CLIP needed."),
            ],
        )

    @classmethod
    def execute(cls, prediction: str, spread: float, image_size: int, shift: float = 1.0,
                latent_scale: float = DEFAULT_LATENT_SCALE, exemplars: torch.Tensor | None = None) -> io.NodeOutput:
        mus = image_to_exemplars(exemplars) if exemplars is not None else default_exemplars(image_size)
        names = () if exemplars is not None else EXEMPLAR_NAMES
        model = build_exemplar_model(mus, spread=spread, prediction=prediction, shift=shift, latent_scale=latent_scale,
                                     names=names)
        return io.NodeOutput(model, empty_conditioning())


class NestedExemplarPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedExemplarPrompt",
            display_name="Exemplar Prompt (testing)",
            category="sampling/nested/testing",
            description="A 'prompt' for the Exemplar Mixture Model: the exemplars you want, by name (red disc, blue "
                        "square, green triangle, yellow cross, cyan ring, orange stripes, checker, smiley) or number. "
                        "The model then samples only those (exactly: the class-conditional mixture), so CFG and "
                        "prompt changes between stages behave as with a text model. Empty text: any exemplar.",
            inputs=[
                io.Model.Input("model", tooltip="The Exemplar Mixture Model this prompt is for."),
                io.String.Input("text", default="red disc, smiley", tooltip="Exemplar names or 1-based numbers, comma-separated."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, model, text: str) -> io.NodeOutput:
        weights = prompt_weights(text, exemplar_names(model))
        return io.NodeOutput([[weights.reshape(1, 1, -1), {}]])
