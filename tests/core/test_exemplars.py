"""Unit tests of the exemplar mixture's closed-form denoiser (pure torch, no ComfyUI)."""
from __future__ import annotations

import pytest
import torch
from comfyui_nested_diffusion.demo_models.exemplar.exemplars import (
    EXEMPLAR_NAMES,
    default_exemplars,
    distinct_exemplars,
    manifold_distance,
    posterior_mean,
    posterior_mean_flow,
    posterior_mean_ve,
    prediction_from_mean,
    rms_distances,
    sample_mixture,
)

SPREAD = 0.05


@pytest.fixture(scope="module")
def exemplars() -> torch.Tensor:
    return default_exemplars(32)


def tweedie_mean(x: torch.Tensor, sigma: float, exemplars: torch.Tensor, spread: float) -> torch.Tensor:
    """Independent reference: E[x0|x] = x + sigma^2 * grad log p_sigma(x), by autograd in float64."""
    x = x.detach().to(torch.float64).requires_grad_(True)
    mu = exemplars.to(torch.float64).flatten(1)
    var = spread**2 + sigma**2
    sq = ((x.flatten(1)[:, None, :] - mu[None]) ** 2).sum(-1)
    log_p = torch.logsumexp(-sq / (2 * var), dim=1).sum()
    (grad,) = torch.autograd.grad(log_p, x)
    return (x + sigma**2 * grad).detach()


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("size", [8, 16, 32, 48, 64])
def test_default_exemplars_shape_range_and_distinct(size):
    ex = default_exemplars(size)
    assert ex.shape == (len(EXEMPLAR_NAMES), 3, size, size)
    assert ex.dtype == torch.float32
    assert ex.min() >= -1.0 and ex.max() <= 1.0
    d = rms_distances(ex, ex)
    off_diagonal = d[~torch.eye(len(ex), dtype=torch.bool)]
    assert off_diagonal.min() > 0.5
    assert torch.equal(ex, default_exemplars(size))  # deterministic


def test_default_exemplars_are_colourful(exemplars):
    # Every exemplar uses a real range of values in some channel, and they are not grey.
    per_image_range = (exemplars.amax(dim=(2, 3)) - exemplars.amin(dim=(2, 3))).amax(dim=1)
    assert per_image_range.min() > 1.0
    channel_spread = exemplars.std(dim=1).mean(dim=(1, 2))
    assert (channel_spread > 0.2).sum() >= 6


def test_default_exemplars_rejects_tiny_size():
    with pytest.raises(ValueError):
        default_exemplars(4)


def test_posterior_mean_matches_tweedie(exemplars):
    gen = torch.Generator().manual_seed(0)
    x0 = sample_mixture(exemplars, SPREAD, 3, gen)
    for sigma in (0.01, 0.1, 0.5, 2.0, 20.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=gen)
        got = posterior_mean_ve(x.double(), sigma, exemplars, SPREAD)
        assert rms(got, tweedie_mean(x, sigma, exemplars, SPREAD)) < 1e-8, sigma


def test_tiny_sigma_returns_the_sample(exemplars):
    x0 = sample_mixture(exemplars, SPREAD, 6, torch.Generator().manual_seed(1))
    got = posterior_mean_ve(x0, 1e-3, exemplars, SPREAD)
    assert rms(got, x0) < 1e-3
    assert rms(posterior_mean_ve(x0, 0.0, exemplars, SPREAD), x0) < 1e-6  # sigma = 0: x itself


def test_huge_sigma_gives_the_weighted_exemplar_mean(exemplars):
    gen = torch.Generator().manual_seed(2)
    x0 = sample_mixture(exemplars, SPREAD, 4, gen)
    sigma = 1000.0
    x = x0 + sigma * torch.randn(x0.shape, generator=gen)
    got = posterior_mean_ve(x, sigma, exemplars, SPREAD)
    # Nearly uniform weights: close to the plain mean of the exemplars ...
    assert rms(got, exemplars.mean(0, keepdim=True).expand_as(got)) < 0.05
    # ... and exactly the softmax-weighted mean (shrinkage s^2/sigma^2 ~ 2.5e-9 is negligible).
    mu = exemplars.double().flatten(1)
    logits = -((x.double().flatten(1)[:, None] - mu[None]) ** 2).sum(-1) / (2 * (SPREAD**2 + sigma**2))
    weighted = (torch.softmax(logits, 1) @ mu).reshape(got.shape)
    assert rms(got, weighted) < 1e-5
    assert rms(got, x0) > 0.3  # it is a mean, not the sample


@pytest.mark.parametrize("sigma", [0.0, 1e-6, 1e-3, 1e3, 1e4, 1e6])
def test_finite_at_extreme_sigmas(exemplars, sigma):
    gen = torch.Generator().manual_seed(3)
    x = sample_mixture(exemplars, SPREAD, 2, gen) + sigma * torch.randn(2, 3, 32, 32, generator=gen)
    got = posterior_mean_ve(x.float(), sigma, exemplars, SPREAD)
    assert got.dtype == torch.float32
    assert torch.isfinite(got).all()
    assert got.abs().max() <= 1.5  # a posterior mean stays near the data, whatever the noise


