"""Exemplar mixture: a data distribution whose exact denoiser has a closed form.

The data are a uniform mixture of isotropic Gaussians (std ``spread``) around K exemplar images.
For a noisy ``x = alpha * x0 + sigma * eps`` the posterior mean ``E[x0 | x]`` is a softmax-weighted
shrinkage towards each exemplar, so a model built on it is a perfect denoiser: ground truth for
how far any image is from the data manifold, and which exemplar it landed on.

Images are pixel-space tensors ``[B, 3, H, W]`` in ``[-1, 1]`` (ComfyUI's ``pixel_space`` VAE shows
them as ``(x + 1) / 2``). Pure torch; no ComfyUI imports.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Optional

import torch

SigmaLike = torch.Tensor | float

# Colours in [0, 1]; converted to [-1, 1] at the end.
_NAVY = (0.05, 0.05, 0.30)
_RED = (0.95, 0.10, 0.10)
_YELLOW = (1.00, 0.90, 0.10)
_BLUE = (0.10, 0.25, 0.95)
_WHITE = (0.95, 0.95, 0.95)
_GREEN = (0.10, 0.80, 0.20)
_PURPLE = (0.45, 0.10, 0.55)
_CYAN = (0.10, 0.90, 0.90)
_MAROON = (0.45, 0.05, 0.05)
_ORANGE = (1.00, 0.55, 0.05)
_TEAL = (0.00, 0.35, 0.40)
_BLACK = (0.02, 0.02, 0.02)
_PINK = (1.00, 0.50, 0.80)
_SKY = (0.40, 0.70, 1.00)

Mask = torch.Tensor
Shape = Callable[[torch.Tensor, torch.Tensor], Mask]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (u right, v down), both in (-1, 1), shape [size, size]."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2.0 - 1.0
    v, u = torch.meshgrid(c, c, indexing="ij")
    return u, v


def _paint(size: int, background: tuple, layers: list[tuple[Shape, tuple]]) -> torch.Tensor:
    """A [3, size, size] image in [0, 1]: a background with masked colour layers on top."""
    u, v = _grid(size)
    image = torch.tensor(background, dtype=torch.float64)[:, None, None].expand(3, size, size).clone()
    for shape, colour in layers:
        mask = shape(u, v)
        image = torch.where(mask, torch.tensor(colour, dtype=torch.float64)[:, None, None], image)
    return image


def _disc(r: float) -> Shape:
    return lambda u, v: u**2 + v**2 <= r**2


def _ring(r_in: float, r_out: float) -> Shape:
    return lambda u, v: ((u**2 + v**2) <= r_out**2) & ((u**2 + v**2) >= r_in**2)


def _box(half: float) -> Shape:
    return lambda u, v: (u.abs() <= half) & (v.abs() <= half)


def _triangle() -> Shape:
    # Apex at the top, base at the bottom: |u| grows linearly going down.
    return lambda u, v: (v >= -0.7) & (v <= 0.7) & (u.abs() <= (v + 0.7) * 0.6)


def _plus(half_width: float, reach: float) -> Shape:
    return lambda u, v: ((u.abs() <= half_width) & (v.abs() <= reach)) | (
        (v.abs() <= half_width) & (u.abs() <= reach)
    )


def _x_glyph(half_width: float, reach: float) -> Shape:
    return lambda u, v: (((u - v).abs() <= half_width * math.sqrt(2)) | ((u + v).abs() <= half_width * math.sqrt(2))) & (
        (u.abs() <= reach) & (v.abs() <= reach)
    )


def _stripes(period: float) -> Shape:
    return lambda u, v: torch.remainder((u + v) / period, 1.0) < 0.5


def _checker(cells: int) -> Shape:
    def shape(u: torch.Tensor, v: torch.Tensor) -> Mask:
        iu = torch.floor((u + 1.0) / 2.0 * cells).long()
        iv = torch.floor((v + 1.0) / 2.0 * cells).long()
        return (iu + iv) % 2 == 0

    return shape


def _smile() -> Shape:
    # Lower arc of a circle: the mouth of the smiley.
    return lambda u, v: ((u**2 + v**2) <= 0.45**2) & ((u**2 + v**2) >= 0.30**2) & (v >= 0.1)


def _offset(shape: Shape, du: float, dv: float) -> Shape:
    return lambda u, v: shape(u - du, v - dv)


EXEMPLAR_NAMES: tuple[str, ...] = (
    "red disc",
    "blue square",
    "green triangle",
    "yellow cross",
    "cyan ring",
    "orange stripes",
    "checker",
    "smiley",
)


def default_exemplars(size: int = 32) -> torch.Tensor:
    """Eight distinct, colourful synthetic images ``[8, 3, size, size]`` in ``[-1, 1]``.

    Deterministic; names in :data:`EXEMPLAR_NAMES`. Works for any ``size >= 8``.
    """
    if size < 8:
        raise ValueError(f"default_exemplars needs size >= 8, got {size}")
    images = [
        _paint(size, _NAVY, [(_disc(0.6), _RED)]),
        _paint(size, _YELLOW, [(_box(0.55), _BLUE)]),
        _paint(size, _WHITE, [(_triangle(), _GREEN)]),
        _paint(size, _PURPLE, [(_plus(0.18, 0.75), _YELLOW)]),
        _paint(size, _MAROON, [(_ring(0.4, 0.75), _CYAN)]),
        _paint(size, _TEAL, [(_stripes(0.5), _ORANGE)]),
        _paint(size, _BLACK, [(_checker(4), _WHITE)]),
        _paint(
            size,
            _SKY,
            [
                (_disc(0.8), _YELLOW),
                (_offset(_disc(0.12), -0.3, -0.25), _BLACK),
                (_offset(_disc(0.12), 0.3, -0.25), _BLACK),
                (_smile(), _PINK),
            ],
        ),
    ]
    return (torch.stack(images) * 2.0 - 1.0).float()


def _check_shapes(x: torch.Tensor, exemplars: torch.Tensor) -> None:
    if x.ndim != 4 or exemplars.ndim != 4 or x.shape[1:] != exemplars.shape[1:]:
        raise ValueError(
            f"image shape {tuple(x.shape)} does not match exemplar shape {tuple(exemplars.shape)}: "
            "both must be [N, C, H, W] with the same C, H, W (make the latent the exemplars' size)"
        )


def _per_item(value: SigmaLike, batch: int, device: torch.device, name: str) -> torch.Tensor:
    """A scalar or [B] (or [B, 1, 1, 1]) value as a float64 [B] tensor."""
    t = torch.as_tensor(value, dtype=torch.float64, device=device).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} values for a batch of {batch}")
    return t


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def posterior_mean(
    x: torch.Tensor, sigma: SigmaLike, exemplars: torch.Tensor, spread: float, alpha: SigmaLike = 1.0,
    log_prior: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Exact ``E[x0 | x]`` for ``x = alpha * x0 + sigma * eps``, x0 from the exemplar mixture.

    ``sigma`` and ``alpha`` are floats or per-item ``[B]`` tensors; ``alpha = 0`` (pure noise)
    gives the mixture mean. ``log_prior`` ([B, K] or [K]) reweights the mixture components, which
    makes the model class-conditional (uniform when None). Computed in float64 with a log-sum-exp softmax.
    """
    if spread <= 0:
        raise ValueError(f"spread must be > 0, got {spread}")
    _check_shapes(x, exemplars)
    batch = x.shape[0]
    dtype = _compute_dtype(x.device)
    xs = x.reshape(batch, -1).to(dtype)
    mu = exemplars.reshape(exemplars.shape[0], -1).to(device=x.device, dtype=dtype)
    s = _per_item(sigma, batch, x.device, "sigma").to(dtype)[:, None]
    a = _per_item(alpha, batch, x.device, "alpha").to(dtype)[:, None]

    var = a**2 * spread**2 + s**2  # [B, 1]: variance of x around alpha * mu_k
    # -|x - a mu_k|^2 / (2 var) without the |x|^2 term, which is the same for every k.
    logits = (a * (xs @ mu.T) - 0.5 * a**2 * (mu**2).sum(-1)[None]) / var  # [B, K]
    if log_prior is not None:
        logits = logits + log_prior.to(device=x.device, dtype=dtype).expand_as(logits)
    weights = torch.softmax(logits, dim=-1)
    gain = a * spread**2 / var  # [B, 1]: shrinkage of (x - alpha * mu_k) kept in the mean
    # sum_k w_k (mu_k + gain (x - alpha mu_k)) with sum_k w_k = 1:
    mean = (1.0 - gain * a) * (weights @ mu) + gain * xs
    return mean.reshape(x.shape).to(x.dtype)


