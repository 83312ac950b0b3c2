"""Nested diffusion (Elata et al., WACV 2024, Algorithm 2) in sigma space.

The outer process is itself a k-diffusion style sampler, ``sample_nested(model, x, sigmas, ...)``:
at every outer sigma it runs a complete inner diffusion down to 0 with any solver, takes that real
sample as the outer step's "denoised" estimate, and steps to the next outer sigma. One formula serves
eps, v and flow models: ``x_next = x0 + sigma_next * (x - x0) / sigma``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from .errors import NestedDiffusionError

InnerSolver = Callable[..., torch.Tensor]  # k-diffusion signature: (model, x, sigmas, extra_args=, callback=, disable=)
InnerScheduleFn = Callable[[int, float], torch.Tensor]  # (outer index, outer sigma) -> inner sigmas ending at 0
OuterNoiseFn = Callable[[int, torch.Tensor], torch.Tensor]  # (outer index, x) -> standard normal noise like x

_SEED_STRIDE = 0x9E3779B97F4A7C15  # spreads derived seeds far apart; any odd 64-bit constant works


def derive_seed(seed: Optional[int], stream: int, index: int) -> Optional[int]:
    """A deterministic seed for noise stream ``stream`` at outer step ``index``; stream 0 step 0 is ``seed`` itself."""
    if seed is None:
        return None
    return (int(seed) + (stream * 1_000_003 + index) * _SEED_STRIDE) % (2**63)


def seeded_outer_noise(seed: Optional[int]) -> OuterNoiseFn:
    """Noise for ancestral outer steps, reproducible from the node's seed (a stream of its own)."""

    def noise(index: int, x: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        derived = derive_seed(seed, 1, index)
        if derived is None:
            generator.seed()
        else:
            generator.manual_seed(derived)
        return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)

    return noise


def renoise_step(x0: torch.Tensor, sigma_next: float, noise: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """``x0`` diffused afresh to ``sigma_next``: exactly the data's marginal at ``sigma_next`` whenever ``x0`` has the
    data's marginal, whatever the inner solver (a deterministic ODE's ``x - x0`` is no independent noise)."""
    if flow:
        return x0 * (1 - sigma_next) + noise * sigma_next
    return x0 + noise * sigma_next


def outer_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float = 0.0,
               s_noise: float = 1.0, noise: Optional[torch.Tensor] = None, flow: bool = False,
               renoise: bool = False) -> torch.Tensor:
    """Move the outer state from ``sigma`` to ``sigma_next`` given the inner result ``x0``.

    ``eta == 0`` is the deterministic DDIM/Euler step; ``eta > 0`` re-injects fresh noise the way
    ancestral samplers do (the variance-preserving rectified-flow form for flow models). ``renoise``
    replaces all of the noise (see ``renoise_step``); it needs ``noise``.
    """
    if sigma_next == 0:
        return x0
    if renoise:
        if noise is None:
            raise NestedDiffusionError("a renoise outer step needs noise")
        return renoise_step(x0, sigma_next, noise, flow)
    if eta == 0 or noise is None:
        return x0 + (x - x0) * (sigma_next / sigma)
    if flow:
        return _outer_step_ancestral_flow(x, x0, sigma, sigma_next, eta, s_noise, noise)
    sigma_up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    sigma_down = math.sqrt(max(sigma_next**2 - sigma_up**2, 0.0))
    return x0 + (x - x0) * (sigma_down / sigma) + noise * (sigma_up * s_noise)


def _outer_step_ancestral_flow(x, x0, sigma, sigma_next, eta, s_noise, noise):
    # x = (1 - s) x0 + s eps: step down to sigma_down deterministically, then rescale and add noise
    # so that the marginal is exactly that of sigma_next.
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    fresh = math.sqrt(max(sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2, 0.0))
    x_down = x0 + (x - x0) * (sigma_down / sigma)
    return x_down * (alpha_next / alpha_down) + noise * (fresh * s_noise)


class CountedModel:
    """Wraps the sampler's model to count evaluations (NFEs); every other attribute passes through."""

    def __init__(self, model: Any, on_call: Optional[Callable[[int], None]] = None):
        self.model = model
        self.calls = 0
        self.on_call = on_call

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        return out

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)


def _inner_extra_args(extra_args: dict, index: int) -> dict:
    """Every inner process draws its own solver noise (ancestral/SDE), derived from the run's seed and
    the outer step's index in the whole schedule (so a run split into stages draws the same noise)."""
    if index == 0 or extra_args.get("seed") is None:
        return extra_args
    return {**extra_args, "seed": derive_seed(extra_args["seed"], 0, index)}


@torch.no_grad()
def sample_nested(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None, callback=None,
                  disable=None, *, inner_solver: InnerSolver, inner_schedule: InnerScheduleFn,
                  outer_eta: float = 0.0, outer_s_noise: float = 1.0, flow: bool = False,
                  outer_noise: Optional[OuterNoiseFn] = None, on_model_call: Optional[Callable[[int], None]] = None,
                  stop_after: Optional[Callable[[int, int], bool]] = None, index_offset: int = 0,
                  renoise: bool = False) -> torch.Tensor:
    """Nested diffusion over the outer ``sigmas``, with the k-diffusion sampler signature.

    ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per outer step, ``denoised``
    being the inner result: the anytime image. ``on_model_call(n)`` sees every model evaluation.
    ``stop_after(outer_index, nfe_done)`` returning True ends the run with that inner result.
    ``index_offset``: where ``sigmas`` starts in the whole outer schedule (a later stage of a split run).
    ``renoise``: every outer step diffuses the inner result afresh (for deterministic inner solvers, whose
    ``(x - x0) / sigma`` is not independent of ``x0``: the eta-0 step would widen the samples' spread).
    """
    extra_args = {} if extra_args is None else extra_args
    if not math.isfinite(outer_eta) or outer_eta < 0:
        raise NestedDiffusionError(f"outer_eta must be a number from 0 to 1, got {outer_eta}")
    counted = CountedModel(model, on_model_call)
    noise_fn = outer_noise if outer_noise is not None else seeded_outer_noise(extra_args.get("seed"))
    outer_sigmas = [float(s) for s in sigmas]
    for index in range(len(outer_sigmas) - 1):
        sigma, sigma_next = outer_sigmas[index], outer_sigmas[index + 1]
        inner_sigmas = inner_schedule(index, sigma).to(device=x.device)
        x0 = inner_solver(counted, x, inner_sigmas, extra_args=_inner_extra_args(extra_args, index + index_offset),
                          callback=None, disable=True)
        if callback is not None:
            callback({"x": x, "i": index, "sigma": sigmas[index], "sigma_hat": sigmas[index], "denoised": x0})
        if stop_after is not None and stop_after(index, counted.calls):
            return x0
        noise = noise_fn(index + index_offset, x) if (renoise or outer_eta > 0) and sigma_next > 0 else None
        x = outer_step(x, x0, sigma, sigma_next, outer_eta, outer_s_noise, noise, flow, renoise)
        del x0, noise  # not held during the next inner diffusion
    return x
