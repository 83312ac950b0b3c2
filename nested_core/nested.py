"""Nested diffusion (Elata et al., WACV 2024, Algorithm 2) in sigma space.

The outer process, ``run_nested(model, x, sigmas, inner_sigmas, inner_solver, ...)``, is itself a k-diffusion style
sampler: at every outer sigma it runs a complete inner diffusion down to 0 with any solver, takes that real
sample as the outer step's "denoised" estimate, and steps to the next outer sigma. One formula serves
eps, v and flow models: ``x_next = x0 + sigma_next * (x - x0) / sigma``.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import NestedDiffusionError

SolverFn = Callable[..., torch.Tensor]  # k-diffusion signature: (model, x, sigmas, extra_args=, callback=, disable=)
OuterNoiseFn = Callable[[int, torch.Tensor, Sequence[int]], torch.Tensor]  # (outer index, x, batch indices) -> N(0, I) like x

def derive_seed(seed: Optional[int], stream: int, index: int, item: Optional[int] = None) -> Optional[int]:
    """A deterministic seed for noise stream ``stream`` at outer step ``index`` (and batch item ``item``).

    A hash of the whole tuple, never a sum: with a sum, (step k, item i) and (step k - 1, item i + 1) would get
    the same seed, and every re-noised outer step of a batch would reuse its neighbours' noise, so that batch items
    collapse onto each other. Stream 0 step 0 without an item is ``seed`` itself: one outer step samples exactly as
    KSampler with that seed."""
    if seed is None:
        return None
    if stream == 0 and index == 0 and item is None:
        return int(seed)
    key = f"nested-diffusion/{int(seed)}/{int(stream)}/{int(index)}/{'-' if item is None else int(item)}"
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") >> 1


def seeded_outer_noise(seed: Optional[int], stream: int = 1) -> OuterNoiseFn:
    """Noise for re-noised and ancestral outer steps, reproducible from the node's seed (a stream of its own; stream 2:
    the noise a stage that ends early hands on with its state). Drawn per batch item from a seed of its own, a hash of
    (seed, stream, outer step, item), so an item gets the same outer noise whatever the batch around it: the noise
    function is given the items' indices in the original batch (ComfyUI's ``batch_index`` of a LatentFromBatch
    latent; 0, 1, ... by default)."""

    def item_noise(index: int, item: int, shape: tuple) -> torch.Tensor:
        generator = torch.Generator(device="cpu")
        derived = derive_seed(seed, stream, index, item)
        if derived is None:
            generator.seed()
        else:
            generator.manual_seed(derived)
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def noise(index: int, x: torch.Tensor, items: Sequence[int]) -> torch.Tensor:
        drawn = torch.stack([item_noise(index, int(item), tuple(x.shape[1:])) for item in items])
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


class TrajectoryTap:
    """The inner solver's own state at the next outer sigma, taken from its callbacks (the "trajectory" outer step).

    A solver's state at sigma has the marginal there (up to its discretization), deterministic or not, so continuing
    from it keeps the distribution where the eta-0 step widens a deterministic solver's spread and re-noising drifts
    on some models. The tap keeps the last state at or above ``target`` and moves it down to ``target`` by an Euler
    step with that step's own denoised estimate (exact where ``target`` is on the inner grid). The result is a new
    tensor: solvers may reuse theirs."""

    def __init__(self, target: float, start: torch.Tensor):
        self.target = target
        self.start = start
        self.stale = False  # a later step reported the solver's input as its state (ComfyUI's deis and ipndm do)
        self.state: Optional[torch.Tensor] = None
        self._sigma = 0.0
        self._slope: Optional[torch.Tensor] = None

    def __call__(self, info: dict) -> None:
        """ComfyUI's sampler callback: ``x`` the state at ``sigma_hat`` (or ``sigma``), ``denoised`` its estimate."""
        sigma = info.get("sigma_hat", info.get("sigma"))
        x, denoised = info.get("x"), info.get("denoised")
        if sigma is None or x is None or denoised is None:
            return
        if x is self.start and info.get("i", 0) != 0:
            self.stale = True
        sigma = float(sigma)
        if self.stale or sigma < self.target or sigma <= 0:
            return
        self._sigma, self._slope = sigma, (x - denoised) / sigma
        self.state = x + self._slope * (self.target - sigma)

    def state_at(self, sigma: float) -> Optional[torch.Tensor]:
        """The state at ``sigma``: a re-planned next outer sigma takes the same Euler step from the kept state, down
        only (None above it: the path was not kept there)."""
        if self.stale or self.state is None or sigma > self._sigma:
            return None
        if sigma == self.target:
            return self.state
        return self.state + self._slope * (sigma - self.target)

    def narrow(self, position: int) -> None:
        if self.state is not None:
            self.state, self._slope = self.state[position:position + 1], self._slope[position:position + 1]


