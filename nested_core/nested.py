"""Nested diffusion (Elata et al., WACV 2024, Algorithm 2) in sigma space.

The outer process is itself a k-diffusion style sampler, ``sample_nested(model, x, sigmas, ...)``:
at every outer sigma it runs a complete inner diffusion down to 0 with any solver, takes that real
sample as the outer step's "denoised" estimate, and steps to the next outer sigma. One formula serves
eps, v and flow models: ``x_next = x0 + sigma_next * (x - x0) / sigma``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

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


def seeded_outer_noise(seed: Optional[int], stream: int = 1, batch_indices: Optional[Sequence[int]] = None) -> OuterNoiseFn:
    """Noise for re-noised and ancestral outer steps, reproducible from the node's seed (a stream of its own; stream 2:
    the noise a stage that ends early hands on with its state). Drawn per batch item from the item's own seed, so an
    item gets the same outer noise whatever the batch around it: ``batch_indices`` are the items' indices in the
    original batch (ComfyUI's ``batch_index`` of a LatentFromBatch latent), 0, 1, ... by default."""

    def item_noise(step_seed: Optional[int], item: int, shape: tuple) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        derived = derive_seed(step_seed, 3, item)
        if derived is None:
            generator.seed()
        else:
            generator.manual_seed(derived)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def noise(index: int, x: torch.Tensor) -> torch.Tensor:
        step_seed = derive_seed(seed, stream, index)
        items = list(batch_indices) if batch_indices is not None and len(batch_indices) == x.shape[0] else range(x.shape[0])
        drawn = torch.stack([item_noise(step_seed, int(item), tuple(x.shape[1:])) for item in items])
        return drawn.to(device=x.device, dtype=x.dtype)

    return noise


def renoise_step(x0: torch.Tensor, sigma_next: float, noise: torch.Tensor, flow: bool = False,
                 noise_scale: float = 1.0) -> torch.Tensor:
    """``x0`` diffused afresh to ``sigma_next``: exactly the data's marginal at ``sigma_next`` whenever ``x0`` has the
    data's marginal, whatever the inner solver (a deterministic ODE's ``x - x0`` is no independent noise).
    ``noise_scale``: a flow model's noise is ``noise_scale`` times standard normal (ComfyUI's
    ``model_sampling.noise_scale``, e.g. 8 for pixel-space HiDream-O1): ``x = (1 - s) x0 + s * noise_scale * eps``."""
    if flow:
        return x0 * (1 - sigma_next) + noise * (sigma_next * noise_scale)
    return x0 + noise * sigma_next


def outer_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, eta: float = 0.0,
               s_noise: float = 1.0, noise: Optional[torch.Tensor] = None, flow: bool = False,
               renoise: bool = False, noise_scale: float = 1.0) -> torch.Tensor:
    """Move the outer state from ``sigma`` to ``sigma_next`` given the inner result ``x0``.

    ``eta == 0`` is the deterministic DDIM/Euler step; ``eta > 0`` re-injects fresh noise the way
    ancestral samplers do (the variance-preserving rectified-flow form for flow models). ``renoise``
    replaces all of the noise (see ``renoise_step``); it needs ``noise``. ``noise_scale`` scales the fresh noise of
    flow models as ComfyUI's ``model_sampling.noise_scale`` does theirs (the deterministic step keeps it by itself).
    """
    if sigma_next == 0:
        return x0
    if renoise:
        if noise is None:
            raise NestedDiffusionError("a renoise outer step needs noise")
        return renoise_step(x0, sigma_next, noise, flow, noise_scale)
    if eta == 0 or noise is None:
        return x0 + (x - x0) * (sigma_next / sigma)
    if flow:
        return _outer_step_ancestral_flow(x, x0, sigma, sigma_next, eta, s_noise * noise_scale, noise)
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


class ModelCallLimitReached(Exception):
    """An inner diffusion asked for one model evaluation more than the run's ``max_calls`` allows."""


class CountedModel:
    """Wraps the sampler's model to count evaluations (NFEs); every other attribute passes through.
    With ``limit`` > 0 it refuses the evaluation that would exceed it (``ModelCallLimitReached``)."""

    def __init__(self, model: Any, on_call: Optional[Callable[[int], None]] = None, limit: int = 0):
        self.model = model
        self.calls = 0
        self.on_call = on_call
        self.limit = limit

    def __call__(self, *args, **kwargs):
        if self.limit and self.calls >= self.limit:
            raise ModelCallLimitReached(self.calls)
        out = self.model(*args, **kwargs)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        return out

    def __getattr__(self, name: str):
        return getattr(self.__dict__["model"], name)


