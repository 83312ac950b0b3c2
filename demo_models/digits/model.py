"""ComfyUI adapter of the digits models: ComfyUI's own SD1.5-style ``UNetModel`` inside a ``BaseModel``.

The model is built exactly as ComfyUI builds a checkpoint's model (a ``supported_models_base.BASE`` config,
``comfy.model_base.BaseModel`` with ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``), only from
a tiny ``unet_config``: 3-channel 16x16 pixel latents, two levels, cross-attention on a one-token context
(``data.digit_context``). Three variants share the network and differ in ComfyUI's model sampling:

- ``"eps"``: ``ModelType.EPS``, the discrete SD1.5 schedule (linear betas 0.00085..0.012, 1000 timesteps);
- ``"v"``: ``ModelType.V_PREDICTION``, the same discrete schedule, v-prediction (as SD2.x's 768-v models);
- ``"flow"``: ``ModelType.FLOW``, ``ModelSamplingDiscreteFlow`` (rectified flow, shift ``DEFAULT_SHIFT``).

The model diffuses ``(pixels - latent_shift) * latent_scale`` (``DigitsLatentFormat``; SD3's latent format has
the same form): shift -0.39 and scale 1.5 centre the digits (pixel mean -0.39) and give them unit standard
deviation (pixel std 0.64), the data scale ComfyUI's eps input scaling ``x / sqrt(sigma^2 + 1)`` assumes, as SD's
0.18215 does for its VAE latents. LATENT values seen by nodes are plain pixels in [-1, 1], so the stock
``pixel_space`` VAE decodes them and previews map them straight to RGB. The latent scale and shift, the flow
shift and the ``unet_config`` a file was trained with are stored in its safetensors metadata (``"config"``,
JSON) and used to rebuild the model.

Training (``scripts/train_digits.py``) goes through ``BaseModel.apply_model``, so the parametrisation is
exactly the one ComfyUI samples with: ``training_loss`` noises ``x0`` in ComfyUI's sigma space and compares
the network's raw output, recovered from the denoised estimate, with the eps / v / flow target.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.ops
import comfy.supported_models_base
import torch

from .data import CONTEXT_DIM, IMAGE_SIZE

VARIANTS = ("eps", "flow", "v")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_LATENT_SCALE = 1.5
DEFAULT_LATENT_SHIFT = -0.39
DEFAULT_SHIFT = 1.0  # the flow variant's timestep shift

UNET_CONFIG = {
    # comfy.model_detection's SD1.5 keys, scaled down: 3-channel 16x16 pixels, two levels of 64 channels, one res
    # block each, cross-attention on the digit token (and self-attention) at the 8x8 level and in the middle.
    # 64, not 32, channels: ComfyUI's UNet normalises with GroupNorm(32 groups), which on 32 channels is a
    # per-channel instance norm that erases each channel's mean; the output then cannot follow the input's
    # per-colour mean, and the eps variant (whose error is multiplied by sigma up to 14.6) drew coloured digits.
    "use_checkpoint": False,
    "image_size": IMAGE_SIZE,
    "in_channels": 3,
    "out_channels": 3,
    "model_channels": 64,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 1],
    "transformer_depth": [0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1],
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
UNET_EXTRA_CONFIG = {"num_heads": -1, "num_head_channels": 32}

_MODEL_TYPES = {"eps": comfy.model_base.ModelType.EPS, "flow": comfy.model_base.ModelType.FLOW,
                "v": comfy.model_base.ModelType.V_PREDICTION}


def weights_path(variant: str) -> Path:
    return WEIGHTS_DIR / f"digits_{variant}.safetensors"


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    """RGB pixels in [-1, 1]; diffusion sees ``(pixels - shift) * scale``; previews map them straight back to RGB."""

    latent_channels = 3

    def __init__(self, scale: float = DEFAULT_LATENT_SCALE, shift: float = DEFAULT_LATENT_SHIFT):
        self.scale_factor = scale
        self.shift_factor = shift
        self.latent_rgb_factors = [[1.0 / scale if row == col else 0.0 for col in range(3)] for row in range(3)]
        self.latent_rgb_factors_bias = [shift] * 3

    def process_in(self, latent):
        return (latent - self.shift_factor) * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor + self.shift_factor


class DigitsConfig(comfy.supported_models_base.BASE):
    """Model config: the tiny UNet over RGB pixel latents, float32 weights."""

    unet_config: ClassVar[dict] = {}
    unet_extra_config: ClassVar[dict] = dict(UNET_EXTRA_CONFIG)
    latent_format = DigitsLatentFormat
    supported_inference_dtypes: ClassVar[list] = [torch.float32]
    memory_usage_factor = 0.05


class DigitsModel(comfy.model_base.BaseModel):
    """``BaseModel`` whose conditioning also accepts a zero context of another width (a CLIP-less empty
    conditioning, e.g. ConditioningZeroOut of another model's prompt): it means "any digit"."""

    def extra_conds(self, **kwargs):
        cross_attn = kwargs.get("cross_attn", None)
        if torch.is_tensor(cross_attn) and cross_attn.shape[-1] != CONTEXT_DIM:
            if torch.count_nonzero(cross_attn) != 0:
                raise ValueError(
                    f"the digits model takes the conditioning of 'Digits Prompt (nested demo)' ({CONTEXT_DIM}-wide "
                    f"tokens), got {cross_attn.shape[-1]}-wide tokens (a text encoder's?)"
                )
            kwargs["cross_attn"] = torch.zeros(cross_attn.shape[0], 1, CONTEXT_DIM, dtype=cross_attn.dtype)
        return super().extra_conds(**kwargs)


def _initialising(ops):
    """``ops`` with PyTorch's default initialisation back (ComfyUI's ops skip it: a checkpoint overwrites them)."""

    class Ops(ops):
        class Linear(ops.Linear):
            reset_parameters = torch.nn.Linear.reset_parameters

        class Conv2d(ops.Conv2d):
            reset_parameters = torch.nn.Conv2d.reset_parameters

        class GroupNorm(ops.GroupNorm):
            reset_parameters = torch.nn.GroupNorm.reset_parameters

        class LayerNorm(ops.LayerNorm):
            reset_parameters = torch.nn.LayerNorm.reset_parameters

    return Ops


def default_config(variant: str) -> dict:
    """The settings a model is built from (and stored with its weights)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return {
        "variant": variant,
        "latent_scale": DEFAULT_LATENT_SCALE,
        "latent_shift": DEFAULT_LATENT_SHIFT,
        "shift": DEFAULT_SHIFT if variant == "flow" else None,
        "unet_config": dict(UNET_CONFIG),
        "unet_extra_config": dict(UNET_EXTRA_CONFIG),
    }


def build_base_model(config: dict, initialise: bool = False) -> DigitsModel:
    """The ``BaseModel`` of ``config`` (see ``default_config``). ``initialise``: fresh PyTorch-initialised
    weights for training; otherwise the weights are left for ``load_state_dict``, as ComfyUI does."""
    variant = config["variant"]
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    model_config = DigitsConfig(dict(config["unet_config"]))
    for key, value in config.get("unet_extra_config", UNET_EXTRA_CONFIG).items():
        model_config.unet_config[key] = value
    model_config.set_inference_dtype(torch.float32, None)
    model_config.latent_format = DigitsLatentFormat(float(config["latent_scale"]), float(config.get("latent_shift", 0.0)))
    if variant == "flow":
        model_config.sampling_settings = {"shift": float(config["shift"]), "multiplier": 1000}
    if initialise:
        model_config.custom_operations = _initialising(comfy.ops.disable_weight_init)
    return DigitsModel(model_config, model_type=_MODEL_TYPES[variant], device=comfy.model_management.unet_offload_device())


def read_weights(path: Path | str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, diffusion-model state dict) of a weights file written by ``save_weights``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise ValueError(f"{path} is not a digits model file (no 'config' in its metadata)")
    return json.loads(metadata["config"]), load_file(str(path))


def save_weights(path: Path | str, config: dict, state_dict: dict[str, torch.Tensor], info: dict | None = None) -> None:
    """Write the weights as float16 (half the size; the model computes in float32 after loading), with ``config``
    (what ``build_base_model`` needs) and ``info`` (how it was trained) as JSON metadata."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(config), "kind": "digits_diffusion", "dtype": "float16"}
    if info:
        metadata["training"] = json.dumps(info)
    save_file({key: value.detach().to(torch.float16).contiguous() for key, value in state_dict.items()}, str(path),
              metadata=metadata)


def load_digits_model(variant: str = "eps", path: Path | str | None = None) -> comfy.model_patcher.ModelPatcher:
    """A ComfyUI MODEL (``ModelPatcher``) of a shipped (or given) weights file."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    path = Path(path) if path is not None else weights_path(variant)
    if not path.exists():
        raise FileNotFoundError(f"no digits weights at {path}: train them with scripts/train_digits.py --variant {variant}")
    config, state_dict = read_weights(path)
    if config.get("variant") != variant:
        raise ValueError(f"{path} holds the {config.get('variant')!r} variant, not {variant!r}")
    model = build_base_model(config)
    model.diffusion_model.load_state_dict(state_dict, strict=True)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=comfy.model_management.get_torch_device(), offload_device=comfy.model_management.unet_offload_device()
    )


def sample_sigmas(model: DigitsModel, batch: int, generator: torch.Generator) -> torch.Tensor:
    """Training noise levels in ComfyUI's sigma space: eps and v, a uniform discrete timestep's sigma; flow,
    t ~ U(0, 1]."""
    sampling = model.model_sampling
    if isinstance(sampling, comfy.model_sampling.CONST):
        t = 1.0 - torch.rand(batch, generator=generator)  # (0, 1]
        return sampling.sigma(t * sampling.multiplier).float()
    steps = torch.randint(0, sampling.sigmas.shape[0], (batch,), generator=generator)
    return sampling.sigmas[steps].float()


def loss_weights(model: DigitsModel, sigma: torch.Tensor) -> torch.Tensor:
    """Optional per-sample weights of the eps loss (``train_digits.py --weighting snr+1``; off by default):
    ``1 + sigma^2``, the v-prediction objective's weighting written for an eps model, normalised to mean 1 over
    the discrete schedule. It stresses the high-noise steps, where an eps error is multiplied by sigma (up to
    14.6) in the denoised image. Flow and v (whose loss carries that weighting already): all ones."""
    sampling = model.model_sampling
    if isinstance(sampling, (comfy.model_sampling.CONST, comfy.model_sampling.V_PREDICTION)):
        return torch.ones_like(sigma)
    return (1.0 + sigma**2) / (1.0 + sampling.sigmas.float() ** 2).mean()


def v_coefficients(model: DigitsModel, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of ComfyUI's v-prediction, ``denoised = c_skip x - c_out v`` for ``x = x0 + sigma eps``:
    ``c_skip = s_d^2 / (sigma^2 + s_d^2)``, ``c_out = sigma s_d / sqrt(sigma^2 + s_d^2)`` (``s_d``: sigma_data, 1)."""
    sigma_data = float(model.model_sampling.sigma_data)
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / total.sqrt()


def training_loss(model: DigitsModel, x0: torch.Tensor, context: torch.Tensor, generator: torch.Generator,
                  weighted: bool = False) -> torch.Tensor:
    """Mean squared error of the network's raw output against its target, for clean latents ``x0``
    (``model.latent_format.process_in`` of pixels). eps: ``x = x0 + sigma eps``, target eps, weighted by
    ``loss_weights`` when ``weighted``; v: the same ``x``, target ``v = (c_skip x - x0) / c_out``
    (``v_coefficients``), i.e. ``(eps - sigma x0) / sqrt(sigma^2 + 1)``, SD2's ``alpha eps - sigma_t x0``; flow:
    ``x = (1 - sigma) x0 + sigma eps``, target ``eps - x0``. The raw output is recovered from ComfyUI's denoised
    estimate (``denoised = x - out * sigma`` for eps and flow, ``c_skip x - c_out out`` for v), so input scaling and
    timesteps are ComfyUI's own."""
    sampling = model.model_sampling
    sigma = sample_sigmas(model, x0.shape[0], generator)
    noise = torch.randn(x0.shape, generator=generator)
    s = sigma.reshape(-1, 1, 1, 1)
    if isinstance(sampling, comfy.model_sampling.CONST):
        x = (1.0 - s) * x0 + s * noise
        target = noise - x0
    else:
        x = x0 + s * noise
        target = noise
    denoised = model.apply_model(x, sigma, c_crossattn=context)
    if isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        c_skip, c_out = v_coefficients(model, s)
        target = (c_skip * x - x0) / c_out
        output = (c_skip * x - denoised) / c_out
    else:
        output = (x - denoised) / s
    per_sample = (output.float() - target).pow(2).mean(dim=(1, 2, 3))
    weights = loss_weights(model, sigma) if weighted else torch.ones_like(sigma)
    return (weights * per_sample).mean()