class ModelCallLimitReached(Exception):
    """An inner diffusion asked for one model evaluation more than the run's ``max_calls`` allows."""


class FinishedAtModelCall(Exception):
    """Finish now, asked for while an inner diffusion ran: it is dropped at its next model evaluation."""


class CountedModel:
    """Wraps the sampler's model to count evaluations (NFEs); every other attribute passes through.
    With ``limit`` > 0 it refuses the evaluation that would exceed it (``ModelCallLimitReached``). ``before_call(x)``
    runs before every evaluation (steering: it may raise to end the run, or set ``keep``). With ``keep`` set to a
    batch position, only that item is evaluated: the other items' estimate is their own state, so the solver leaves
    them where they are until the inner diffusion ends and the batch is narrowed to the kept item."""

    def __init__(self, model: Any, on_call: Optional[Callable[[int], None]] = None, limit: int = 0,
                 before_call: Optional[Callable[[torch.Tensor], None]] = None):
        self.model = model
        self.calls = 0
        self.on_call = on_call
        self.limit = limit
        self.before_call = before_call
        self.keep: Optional[int] = None

    def __call__(self, x, sigma, *args, **kwargs):
        if self.limit and self.calls >= self.limit:
            raise ModelCallLimitReached(self.calls)
        if self.before_call is not None:
            self.before_call(x)
        if self.keep is not None and x.shape[0] > 1:
            out = self._kept_item_only(x, sigma, args, kwargs)
        else:
            out = self.model(x, sigma, *args, **kwargs)
        self.calls += 1
        if self.on_call is not None:
            self.on_call(self.calls)
        return out

    def _kept_item_only(self, x: torch.Tensor, sigma: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        position, batch = self.keep, x.shape[0]
        if torch.is_tensor(sigma) and sigma.ndim > 0 and sigma.shape[0] == batch:
            sigma = sigma[position:position + 1]
        kept = self.model(x[position:position + 1], sigma, *args, **narrow_batch(kwargs, position, batch))
        out = x.clone()
        out[position:position + 1] = kept
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


@dataclass(frozen=True)
class OuterStepRule:
    """How the outer state moves on after each inner diffusion (see ``outer_step``)."""

    eta: float = 0.0
    s_noise: float = 1.0
    flow: bool = False
    renoise: bool = False
    noise_scale: float = 1.0
    trajectory: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.eta) or not 0 <= self.eta <= 1:
            raise NestedDiffusionError(f"outer_eta must be a number from 0 to 1, got {self.eta}")

    def needs_noise(self, sigma_next: float) -> bool:
        """Whether the step draws fresh noise (a trajectory step only where it falls back to re-noising)."""
        return (self.renoise or self.trajectory or self.eta > 0) and sigma_next > 0


@dataclass
class NestedResult:
    """What a nested run returns. ``x``: the final state (the last inner result at sigma 0; a stage ending above 0:
    a state at its last sigma). ``stop_reason``: why it ended early (None: it ran to the end). ``latest``: the
    latest inner result, the anytime image. ``kept``: the batch position a pick kept (None: no pick)."""

    x: torch.Tensor
    stop_reason: Optional[str] = None
    latest: Optional[torch.Tensor] = None
    nfe: int = 0
    kept: Optional[int] = None


StopRuleFn = Callable[[int, int], Optional[str]]  # (outer index, NFEs so far) -> why to stop now, or None
InnerResultFn = Callable[[int, torch.Tensor, torch.Tensor], None]  # (outer index, state x, inner result x0)
PickFn = Callable[[int], Optional[int]]  # (batch size) -> the batch position to keep from now on, or None
OnPickFn = Callable[[int, int, int], None]  # (last outer index ended, batch position kept, its batch index)
# (outer index, NFEs so far, seconds the inner process just ended took) -> the outer sigmas after this one, or None
ReplanFn = Callable[[int, int, float], Optional[Sequence[float]]]


