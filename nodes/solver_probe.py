"""What an inner solver does, measured by running it on a stand-in whose answer is known.

The nested outer step needs to know whether the bound inner solver returns (close to) a *sample* of
p(x0 | x_sigma) or a deterministic function of x_sigma: only for a sample is ``(x - x0) / sigma`` the
independent noise the eta-0 outer step assumes. Rather than keeping a list of sampler names (third-party
samplers, new ComfyUI releases, eta set by the user), the solver runs twice with two seeds on an exact
denoiser of standard normal data over a real inner schedule; how far its results differ, against the true
posterior variance, is its *posterior ratio*: 0 for an ODE solver, about 0.6 to 0.8 for ancestral solvers at eta 1
over 10 steps, about 0.9 for dpmpp_sde, seeds_2 and sa_solver, above 1 for solvers that add more noise than the
posterior holds (res_multistep_ancestral, dpmpp_3m_sde on eps models).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..nested_core import renoise_step
from .schedule_cache import planning_checkpoint

# What "auto" takes, by posterior ratio (docs/results.md has the measurements):
# - below DETERMINISTIC_BELOW (ODE solvers, small eta): re-noise; the paper's step widens the spread of N(0, 1) data
#   by 40% and more;
# - within POSTERIOR_RATIO_BAND (a posterior sample: dpmpp_sde, seeds_2, ...): the paper's step, exact there;
# - above the band (more noise than the posterior holds): re-noise;
# - in between (partial posterior samplers: ancestral solvers, ratio 0.5 to 0.8): both steps keep the spread of
#   N(0, 1) data within 10%, and on the learned digits models (1000 samples, FID-like score, euler_ancestral at
#   eta 0.85) each one was clearly better on one family: re-noising on the eps model (16.4 vs 51.6 at CFG 1,
#   49.1 vs 56.5 at CFG 2), the paper's step on the flow model (4.1 vs 8.1 at CFG 1, 37.5 vs 48.9 at CFG 2).
DETERMINISTIC_BELOW = 0.35
POSTERIOR_RATIO_BAND = (0.85, 1.15)
PROBE_BATCH = 64
PROBE_MAX_STEPS = 50  # a longer inner schedule is probed over this many of its sigmas, evenly spread (bounded time)
PROBE_SPATIAL = 4
_PROBE_SEEDS = (1, 2)


class GaussianStandIn:
    """The exact denoiser of N(0, 1) data, in the place of ComfyUI's ``KSamplerX0Inpaint`` model.

    ``inner_model`` is the real guided model, so solvers that look up the model sampling through it find
    the real one; post-CFG functions that solvers install (the cfg_pp family) see cond = uncond = the mean.
    """

    def __init__(self, inner_model: Any, flow: bool):
        self.inner_model = inner_model
        self.flow = flow
        self.calls = 0

    def posterior_mean(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return x * (1 - s) / ((1 - s) ** 2 + s**2) if self.flow else x / (1 + s**2)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra_args) -> torch.Tensor:
        planning_checkpoint()  # a probe of a 10000-step solver takes seconds: Cancel must not wait for it
        self.calls += 1
        mean = self.posterior_mean(x, sigma.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1))))
        model_options = extra_args.get("model_options") or {}
        for post_cfg in model_options.get("sampler_post_cfg_function", []):
            mean = post_cfg({"denoised": mean, "cond": None, "uncond": None, "cond_scale": 1.0, "model": self.inner_model,
                             "uncond_denoised": mean, "cond_denoised": mean, "sigma": sigma,
                             "model_options": model_options, "input": x})
        return mean


def plain_noise(solver: Callable[..., Any], generator: torch.Generator, shape: tuple) -> dict:
    """``noise_sampler``: plain normal noise from ``generator``, for a solver that takes one and has none bound, to
    count its model calls (``solver_cost``). ComfyUI's SDE solvers otherwise build a Brownian tree per run, most of
    a cost measurement's time, and no solver's call count depends on the noise but an adaptive one's (an estimate
    anyway). Not for the posterior probe: dpmpp_sde draws noise over overlapping sub-steps, which only a Brownian
    tree keeps consistent (with plain noise its measured ratio left the posterior band)."""
    function = getattr(solver, "func", solver)
    try:
        accepted = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}
    if "noise_sampler" not in accepted or "noise_sampler" in getattr(solver, "keywords", {}):
        return {}
    return {"noise_sampler": lambda sigma, sigma_next: torch.randn(shape, generator=generator)}


def probe_schedule(sigmas: torch.Tensor, max_steps: int = PROBE_MAX_STEPS) -> torch.Tensor:
    """``sigmas`` with at most ``max_steps`` steps: evenly spread sigmas of it, its first and last kept. The probe of
    a 5000-step inner schedule took 33 s before the first model call; the ratio it measures settles long before."""
    if len(sigmas) <= max_steps + 1:
        return sigmas
    picked = torch.linspace(0, len(sigmas) - 1, max_steps + 1).round().long()
    return sigmas[picked]


def posterior_variance(sigma: float, flow: bool) -> float:
    """Var(x0 | x_sigma) for N(0, 1) data."""
    if flow:
        return sigma**2 / ((1 - sigma) ** 2 + sigma**2)
    return sigma**2 / (1 + sigma**2)


def diffused_standard_normal(sigma: float, flow: bool, channels: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (PROBE_BATCH, channels, PROBE_SPATIAL, PROBE_SPATIAL)
    x0 = torch.randn(shape, generator=generator)
    noise = torch.randn(shape, generator=generator)
    return renoise_step(x0, sigma, noise, flow)


def posterior_ratio(solver: Callable[..., torch.Tensor], inner_sigmas: torch.Tensor, inner_model: Any, flow: bool,
                    channels: int) -> float:
    """Var over solver seeds of its result from one x_sigma, divided by the true posterior variance."""
    sigma = float(inner_sigmas[0])
    x = diffused_standard_normal(sigma, flow, channels)
    sigmas = probe_schedule(inner_sigmas.detach().to(device="cpu", dtype=torch.float32))
    results = [solver(GaussianStandIn(inner_model, flow), x.clone(), sigmas.clone(), extra_args={"seed": seed, "model_options": {}},
                      callback=None, disable=True) for seed in _PROBE_SEEDS]
    spread = float(((results[0] - results[1]) ** 2).mean()) / 2
    return spread / max(posterior_variance(sigma, flow), 1e-12)


def outer_step_for_ratio(ratio: Optional[float], flow: bool) -> str:
    """The outer step "auto" takes for a solver of this posterior ratio (None: the probe could not drive it, and the
    paper's step is kept)."""
    low, high = POSTERIOR_RATIO_BAND
    if ratio is None or low <= ratio <= high:
        return "ddim"
    if ratio < DETERMINISTIC_BELOW or ratio > high:
        return "renoise"
    return "ddim" if flow else "renoise"  # a partial posterior sampler: as measured on the digits models


def measured_posterior_ratio(solver: Callable[..., torch.Tensor], inner_sigmas: torch.Tensor, inner_model: Any,
                             flow: bool, channels: int) -> Optional[float]:
    """The solver's posterior ratio, or None if the probe could not drive it."""
    try:
        ratio = posterior_ratio(solver, inner_sigmas, inner_model, flow, channels)
    except comfy.model_management.InterruptProcessingException:  # Cancel: not a solver the stand-in cannot drive
        raise
    except Exception as error:  # a third-party solver the stand-in cannot drive: the caller decides
        logging.warning("nested diffusion: could not probe the inner solver (%s: %s)", type(error).__name__, error)
        return None
    return ratio
