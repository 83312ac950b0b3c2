"""Linear measurement operators for inverse problems, with closed-form pseudo-inverses (pure torch, no SVD).

Every operator ``H`` here maps images ``x`` ``[B, C, H, W]`` to measurements ``y`` and has rows that are orthogonal
with one common squared norm ``c`` (``H H^T = c I``): average pooling by an integer factor (super-resolution,
``c = 1 / f^2``), pixel selection (inpainting, ``c = 1``), channel mean (colorization, ``c = 1 / C``) and the
identity (denoising, ``c = 1``). So ``H^+ = H^T / c``, every non-zero singular value equals ``sqrt(c)``, and
``x + H^+ (y - H x)`` is the orthogonal projection of ``x`` onto ``{x : H x = y}`` (null-space projection, as in
DDNM). Each row also sums to 1, so ``H`` commutes with the affine map between [0, 1] images and [-1, 1] pixels.

``measurement_guided`` is the step a sampler applies to the model's denoised estimate ``x0_hat`` at noise level
``sigma`` (variance-exploding units, in pixel units): ``x0_hat + w H^+ (y - H x0_hat)`` with
``w = sigma^2 / (sigma^2 + sigma_y^2 / c)``: the weight of two independent estimates of the measured component,
the measurement's (noise ``sigma_y / sqrt(c)`` per component) against the noisy sample's (noise ``sigma``). With
``sigma_y = 0`` the weight is 1 and the estimate is consistent exactly; with noisy measurements the late, nearly
clean estimates are no longer forced onto the noise (DDNM+/DDRM-style noise awareness).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NestedDiffusionError

TASKS = ("super_resolution", "inpainting", "colorization", "denoising")
MAX_FACTOR = 16


@dataclass(frozen=True)
class Measurement:
    """One linear operator ``H`` on images ``[B, C, H, W]``.

    ``task``: one of ``TASKS``; ``factor``: the pooling factor (super-resolution); ``known``: ``[B or 1, 1, H, W]``
    with 1 where a pixel is measured (inpainting).
    """

    task: str
    factor: int = 1
    known: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise NestedDiffusionError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "super_resolution" and not (isinstance(self.factor, int) and 1 <= self.factor <= MAX_FACTOR):
            raise NestedDiffusionError(f"factor must be an integer from 1 to {MAX_FACTOR}, got {self.factor!r}")
        if self.task == "inpainting" and self.known is None:
            raise NestedDiffusionError("inpainting needs a mask (1 = the pixels to fill in, 0 = the measured ones)")

    @property
    def row_norm2(self) -> float:
        """``c`` in ``H H^T = c I``: the squared non-zero singular value."""
        if self.task == "super_resolution":
            return 1.0 / self.factor**2
        return 1.0 / 3.0 if self.task == "colorization" else 1.0

    def measured_shape(self, image_shape: tuple) -> tuple:
        batch, channels, height, width = image_shape
        if self.task == "super_resolution":
            return (batch, channels, height // self.factor, width // self.factor)
        if self.task == "colorization":
            return (batch, 1, height, width)
        return (batch, channels, height, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``H x``. Inpainting keeps the image's shape and zeroes what is not measured."""
        if self.task == "super_resolution":
            return torch.nn.functional.avg_pool2d(x, self.factor) if self.factor > 1 else x
        if self.task == "colorization":
            return x.mean(dim=1, keepdim=True)
        if self.task == "inpainting":
            return x * self.known.to(x)
        return x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``H^T y``."""
        if self.task == "super_resolution":
            if self.factor == 1:
                return y
            return torch.nn.functional.interpolate(y, scale_factor=self.factor, mode="nearest") / self.factor**2
        if self.task == "colorization":
            return y.expand(-1, 3, -1, -1) / 3.0
        if self.task == "inpainting":
            return y * self.known.to(y)
        return y

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """``H^+ y = H^T y / c``: nearest upsampling, the gray value in every channel, the measured pixels."""
        return self.adjoint(y) / self.row_norm2

    def residual(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y - self.forward(x)

    def project(self, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``x + weight H^+ (y - H x)``; weight 1: the closest ``x`` (Euclidean) with ``H x = y``."""
        weight = weight.reshape(-1, 1, 1, 1).to(x) if torch.is_tensor(weight) else weight
        return x + weight * self.pinv(self.residual(x, y))

    def relative_error(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``||H x - y|| / ||y||`` per batch item (float64)."""
        diff = self.residual(x.double(), y.double()).flatten(1).norm(dim=1)
        target = self.forward(self.pinv(y.double())).flatten(1).norm(dim=1)
        return diff / target.clamp_min(1e-12)


def measurement_weight(sigma: torch.Tensor, sigma_y: float, row_norm2: float) -> torch.Tensor:
    """How far the denoised estimate moves onto the measurement at noise ``sigma`` (pixel units, VE form).

    1 for noise-free measurements; otherwise the weight of the measurement in the best linear combination of two
    independent estimates of the measured component: ``sigma^2 / (sigma^2 + sigma_y^2 / c)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    if sigma_y <= 0:
        return torch.ones_like(sigma)
    noise2 = sigma_y**2 / row_norm2
    return sigma**2 / (sigma**2 + noise2)


def measurement_guided(x0_hat: torch.Tensor, y: torch.Tensor, operator: Measurement, sigma: torch.Tensor,
                       sigma_y: float = 0.0) -> torch.Tensor:
    """The denoised estimate moved onto the measurement (see the module docstring); ``sigma`` per batch item."""
    weight = measurement_weight(sigma, sigma_y, operator.row_norm2)
    return operator.project(x0_hat, y, weight.reshape(-1) if weight.numel() > 1 else float(weight))


def degrade(x: torch.Tensor, operator: Measurement, sigma_y: float = 0.0, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """``y = H x + sigma_y n`` (to make test measurements from a ground truth)."""
    y = operator.forward(x)
    if sigma_y > 0:
        y = y + sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        if operator.known is not None:
            y = operator.forward(y)
    return y


def check_sigma_y(sigma_y: float) -> float:
    import math

    if isinstance(sigma_y, bool) or not isinstance(sigma_y, (int, float)) or not math.isfinite(sigma_y) or sigma_y < 0:
        raise NestedDiffusionError(f"sigma_y must be a number >= 0 (the measurement noise std; 0 = noise-free), got {sigma_y!r}")
    return float(sigma_y)


def check_sizes(operator: Measurement, image_size: tuple[int, int], latent_size: tuple[int, int],
                downscale: int = 1) -> None:
    """The measured image's height and width against the latent's: pixel-space latents are the image being solved
    for (``downscale`` 1); through a VAE the solution is the latent's size times the VAE's ``downscale``."""
    (image_h, image_w), (cells_h, cells_w) = image_size, latent_size
    latent_h, latent_w = cells_h * downscale, cells_w * downscale
    latent = f"{latent_w}x{latent_h}" if downscale == 1 else \
        f"{cells_w}x{cells_h} ({latent_w}x{latent_h} pixels through the VAE, x{downscale})"
    if operator.task == "super_resolution":
        if latent_h % operator.factor or latent_w % operator.factor:
            raise NestedDiffusionError(
                f"factor {operator.factor} does not divide the latent size {latent}: use a factor that "
                f"divides both, or a latent whose size is a multiple of {operator.factor}")
        expected = (latent_h // operator.factor, latent_w // operator.factor)
        if (image_h, image_w) != expected:
            rule = "latent size" if downscale == 1 else "latent size x the VAE's downscale"
            raise NestedDiffusionError(
                f"image is {image_w}x{image_h}, but a {latent} latent at factor {operator.factor} needs "
                f"a {expected[1]}x{expected[0]} image ({rule} = image size x factor)")
    elif (image_h, image_w) != (latent_h, latent_w):
        raise NestedDiffusionError(
            f"image is {image_w}x{image_h}, but the latent is {latent}: for {operator.task} they must be "
            "the same size")
    if operator.known is not None and tuple(operator.known.shape[-2:]) != (latent_h, latent_w):
        mask_h, mask_w = operator.known.shape[-2:]
        raise NestedDiffusionError(f"mask is {mask_w}x{mask_h}, but the latent is {latent}: they must "
                                   "be the same size")


def match_batch(y: torch.Tensor, batch: int, name: str = "image") -> torch.Tensor:
    """``y`` for a latent batch: one measurement for every latent, or one per latent."""
    if y.shape[0] == batch:
        return y
    if y.shape[0] == 1:
        return y.expand(batch, *y.shape[1:])
    raise NestedDiffusionError(f"{name} batch is {y.shape[0]}, but the latent batch is {batch}: give one {name} "
                               "for all latents or one per latent")