@dataclass(frozen=True)
class RunHooks:
    """How a nested run reports to its caller and is steered by it; every hook is optional.

    ``on_inner_result(k, x, x0)`` sees every inner result, the anytime image; ``on_model_call(n)`` every model
    evaluation. ``stop_rule(k, nfe_done)``, asked after every inner diffusion, naming a reason ends the run with
    that inner result. ``finish_now()``, asked before every model evaluation once an inner diffusion has ended, True
    ends the run at once with the latest inner result (the running inner diffusion is dropped). ``take_pick(batch)``,
    asked before every model evaluation, naming a batch position keeps only that item from then on: the running
    inner diffusion goes on evaluating that item alone; ``on_pick(k, position, batch_index)`` is told at once
    (``k``: the last outer step that ended, -1 before the first). ``replan(k, nfe_done, seconds)``, asked after every
    inner diffusion but the last, may give new outer sigmas after step k (see ``run_nested``). ``on_start(x)`` is
    told the starting state before the first model evaluation; ``on_end(result)`` is told the run's result when it
    ends, or None where it raised (Cancel, an error), so that what ``on_start`` set up is let go either way.
    """

    on_inner_result: Optional[InnerResultFn] = None
    on_model_call: Optional[Callable[[int], None]] = None
    stop_rule: Optional[StopRuleFn] = None
    finish_now: Optional[Callable[[], bool]] = None
    take_pick: Optional[PickFn] = None
    on_pick: Optional[OnPickFn] = None
    replan: Optional[ReplanFn] = None
    on_start: Optional[Callable[[torch.Tensor], None]] = None
    on_end: Optional[Callable[[Optional["NestedResult"]], None]] = None


def narrow_batch(extra_args: dict, position: int, batch: int) -> dict:
    """``extra_args`` with every tensor shaped per batch item (such as an inpainting ``denoise_mask``) narrowed to
    the one item kept."""
    return {name: value[position:position + 1] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch
            and batch > 1 else value for name, value in extra_args.items()}


@torch.no_grad()
def run_nested(model: Any, x: torch.Tensor, sigmas: torch.Tensor, inner_sigmas: Sequence[torch.Tensor],
               inner_solver: SolverFn, extra_args: Optional[dict] = None, *, rule: OuterStepRule = OuterStepRule(),
               hooks: RunHooks = RunHooks(), index_offset: int = 0, max_calls: int = 0,
               outer_noise: Optional[OuterNoiseFn] = None, batch_indices: Optional[Sequence[int]] = None) -> NestedResult:
    """Nested diffusion over the outer ``sigmas``: at outer step k, a complete inner diffusion over
    ``inner_sigmas[k]`` (from that sigma down to 0) with ``inner_solver`` (k-diffusion signature), whose result
    moves the outer state on by ``rule``. ``hooks`` report and steer it (``RunHooks``).

    A run that ends early (a stop rule, Finish now, ``max_calls``) where ``sigmas`` ends above 0 (a stage with
    leftover noise) ends with its latest inner result diffused afresh to the last sigma, so that the next stage
    continues from a true state there. ``index_offset``: where ``sigmas`` starts in the whole outer schedule (a later
    stage). ``batch_indices``: the items' indices in the original batch (their outer noise follows them).
    ``max_calls`` > 0: a hard limit on model evaluations; an inner diffusion that would need more is cut and the run
    ends with the previous inner result; cut in the first outer step it is an error. ``hooks.replan`` may give new
    outer sigmas after step k (ending with the same last sigma; ``inner_sigmas`` must then hold their inner
    schedules: a sequence the caller keeps up to date): ``update_seconds`` chooses the inner lengths this way.
    """
    result: Optional[NestedResult] = None
    try:
        if hooks.on_start is not None:
            hooks.on_start(x)
        result = _outer_steps(model, x, sigmas, inner_sigmas, inner_solver, extra_args, rule, hooks, index_offset,
                              max_calls, outer_noise, batch_indices)
        return result
    finally:
        if hooks.on_end is not None:
            hooks.on_end(result)