def test_per_item_sigma_equals_separate_calls(exemplars):
    gen = torch.Generator().manual_seed(4)
    sigmas = torch.tensor([0.02, 0.7, 9.0])
    x = sample_mixture(exemplars, SPREAD, 3, gen) + sigmas.view(-1, 1, 1, 1) * torch.randn(3, 3, 32, 32, generator=gen)
    batched = posterior_mean_ve(x, sigmas, exemplars, SPREAD)
    for i in range(3):
        single = posterior_mean_ve(x[i : i + 1], float(sigmas[i]), exemplars, SPREAD)
        assert rms(batched[i : i + 1], single) < 1e-6
    with pytest.raises(ValueError):
        posterior_mean_ve(x, torch.tensor([0.1, 0.2]), exemplars, SPREAD)


def test_flow_form_equals_ve_conversion(exemplars):
    gen = torch.Generator().manual_seed(5)
    x0 = sample_mixture(exemplars, SPREAD, 3, gen)
    noise = torch.randn(x0.shape, generator=gen)
    for s in (0.1, 0.5, 0.9, 0.999):
        x = (1 - s) * x0 + s * noise
        expected = posterior_mean_ve(x.double() / (1 - s), s / (1 - s), exemplars, SPREAD)
        assert rms(posterior_mean_flow(x.double(), s, exemplars, SPREAD), expected) < 1e-8
    # sigma = 1 is pure noise: the prior mean, finite.
    at_one = posterior_mean_flow(noise, 1.0, exemplars, SPREAD)
    assert rms(at_one, exemplars.mean(0, keepdim=True).expand_as(at_one)) < 1e-5
    # alpha = 0 in the general form is the same thing.
    assert rms(posterior_mean(noise, 1.0, exemplars, SPREAD, alpha=0.0), at_one) < 1e-6


def test_shape_mismatch_raises(exemplars):
    with pytest.raises(ValueError, match="does not match"):
        posterior_mean_ve(torch.zeros(1, 3, 16, 16), 1.0, exemplars, SPREAD)
    with pytest.raises(ValueError):
        manifold_distance(torch.zeros(1, 4, 32, 32), exemplars)
    with pytest.raises(ValueError):
        posterior_mean_ve(torch.zeros(1, 3, 32, 32), 1.0, exemplars, 0.0)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction", "flow"])
def test_prediction_from_mean_inverts_comfy_denoised(prediction):
    gen = torch.Generator().manual_seed(6)
    sigma = torch.tensor([0.0, 0.3, 0.8, 5.0])
    if prediction == "flow":
        sigma = sigma.clamp(max=1.0)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    mean = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    out = prediction_from_mean(x, sigma, mean, prediction)
    s = sigma.double().view(-1, 1, 1, 1)
    # ComfyUI's calculate_denoised for each model type (sigma_data = 1).
    if prediction == "v_prediction":
        denoised = x / (s**2 + 1) - out * s / (s**2 + 1).sqrt()
    else:
        denoised = x - out * s
    assert torch.allclose(denoised[1:], mean[1:], atol=1e-10)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    with pytest.raises(ValueError):
        prediction_from_mean(x, sigma, mean, "x0")


def test_manifold_distance_picks_the_right_exemplar(exemplars):
    order = torch.tensor([3, 0, 7, 7, 5, 1])
    gen = torch.Generator().manual_seed(7)
    images = exemplars[order] + 0.01 * torch.randn(len(order), 3, 32, 32, generator=gen)
    distance, index = manifold_distance(images, exemplars)
    assert torch.equal(index, order)
    assert torch.allclose(distance, torch.full_like(distance, 0.01), rtol=0.1)
    far = exemplars[:1] + 0.4  # off the manifold
    assert manifold_distance(far, exemplars)[0].item() > 0.3


def test_distinct_exemplars_counts_only_items_within_radius(exemplars):
    images = torch.cat([exemplars[[2, 2, 4, 6]], torch.zeros(1, 3, 32, 32)])
    assert distinct_exemplars(images, exemplars, radius=0.05) == 3
    assert distinct_exemplars(images + 0.2, exemplars, radius=0.05) == 0
    assert distinct_exemplars(images + 0.2, exemplars, radius=0.25) == 3


def test_sample_mixture_is_exact_and_reproducible(exemplars):
    samples = sample_mixture(exemplars, SPREAD, 400, torch.Generator().manual_seed(8))
    again = sample_mixture(exemplars, SPREAD, 400, torch.Generator().manual_seed(8))
    assert samples.shape == (400, 3, 32, 32) and torch.equal(samples, again)
    distance, index = manifold_distance(samples, exemplars)
    assert torch.allclose(distance, torch.full_like(distance, SPREAD), rtol=0.05)
    counts = torch.bincount(index, minlength=len(exemplars))
    assert counts.min() > 25  # roughly uniform over the 8 exemplars (expected 50 each)
