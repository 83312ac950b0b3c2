"""What an inner diffusion costs, measured by running the bound solver rather than looked up by its name.

Before a run, the bound solver (ComfyUI's, a third-party one, any eta) runs over every inner schedule on the
counting stand-in denoiser of ``solver_probe``: its model calls are the plan's NFEs, for every sampler of every
ComfyUI release (``exp_heun_2_x0`` spends 2 calls per step in 0.33.0; a name table kept by hand missed it).
It runs on two different inputs: a solver whose calls differ between them (``dpm_adaptive``) picks its steps from
the model's answers, so its plan is an estimate, and the budget rule then goes by what each inner diffusion really
spent (``nested_core.budget.projected_costs``). Results are cached per solver, options and schedule. Where the
stand-in cannot drive a solver, or measuring runs out of time, the cost is estimated from the calls per step measured
on the plan's other schedules (one call per step where none was measured), never from the solver's name.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import comfy.model_management
import torch

from ..nested_core import renoise_step
from .solver_probe import GaussianStandIn, plain_noise

COST_CACHE_LIMIT = 4096
# Measuring a plan's inner schedules stops after this long; the schedules left are estimated. An SDE solver's
# Brownian-tree noise made 1000 measured schedules take 15-20 s on 2 cores before the first model call.
MEASURE_SECONDS = 0.4
_COSTS: dict = {}  # (solver key, schedule, flow) -> InnerCost
_INPUTS = ((0, "gaussian"), (1, "binary"))  # two data sets an adaptive solver answers with different step counts
_SHAPE = (1, 4, 4, 4)


@dataclass(frozen=True)
class InnerCost:
    """Model calls of one inner diffusion: ``nfe`` as measured, ``exact`` when it did not depend on the input."""

    nfe: int
    exact: bool
    measured: bool = True  # False: estimated (the stand-in could not drive the solver, or measuring ran out of time)


class PlanningGuider:
    """What solvers reach through ``model.inner_model`` (ComfyUI's guider) while their cost is measured before
    sampling: the model sampling, as ``inner_model.model_sampling`` and ``model_patcher.get_model_object``."""

    def __init__(self, model_sampling: Any):
        self.model_sampling = model_sampling
        self.inner_model = SimpleNamespace(model_sampling=model_sampling)
        self.model_patcher = SimpleNamespace(get_model_object=self._model_object, model_options={})
        self.model_options = {}

    def _model_object(self, name: str) -> Any:
        if name == "model_sampling":
            return self.model_sampling
        raise AttributeError(f"no {name!r} while measuring an inner solver's cost")


def solver_key(solver: Callable[..., Any]) -> tuple:
    """A solver's identity across plans: its function's module and qualified name and its bound options
    (``ksampler`` makes a new closure for dpm_fast / dpm_adaptive at every call)."""
    func = getattr(solver, "func", solver)
    options = tuple(sorted((name, repr(value)) for name, value in getattr(solver, "keywords", {}).items()))
    return (getattr(func, "__module__", None), getattr(func, "__qualname__", repr(func)), options)


class BinaryStandIn(GaussianStandIn):
    """The exact denoiser of data whose every value is -1 or +1 (a sharply nonlinear one, unlike the Gaussian's):
    an adaptive solver picks other steps on it than on the Gaussian stand-in."""

    def posterior_mean(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        s = s.clamp(min=1e-4)
        return torch.tanh(x * (1 - s) / s**2) if self.flow else torch.tanh(x / s**2)


class MeasuringTooLong(Exception):
    """The time for measuring a plan's costs ran out in the middle of one inner schedule."""


class DeadlineModel:
    """A stand-in that refuses model calls once ``deadline`` (``time.monotonic()``) has passed; every other
    attribute passes through, so solvers find what they look up on the stand-in."""

    def __init__(self, stand_in: Any, deadline: float):
        self.stand_in = stand_in
        self.deadline = deadline

    def __call__(self, *args, **kwargs):
        if time.monotonic() > self.deadline:
            raise MeasuringTooLong
        return self.stand_in(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["stand_in"], name)


def _count_calls(solver: Callable[..., Any], sigmas: torch.Tensor, flow: bool, guider: Any, seed: int,
                 stand_in_class: type, deadline: Optional[float] = None) -> int:
    generator = torch.Generator().manual_seed(seed)
    sigma = float(sigmas[0])
    x0 = torch.randn(_SHAPE, generator=generator)
    if stand_in_class is BinaryStandIn:
        x0 = x0.sign()
    noise = torch.randn(_SHAPE, generator=generator)
    x = renoise_step(x0, sigma, noise, flow)
    stand_in = stand_in_class(guider, flow)
    # a copy: some solvers write into the schedule they are given (uni_pc sets its final 0 to 0.001 in place)
    model = stand_in if deadline is None else DeadlineModel(stand_in, deadline)
    solver(model, x, sigmas.clone(), extra_args={"seed": seed, "model_options": {}}, callback=None, disable=True,
           **plain_noise(solver, generator, _SHAPE))
    return stand_in.calls


def estimated(sigmas: torch.Tensor, calls_per_step: float = 1.0) -> InnerCost:
    """An inner diffusion's cost where it was not measured: ``calls_per_step`` times its steps."""
    return InnerCost(nfe=max(1, math.ceil((len(sigmas) - 1) * calls_per_step - 1e-9)), exact=False, measured=False)


def measure_inner_cost(solver: Callable[..., Any], inner_sigmas: torch.Tensor, flow: bool, model_sampling: Any,
                       deadline: Optional[float] = None) -> InnerCost:
    """The model calls ``solver`` makes over ``inner_sigmas``, counted on the stand-in (cached). A solver the
    stand-in cannot drive gets one call per step as an estimate, with a warning; so does a measurement still running
    at ``deadline`` (``time.monotonic()``), without one (not cached)."""
    sigmas = inner_sigmas.detach().to(device="cpu", dtype=torch.float32)
    key = (solver_key(solver), tuple(sigmas.tolist()), flow)
    cost = _COSTS.get(key)
    if cost is None and deadline is not None and time.monotonic() > deadline:
        return estimated(sigmas)
    if cost is None:
        guider = PlanningGuider(model_sampling)
        try:
            counts = [_count_calls(solver, sigmas, flow, guider, seed, GaussianStandIn if data == "gaussian" else BinaryStandIn,
                                   deadline) for seed, data in _INPUTS]
            cost = InnerCost(nfe=counts[0], exact=len(set(counts)) == 1)  # the Gaussian's count: the estimate
        except comfy.model_management.InterruptProcessingException:  # Cancel: not a solver the stand-in cannot drive
            raise
        except MeasuringTooLong:
            return estimated(sigmas)
        except Exception as error:  # a third-party solver the stand-in cannot drive: estimate, count at run time
            logging.warning("nested diffusion: could not measure the inner solver's cost (%s: %s); estimating it",
                            type(error).__name__, error)
            return estimated(sigmas)
        if len(_COSTS) >= COST_CACHE_LIMIT:  # bounded: a server runs for days
            _COSTS.clear()
        _COSTS[key] = cost
    return cost


def schedule_shape(sigmas: torch.Tensor) -> tuple[int, bool]:
    """What a solver's model calls depend on, unless they depend on the sigmas' values: its length, and whether it
    ends at 0 (most solvers take a cheaper last step there)."""
    return len(sigmas), float(sigmas[-1]) == 0.0


def measure_inner_costs(solver: Callable[..., Any], inner_sigmas: Sequence[torch.Tensor], flow: bool, model_sampling: Any,
                        seconds: float = MEASURE_SECONDS) -> list[InnerCost]:
    """Every inner schedule's cost, within about ``seconds`` for any plan. Schedules of one shape
    (``schedule_shape``) cost the same for a solver whose calls do not follow the sigmas' values: the first and the
    last of each shape are measured, and where both are exact and agree the others take their cost. Otherwise
    (``dpm_adaptive``) each is measured while time is left. What is not measured is estimated (inexact) at the most
    calls per step measured on the others: the budget rule then goes by what each inner diffusion really spends."""
    deadline = time.monotonic() + seconds
    costs: list[Optional[InnerCost]] = [None] * len(inner_sigmas)

    def cost_of(index: int) -> InnerCost:
        return measure_inner_cost(solver, inner_sigmas[index], flow, model_sampling, deadline)

    shapes: dict[tuple, list[int]] = {}
    for index, sigmas in enumerate(inner_sigmas):
        shapes.setdefault(schedule_shape(sigmas), []).append(index)
    for members in shapes.values():
        first = costs[members[0]] = cost_of(members[0])
        last = costs[members[-1]] = cost_of(members[-1])
        shared = first if first.exact and first == last else None
        for index in members[1:-1]:
            costs[index] = shared if shared is not None else cost_of(index)
    return with_estimates_scaled(costs, inner_sigmas)


def with_estimates_scaled(costs: Sequence[InnerCost], inner_sigmas: Sequence[torch.Tensor]) -> list[InnerCost]:
    """``costs`` with every estimated one re-estimated at the most calls per step measured on the others."""
    rates = [cost.nfe / max(len(sigmas) - 1, 1) for cost, sigmas in zip(costs, inner_sigmas) if cost.measured]
    if not rates:
        return list(costs)
    rate = max(rates)
    return [cost if cost.measured else estimated(sigmas, rate) for cost, sigmas in zip(costs, inner_sigmas)]