def _inner_extra_args(extra_args: dict, index: int, inner_sigmas: Optional[torch.Tensor] = None) -> dict:
    """Every inner process draws its own solver noise (ancestral/SDE), derived from the run's seed and
    the outer step's index in the whole schedule (so a run split into stages draws the same noise).

    It also sees its own schedule: where the model options carry ``transformer_options["sample_sigmas"]``
    (ComfyUI sets it to the schedule being sampled; context windows, hook keyframes and some video models look
    the current sigma up in it), an inner process gets ``inner_sigmas`` there, in copies of those two dicts.
    """
    extra_args = dict(extra_args)
    if index != 0 and extra_args.get("seed") is not None:
        extra_args["seed"] = derive_seed(extra_args["seed"], 0, index)
    model_options = extra_args.get("model_options")
    if inner_sigmas is not None and isinstance(model_options, dict) and isinstance(model_options.get("transformer_options"), dict):
        transformer_options = {**model_options["transformer_options"], "sample_sigmas": inner_sigmas}
        extra_args["model_options"] = {**model_options, "transformer_options": transformer_options}
    return extra_args


@torch.no_grad()
def sample_nested(model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: Optional[dict] = None, callback=None,
                  disable=None, *, inner_solver: InnerSolver, inner_schedule: InnerScheduleFn,
                  outer_eta: float = 0.0, outer_s_noise: float = 1.0, flow: bool = False,
                  outer_noise: Optional[OuterNoiseFn] = None, on_model_call: Optional[Callable[[int], None]] = None,
                  stop_after: Optional[Callable[[int, int], bool]] = None, index_offset: int = 0,
                  renoise: bool = False, max_calls: int = 0, noise_scale: float = 1.0,
                  batch_indices: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Nested diffusion over the outer ``sigmas``, with the k-diffusion sampler signature.

    ``callback`` gets ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` once per outer step, ``denoised``
    being the inner result: the anytime image. ``on_model_call(n)`` sees every model evaluation.
    ``stop_after(outer_index, nfe_done)`` returning True ends the run with that inner result; where ``sigmas`` ends
    above 0 (a stage with leftover noise) with that inner result diffused afresh to the last sigma, so that the next
    stage continues from a true state at that sigma (not from a clean image taken for a noisy one).
    ``index_offset``: where ``sigmas`` starts in the whole outer schedule (a later stage of a split run).
    ``renoise``: every outer step diffuses the inner result afresh (for deterministic inner solvers, whose
    ``(x - x0) / sigma`` is not independent of ``x0``: the eta-0 step would widen the samples' spread).
    ``noise_scale``: a flow model's ``model_sampling.noise_scale`` (the fresh noise of outer steps is scaled by it).
    ``max_calls`` > 0: a hard limit on model evaluations. An inner diffusion that would need more (an adaptive
    solver spending more than projected) is cut, and the run ends with the previous inner result (and
    ``stop_after.inner_process_cut()`` when it has one); cut in the first outer step it is an error.
    """
    extra_args = {} if extra_args is None else extra_args
    if not math.isfinite(outer_eta) or outer_eta < 0:
        raise NestedDiffusionError(f"outer_eta must be a number from 0 to 1, got {outer_eta}")
    counted = CountedModel(model, on_model_call, limit=max_calls)
    noise_fn = outer_noise if outer_noise is not None else seeded_outer_noise(extra_args.get("seed"), batch_indices=batch_indices)
    outer_sigmas = [float(s) for s in sigmas]
    previous = None

    def ended_early(x0: torch.Tensor, index: int) -> torch.Tensor:
        if outer_sigmas[-1] == 0:
            return x0
        handover = seeded_outer_noise(extra_args.get("seed"), stream=2, batch_indices=batch_indices)(index + index_offset, x0)
        return renoise_step(x0, outer_sigmas[-1], handover, flow, noise_scale)

    for index in range(len(outer_sigmas) - 1):
        sigma, sigma_next = outer_sigmas[index], outer_sigmas[index + 1]
        # a copy: some solvers write into the schedule they are given (uni_pc sets its final 0 to 0.001 in place)
        inner_sigmas = inner_schedule(index, sigma).to(device=x.device, copy=True)
        try:
            x0 = inner_solver(counted, x, inner_sigmas, callback=None, disable=True,
                              extra_args=_inner_extra_args(extra_args, index + index_offset, inner_sigmas))
        except ModelCallLimitReached:
            if previous is None:
                raise NestedDiffusionError(
                    f"max_nfe {max_calls} was used up before the first inner diffusion ended (the inner solver spent "
                    f"more model evaluations on this model than measured): raise max_nfe, or use fewer inner steps"
                ) from None
            getattr(stop_after, "inner_process_cut", lambda: None)()
            return ended_early(previous, index - 1)
        if callback is not None:
            callback({"x": x, "i": index, "sigma": sigmas[index], "sigma_hat": sigmas[index], "denoised": x0})
        if stop_after is not None and stop_after(index, counted.calls):
            return ended_early(x0, index)
        noise = noise_fn(index + index_offset, x) if (renoise or outer_eta > 0) and sigma_next > 0 else None
        x = outer_step(x, x0, sigma, sigma_next, outer_eta, outer_s_noise, noise, flow, renoise, noise_scale)
        # Only a run with a hard call limit can need an earlier inner result again (a cut inner diffusion).
        previous = x0 if max_calls else None
        del x0, noise  # otherwise not held during the next inner diffusion
    return x
