"""Inverse problems as a MODEL patch: super-resolution, inpainting, colorization and denoising.

``NestedInverseProblem`` adds a ``sampler_post_cfg_function`` (ComfyUI's public hook on the guided denoised
estimate, ``ModelPatcher.set_model_sampler_post_cfg_function``) that moves every denoised estimate onto the
measurement: ``x0 + w H^+ (y - H x0)`` (``nested_core.measurements``). Every sampler node takes the patched MODEL:
KSampler is then the plain measurement-guided solver (a DDNM-style null-space projection; with ``sigma_y > 0`` a
noise-aware weighting), and NestedKSampler / NestedSampler its anytime version at the same model calls, since each
inner diffusion is such a solver.

The measurement lives in pixel space. On pixel-space models (ComfyUI's ChromaRadiance latent format, this pack's
exemplar and digits models) the projection is exact. Latent models (SD1.5, SDXL, SD3, Flux) need their VAE on the
optional ``vae`` input: the denoised latent is decoded, projected and encoded again at every model call, an
approximation (``encode(decode(z))`` is not ``z`` and a VAE is not linear), so the result is only as consistent as
the VAE reconstructs the projected image; without a VAE they are refused. ``NestedDegradeImage`` makes a test
measurement from a ground-truth image.
"""
from __future__ import annotations

import comfy.latent_formats
import comfy.model_sampling
import torch
from comfy_api.latest import io

from ..nested_core import NestedDiffusionError
from ..nested_core.measurements import (
    MAX_FACTOR,
    TASKS,
    Measurement,
    check_sigma_y,
    check_sizes,
    degrade,
    match_batch,
    measurement_guided,
)

TASK_TOOLTIP = ("super_resolution: the image is the low-resolution measurement (average pooling by factor). "
                "inpainting: the image with the mask's white part unknown. colorization: the image's channel mean is "
                "the measurement. denoising: the image itself, with noise of std sigma_y.")
SIGMA_Y_TOOLTIP = ("Std of the measurement noise in image units (0..1). 0: noise-free, and every denoised estimate "
                   "is made to agree with the measurement exactly.")


def pixel_space_formats() -> tuple[type, ...]:
    """Latent formats whose latents are RGB pixels up to a per-pixel affine map: the measurement is exact there."""
    from ..demo_models.digits.model import DigitsLatentFormat
    from ..demo_models.exemplar.nodes import ExemplarLatentFormat

    formats = [ExemplarLatentFormat, DigitsLatentFormat]
    radiance = getattr(comfy.latent_formats, "ChromaRadiance", None)
    if radiance is not None:
        formats.append(radiance)
    return tuple(formats)


def is_pixel_space(model) -> bool:
    latent_format = model.get_model_object("latent_format")
    return isinstance(latent_format, pixel_space_formats()) and latent_format.latent_channels == 3


def check_pixel_space(model) -> None:
    if is_pixel_space(model):
        return
    latent_format = model.get_model_object("latent_format")
    raise NestedDiffusionError(
        f"model: the inverse-problem node needs a pixel-space model (ChromaRadiance, or this pack's exemplar and "
        f"digits models), but this model diffuses {type(latent_format).__name__} latents. The measurement (low "
        "resolution, mask, gray, noise) is defined on pixels, and a VAE latent is not a linear function of them, so "
        "the result would not match the measurement. To work through the model's VAE instead (decode, project, "
        "encode at every step: approximately consistent), connect it to the vae input.")