def _outer_steps(model: Any, x: torch.Tensor, sigmas: torch.Tensor, inner_sigmas: Sequence[torch.Tensor],
                 inner_solver: SolverFn, extra_args: Optional[dict], rule: OuterStepRule, hooks: RunHooks,
                 index_offset: int, max_calls: int, outer_noise: Optional[OuterNoiseFn],
                 batch_indices: Optional[Sequence[int]]) -> NestedResult:
    """``run_nested``'s outer loop."""
    extra_args = {} if extra_args is None else extra_args
    noise_fn = outer_noise if outer_noise is not None else seeded_outer_noise(extra_args.get("seed"))
    items = list(batch_indices) if batch_indices is not None and len(batch_indices) == x.shape[0] else list(range(x.shape[0]))
    outer_sigmas = [float(s) for s in sigmas]
    latest: Optional[torch.Tensor] = None  # the latest inner result (an early end returns it)
    kept: Optional[int] = None
    index = -1
    # Held through the next inner diffusion where a max_nfe cut or Finish now may end the run with it (otherwise the
    # run's result takes the last one: one latent less at the peak).
    holds_latest = max_calls > 0 or hooks.finish_now is not None

    def steer(state: torch.Tensor) -> None:
        """Before every model evaluation: Finish now, or a pick of one batch item."""
        if latest is not None and hooks.finish_now is not None and hooks.finish_now():
            raise FinishedAtModelCall
        if hooks.take_pick is None or kept is not None or counted.keep is not None or state.shape[0] < 2 \
                or getattr(state, "is_nested", False) or state.shape[0] != len(items):
            return
        position = hooks.take_pick(state.shape[0])
        if position is not None and 0 <= position < state.shape[0]:
            counted.keep = position
            if hooks.on_pick is not None:
                hooks.on_pick(index - 1, position, items[position])

    counted = CountedModel(model, hooks.on_model_call, limit=max_calls, before_call=steer)

    def ended(x0: torch.Tensor, at: int, reason: str) -> NestedResult:
        kept_at_end, end_items = kept, items
        if kept is None and counted.keep is not None:  # a pick during the dropped inner diffusion
            kept_at_end = counted.keep
            x0, end_items = x0[kept_at_end:kept_at_end + 1], [items[kept_at_end]]
        state = x0
        if outer_sigmas[-1] > 0:  # a stage handing on leftover noise: x0 diffused afresh to its last sigma
            handover = seeded_outer_noise(extra_args.get("seed"), stream=2)(at + index_offset, x0, end_items)
            state = renoise_step(x0, outer_sigmas[-1], handover, rule.flow, rule.noise_scale)
        return NestedResult(state, reason, x0, counted.calls, kept_at_end)

    while index + 2 < len(outer_sigmas):
        index += 1
        sigma, sigma_next = outer_sigmas[index], outer_sigmas[index + 1]
        # a copy: some solvers write into the schedule they are given (uni_pc sets its final 0 to 0.001 in place)
        schedule = inner_sigmas[index].to(device=x.device, copy=True)
        tap = TrajectoryTap(sigma_next, x) if rule.trajectory and sigma_next > 0 else None
        started = time.monotonic()
        try:
            x0 = inner_solver(counted, x, schedule, callback=tap, disable=True,
                              extra_args=_inner_extra_args(extra_args, index + index_offset, schedule))
        except ModelCallLimitReached:
            if latest is None:
                raise NestedDiffusionError(
                    f"max_nfe {max_calls} was used up before the first inner diffusion ended (the inner solver spent "
                    f"more model evaluations on this model than measured): raise max_nfe, or use fewer inner steps"
                ) from None
            return ended(latest, index - 1, "max_nfe")
        except FinishedAtModelCall:
            return ended(latest, index - 1, "finish requested")
        if counted.keep is not None:  # a pick during this inner diffusion: only the kept item was evaluated
            position, counted.keep = counted.keep, None
            x, x0, extra_args = x[position:position + 1], x0[position:position + 1], narrow_batch(extra_args, position, x.shape[0])
            kept, items = position, [items[position]]
            if tap is not None:
                tap.narrow(position)
        if hooks.replan is not None and sigma_next > 0:
            following = hooks.replan(index, counted.calls, time.monotonic() - started)
            if following is not None:
                outer_sigmas = outer_sigmas[:index + 1] + _checked_tail(sigma, following, outer_sigmas[-1])
                sigma_next = outer_sigmas[index + 1]
        if hooks.on_inner_result is not None:
            hooks.on_inner_result(index, x, x0)
        reason = hooks.stop_rule(index, counted.calls) if hooks.stop_rule is not None else None
        if reason is not None:
            return ended(x0, index, reason)
        x = _next_outer_state(x, x0, sigma, sigma_next, rule, tap, lambda: noise_fn(index + index_offset, x, items))
        latest = x0 if holds_latest or index + 2 >= len(outer_sigmas) else None
        del x0, tap
    return NestedResult(x, None, latest, counted.calls, kept)


def _next_outer_state(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float, rule: OuterStepRule,
                      tap: Optional[TrajectoryTap], draw_noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The outer step by ``rule``. A trajectory step whose solver reported no usable state (a third-party solver
    without callbacks, stale reports) re-noises instead: exact whenever ``x0`` has the data's marginal."""
    continued = tap.state_at(sigma_next) if tap is not None else None
    if continued is not None:
        return continued
    noise = draw_noise() if rule.needs_noise(sigma_next) else None
    return outer_step(x, x0, sigma, sigma_next, rule.eta, rule.s_noise, noise, rule.flow, rule.renoise or rule.trajectory,
                      rule.noise_scale)


def _checked_tail(sigma: float, following: Sequence[float], last: float) -> list[float]:
    tail = [float(s) for s in following]
    if not tail or tail[-1] != last or any(not math.isfinite(s) for s in tail) \
            or any(a <= b for a, b in zip([sigma, *tail], tail)):
        raise NestedDiffusionError(f"a re-planned outer schedule must decrease from {sigma} to {last}, got {tail}")
    return tail