def posterior_mean_ve(x: torch.Tensor, sigma: SigmaLike, exemplars: torch.Tensor, spread: float,
                      log_prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact ``E[x0 | x]`` under the variance-exploding form ``x = x0 + sigma * eps``."""
    return posterior_mean(x, sigma, exemplars, spread, alpha=1.0, log_prior=log_prior)


def posterior_mean_flow(x: torch.Tensor, sigma: SigmaLike, exemplars: torch.Tensor, spread: float,
                        log_prior: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact ``E[x0 | x]`` under the rectified-flow form ``x = (1 - sigma) * x0 + sigma * eps``.

    Equal to ``posterior_mean_ve(x / (1 - sigma), sigma / (1 - sigma))`` for sigma < 1, and finite
    at sigma = 1 (where it is the mixture mean).
    """
    s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    return posterior_mean(x, s, exemplars, spread, alpha=1.0 - s, log_prior=log_prior)


def prediction_from_mean(x: torch.Tensor, sigma: SigmaLike, mean: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model output whose ComfyUI ``calculate_denoised`` is ``mean``.

    ``x`` is the noisy latent as the sampler holds it (VE form for eps/v, flow form for flow);
    ``prediction`` is ``"eps"``: ``(x - m) / sigma``; ``"v_prediction"``:
    ``(x / (sigma^2 + 1) - m) * sqrt(sigma^2 + 1) / sigma``; ``"flow"``: ``(x - m) / sigma``.
    Items with sigma == 0 get a zero output (the sampler multiplies it by sigma anyway).
    """
    s = _per_item(sigma, x.shape[0], x.device, "sigma").reshape(-1, *([1] * (x.ndim - 1)))
    safe = torch.where(s > 0, s, torch.ones_like(s))
    xd, md = x.to(torch.float64), mean.to(torch.float64)
    if prediction in ("eps", "flow"):
        out = (xd - md) / safe
    elif prediction == "v_prediction":
        out = (xd / (s**2 + 1) - md) * torch.sqrt(s**2 + 1) / safe
    else:
        raise ValueError(f"unknown prediction {prediction!r}: use 'eps', 'v_prediction' or 'flow'")
    return torch.where(s > 0, out, torch.zeros_like(out)).to(x.dtype)


EXCLUDED_LOG_PRIOR = -1e4  # a finite "never": keeps the softmax free of NaN even if a row excludes everything


def log_prior_from_weights(weights: torch.Tensor) -> Optional[torch.Tensor]:
    """[B, K] non-negative class weights -> log prior; a row of zeros means no preference (uniform)."""
    weights = weights.to(torch.float64).clamp_min(0.0)
    uniform = weights.sum(-1, keepdim=True) <= 0
    weights = torch.where(uniform, torch.ones_like(weights), weights)
    return torch.where(weights > 0, weights.log(), torch.full_like(weights, EXCLUDED_LOG_PRIOR))


def rms_distances(images: torch.Tensor, exemplars: torch.Tensor) -> torch.Tensor:
    """RMS distance (per pixel and channel) of every image to every exemplar, shape [B, K]."""
    _check_shapes(images, exemplars)
    dtype = _compute_dtype(images.device)
    a = images.reshape(images.shape[0], -1).to(dtype)
    b = exemplars.reshape(exemplars.shape[0], -1).to(device=images.device, dtype=dtype)
    squared = (a**2).sum(-1)[:, None] - 2.0 * (a @ b.T) + (b**2).sum(-1)[None]
    return (squared.clamp(min=0.0) / a.shape[1]).sqrt().float()


def manifold_distance(images: torch.Tensor, exemplars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: RMS distance to the nearest exemplar ``[B]`` and that exemplar's index ``[B]``."""
    distance, index = rms_distances(images, exemplars).min(dim=1)
    return distance, index


def distinct_exemplars(images: torch.Tensor, exemplars: torch.Tensor, radius: float) -> int:
    """How many different exemplars the images landed on (counting images within ``radius`` RMS)."""
    distance, index = manifold_distance(images, exemplars)
    return int(torch.unique(index[distance <= radius]).numel())


def sample_mixture(
    exemplars: torch.Tensor, spread: float, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` exact samples of the mixture: a uniformly chosen exemplar plus ``spread`` Gaussian noise."""
    index = torch.randint(0, exemplars.shape[0], (n,), generator=generator)
    noise = torch.randn((n, *exemplars.shape[1:]), generator=generator, dtype=torch.float32)
    return exemplars.detach().cpu().float()[index] + spread * noise