def vae_for(model, vae):
    """The VAE the patch works through: None for pixel-space models (the exact projection on pixels; a connected
    VAE, such as ComfyUI's pixel_space one, is not needed and ignored), the VAE for latent models (refused without
    one, or with one that does not fit the model)."""
    if is_pixel_space(model):
        return None
    if vae is None:
        check_pixel_space(model)
    latent_format = model.get_model_object("latent_format")
    if getattr(vae, "first_stage_model", None) is None:
        raise NestedDiffusionError("vae: this VAE has no weights (its file was not recognised): connect the VAE "
                                   "that belongs to the model")
    if getattr(vae, "latent_dim", 2) != 2 or getattr(latent_format, "latent_dimensions", 2) != 2:
        raise NestedDiffusionError("vae: the inverse-problem node works through image VAEs (2-D latents); video and "
                                   "audio VAEs and models are not supported")
    if vae.latent_channels != latent_format.latent_channels:
        raise NestedDiffusionError(
            f"vae: its latents have {vae.latent_channels} channels, but the model's ({type(latent_format).__name__}) "
            f"have {latent_format.latent_channels}: connect the VAE that belongs to the model")
    if vae.spacial_compression_encode() != vae.spacial_compression_decode():
        raise NestedDiffusionError("vae: its encoder and decoder scale the image differently "
                                   f"({vae.spacial_compression_encode()} vs {vae.spacial_compression_decode()})")
    return vae


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` in [0, 1] -> ``[B, 3, H, W]`` in [-1, 1] (what the pixel_space VAE does)."""
    rgb = image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)
    return rgb.movedim(-1, 1).to(torch.float32) * 2.0 - 1.0


def pixels_to_image(pixels: torch.Tensor) -> torch.Tensor:
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return ((pixels + 1.0) / 2.0).movedim(1, -1).contiguous()


def known_from_mask(mask: torch.Tensor | None, image: torch.Tensor) -> torch.Tensor:
    """ComfyUI MASK (1 = fill in) -> ``[B or 1, 1, H, W]`` with 1 where the image is measured."""
    if mask is None:
        raise NestedDiffusionError("mask: inpainting needs a mask (white = the part to fill in)")
    mask = mask.reshape(1, *mask.shape) if mask.ndim == 2 else mask
    if mask.ndim != 3:
        raise NestedDiffusionError(f"mask must be [batch, height, width], got shape {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) != tuple(image.shape[1:3]):
        raise NestedDiffusionError(f"mask is {mask.shape[-1]}x{mask.shape[-2]}, but the image is "
                                   f"{image.shape[2]}x{image.shape[1]}: they must be the same size")
    if mask.shape[0] not in (1, image.shape[0]):
        raise NestedDiffusionError(f"mask batch is {mask.shape[0]}, but the image batch is {image.shape[0]}: give one "
                                   "mask for all images or one per image")
    return (mask < 0.5).to(torch.float32).unsqueeze(1)


def measurement_operator(task: str, factor: int, mask: torch.Tensor | None, image: torch.Tensor) -> Measurement:
    if task not in TASKS:
        raise NestedDiffusionError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    known = known_from_mask(mask, image) if task == "inpainting" else None
    return Measurement(task, factor=int(factor) if task == "super_resolution" else 1, known=known)


class MeasurementPatch:
    """The post-CFG function: the guided denoised estimate, moved onto the measurement in pixel space.

    ``measured``: ``H`` applied to the measured image, in [-1, 1] pixels; ``sigma_y`` in the same units. The model's
    latent format and model sampling are read at every call, so later patches of them (ModelSampling nodes) apply.
    With a ``vae`` (latent models) the estimate is decoded to pixels, projected and encoded back.
    """

    def __init__(self, operator: Measurement, measured: torch.Tensor, sigma_y: float, image_size: tuple[int, int],
                 vae=None):
        self.operator = operator
        self.measured = measured
        self.sigma_y = sigma_y
        self.image_size = image_size
        self.vae = vae

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        base_model = args["model"]
        if denoised.ndim != 4:
            raise NestedDiffusionError(f"the inverse-problem node works on image latents [batch, channels, height, "
                                       f"width], got shape {tuple(denoised.shape)}")
        batch, _, height, width = denoised.shape
        downscale = 1 if self.vae is None else self.vae.spacial_compression_encode()
        check_sizes(self.operator, self.image_size, (height, width), downscale)
        if batch == 1 and self.measured.shape[0] > 1:
            raise NestedDiffusionError(
                f"image batch is {self.measured.shape[0]}, but the latent batch is 1 (after a pick, a nested sampler "
                "denoises only the kept item, and which measurement belongs to it is not known here): give one "
                "image for all latents to pick during an inverse problem")
        latent_format = base_model.latent_format
        if self.vae is None:
            pixels = latent_format.process_out(denoised.to(torch.float32))
            sigma = pixel_noise_level(args["sigma"], batch, base_model.model_sampling, latent_format)
        else:
            with torch.no_grad():  # a VAE's weights may require grad: no graph across model calls
                pixels = image_to_pixels(self.vae.decode(latent_format.process_out(denoised)))
            sigma = ve_noise_level(args["sigma"], batch, base_model.model_sampling)
        y = match_batch(self.measured, batch).to(device=pixels.device, dtype=torch.float32)
        operator = self.operator
        if operator.known is not None:
            operator = Measurement(operator.task, known=match_batch(operator.known, batch, "mask").to(pixels.device))
        guided = measurement_guided(pixels, y, operator, sigma.to(pixels.device), self.sigma_y)
        if self.vae is None:
            return latent_format.process_in(guided).to(denoised.dtype)
        with torch.no_grad():
            encoded = self.vae.encode(pixels_to_image(guided))
        return latent_format.process_in(encoded.to(device=denoised.device, dtype=torch.float32)).to(denoised.dtype)


def ve_noise_level(sigma: torch.Tensor, batch: int, model_sampling) -> torch.Tensor:
    """The sampler's sigma in ``x = x0 + s n`` form, per batch item: flow models' ``x = (1 - sigma) x0 + sigma n``
    is ``x0 + sigma / (1 - sigma) n`` after scaling.

    Through a VAE this is also the pixel noise level the measurement's weight uses (``sigma_y > 0`` only): model
    latents have about unit scale, as [-1, 1] pixels do, so it is the right order, not an exact conversion."""
    sigma = sigma.reshape(-1).to(torch.float64)
    sigma = sigma.expand(batch) if sigma.numel() == 1 else sigma
    if isinstance(model_sampling, comfy.model_sampling.CONST):
        sigma = sigma / (1.0 - sigma).clamp_min(1e-6)
    return sigma


def pixel_noise_level(sigma: torch.Tensor, batch: int, model_sampling, latent_format) -> torch.Tensor:
    """The sampler's sigma as the noise std on pixels of a pixel-space model: ``ve_noise_level`` divided by the
    latent format's slope (pixels -> latents)."""
    sigma = ve_noise_level(sigma, batch, model_sampling)
    probe = torch.zeros(1, 3, 1, 1)
    slope = (latent_format.process_in(probe + 1.0) - latent_format.process_in(probe)).abs().mean().item()
    return sigma / slope


def measurement_from_image(operator: Measurement, pixels: torch.Tensor) -> torch.Tensor:
    """``y`` from the measured image: the low-resolution image itself, or ``H`` applied to the full-size image
    (its channel mean, its measured pixels)."""
    return pixels if operator.task == "super_resolution" else operator.forward(pixels)


def empty_latent_for(operator: Measurement, image: torch.Tensor, vae=None, model=None) -> dict:
    """Zeros of the solution's size, one per measured image: pixels, or the VAE's latent cells."""
    factor = operator.factor if operator.task == "super_resolution" else 1
    batch, height, width = image.shape[:3]
    height, width = height * factor, width * factor
    if vae is None:
        return {"samples": torch.zeros(batch, 3, height, width)}
    downscale = vae.spacial_compression_encode()
    if height % downscale or width % downscale:
        raise NestedDiffusionError(
            f"image: the solution is {width}x{height} pixels (the image's size x factor), which the VAE (downscale "
            f"{downscale}) cannot encode: use an image whose solution size is a multiple of {downscale}")
    channels = model.get_model_object("latent_format").latent_channels
    return {"samples": torch.zeros(batch, channels, height // downscale, width // downscale)}


class NestedInverseProblem(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedInverseProblem",
            display_name="Inverse Problem: Super-Resolution / Inpaint / Colorize / Denoise",
            category="sampling/nested/inverse problems",
            description="Makes a MODEL solve an inverse problem: every denoised estimate is moved onto "
                        "the measured image (a null-space projection; noise-aware when sigma_y > 0). Exact on "
                        "pixel-space models; latent models work through the connected VAE (decode, project, encode: "
                        "approximately consistent, and slower). Use it with "
                        "KSampler (the plain solver) or NestedKSampler / NestedSampler (the anytime solver: a "
                        "measurement-consistent image after every outer step, at the same model calls). Connect "
                        "the LATENT output as the sampler's latent_image.",
            inputs=[
                io.Model.Input("model", tooltip="A pixel-space model (ChromaRadiance, the pack's exemplar and "
                                                "digits models), or a latent model with its VAE connected."),
                io.Image.Input("image", tooltip="The measurement: the low-resolution, masked, gray or noisy image."),
                io.Combo.Input("task", options=list(TASKS), default="super_resolution", tooltip=TASK_TOOLTIP),
                io.Int.Input("factor", default=2, min=1, max=MAX_FACTOR,
                             tooltip="super_resolution only: the output is this many times the image's size."),
                io.Float.Input("sigma_y", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
                io.Mask.Input("mask", optional=True,
                              tooltip="inpainting only: white (1) = the part to fill in, black = measured pixels."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Latent models (SD1.5, SDXL, Flux): their VAE. Every denoised estimate is "
                                     "decoded, projected and encoded again: approximately consistent, at the cost of "
                                     "a decode and an encode per model call. Ignored for pixel-space models, whose "
                                     "projection is exact without it."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL"),
                io.Latent.Output(display_name="LATENT",
                                 tooltip="An empty latent of the solution's size, one per measured image."),
                io.Image.Output(display_name="least_squares",
                                tooltip="H+ y: the measurement shown at the solution's size (nearest upsampling, "
                                        "gray, unknown pixels mid-gray)."),
            ],
        )

    @classmethod
    def execute(cls, model, image, task: str, factor: int, sigma_y: float, mask=None, vae=None) -> io.NodeOutput:
        sigma_y = check_sigma_y(sigma_y)
        vae = vae_for(model, vae)
        operator = measurement_operator(task, factor, mask, image)
        pixels = image_to_pixels(image)
        solution_size = tuple(s * operator.factor for s in pixels.shape[-2:])
        check_sizes(operator, tuple(pixels.shape[-2:]), solution_size)
        measured = measurement_from_image(operator, pixels)
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(
            MeasurementPatch(operator, measured, 2.0 * sigma_y, tuple(pixels.shape[-2:]), vae))
        least_squares = operator.pinv(measured)
        return io.NodeOutput(patched, empty_latent_for(operator, image, vae, model), pixels_to_image(least_squares))


class NestedDegradeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedDegradeImage",
            display_name="Degrade Image (inverse problem test)",
            category="sampling/nested/inverse problems",
            description="Makes a test measurement from a ground-truth image, as Inverse Problem expects it: average "
                        "pooling by factor, the masked part blanked, the channel mean, plus Gaussian noise of std "
                        "sigma_y (not clipped, so values may leave 0..1).",
            inputs=[
                io.Image.Input("image", tooltip="The ground truth."),
                io.Combo.Input("task", options=list(TASKS), default="super_resolution", tooltip=TASK_TOOLTIP),
                io.Int.Input("factor", default=2, min=1, max=MAX_FACTOR, tooltip="super_resolution only."),
                io.Float.Input("sigma_y", default=0.0, min=0.0, max=1.0, step=0.001, tooltip=SIGMA_Y_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The noise's seed."),
                io.Mask.Input("mask", optional=True, tooltip="inpainting only: white (1) = the part to blank."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, image, task: str, factor: int, sigma_y: float, seed: int, mask=None) -> io.NodeOutput:
        sigma_y = check_sigma_y(sigma_y)
        operator = measurement_operator(task, factor, mask, image)
        pixels = image_to_pixels(image)
        height, width = pixels.shape[-2:]
        if task == "super_resolution" and (height % operator.factor or width % operator.factor):
            raise NestedDiffusionError(f"factor {operator.factor} does not divide the image size {width}x{height}")
        if operator.known is not None:
            operator = Measurement(task, known=match_batch(operator.known, pixels.shape[0], "mask"))
        generator = torch.Generator().manual_seed(int(seed) % (1 << 63))
        measured = degrade(pixels, operator, 2.0 * sigma_y, generator)
        return io.NodeOutput(pixels_to_image(measured))
