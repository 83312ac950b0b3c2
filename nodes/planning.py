"""Planning a nested run before any model call: the inner solver, the outer and inner schedules, the measured
cost of every inner process, which outer step "auto" takes and the update_seconds pacing, into one ``RunPlan``.

Everything model-specific comes from ComfyUI itself (``sampler_object``, ``calculate_sigmas``); the algorithm lives
in ``nested_core``.
"""
from __future__ import annotations

import functools
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import comfy.model_sampling
import comfy.samplers
import torch

from ..nested_core import (
    IntervalPacer,
    NestedDiffusionError,
    OuterStepRule,
    check_update_seconds,
    denoise_start_sigma,
    inner_steps_per_outer,
    largest_count_that_works,
    outer_schedule,
    paced_outer_sigmas,
    path_schedules,
    renoise_step,
    truncated_schedule,
)
from ..nested_core.pacing import MAX_OUTER_STEPS
from . import schedule_cache
from .solver_cost import measure_inner_costs, solver_key
from .solver_probe import measured_posterior_ratio, outer_step_for_ratio


@dataclass(frozen=True)
class InnerSolverSpec:
    """What runs inside every outer step (the NESTED_INNER_SOLVER value passed between nodes)."""

    sampler_name: str
    scheduler: str
    steps: int
    eta: Optional[float] = None
    s_noise: Optional[float] = None
    step_schedule: str = ""
    steps_input: str = "inner_steps"  # how error messages name the steps: the input the user set them with

    def steps_per_outer(self, outer_steps: int) -> list[int]:
        return inner_steps_per_outer(outer_steps, self.steps, self.step_schedule)


@dataclass(frozen=True)
class RunLimits:
    """Ways to end a run early and keep its latest image (0 = no limit)."""

    max_nfe: int = 0
    max_seconds: float = 0.0


@dataclass(frozen=True)
class NestedSettings:
    """What every nested sampler node takes besides model, conditioning and latent: checked once, here."""

    spec: InnerSolverSpec
    outer_eta: float = 0.0
    outer_step: str = "auto"
    limits: RunLimits = RunLimits()
    update_seconds: float = 0.0  # > 0: inner lengths chosen for a new image about this often (PacedPlan)

    def __post_init__(self) -> None:
        OuterStepRule(eta=self.outer_eta)  # refuses an outer_eta outside 0..1, naming it
        check_outer_step_mode(self.outer_step)
        check_update_seconds(self.update_seconds)
        if self.outer_step == "path" and self.update_seconds > 0:
            raise NestedDiffusionError("outer_step path walks a grid fixed before the run; update_seconds re-spaces the "
                                       "outer steps as it goes: set update_seconds to 0 or choose another outer_step")


def check_solver_names(spec: InnerSolverSpec) -> None:
    if spec.sampler_name not in comfy.samplers.SAMPLER_NAMES:
        raise NestedDiffusionError(f"sampler_name {spec.sampler_name!r} is not one of ComfyUI's samplers: {', '.join(comfy.samplers.SAMPLER_NAMES)}")
    if spec.scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise NestedDiffusionError(f"scheduler {spec.scheduler!r} is not one of ComfyUI's schedulers: {', '.join(comfy.samplers.SCHEDULER_NAMES)}")


# Step count -> sigmas as KSampler builds them: cached by bytes, vectorised where ComfyUI loops, cancellable.
schedule_function = schedule_cache.schedule_function


def inner_solver_function(spec: InnerSolverSpec) -> tuple[Callable[..., torch.Tensor], dict]:
    """ComfyUI's own solver for ``sampler_name``, with eta / s_noise bound where it takes them."""
    sampler = comfy.samplers.sampler_object(spec.sampler_name)
    options = dict(sampler.extra_options)
    accepted = inspect.signature(sampler.sampler_function).parameters
    for name in ("eta", "s_noise"):
        value = getattr(spec, name)
        if value is not None and name in accepted:
            options[name] = value
    return functools.partial(sampler.sampler_function, **options), dict(sampler.inpaint_options)


def is_flow_model(model_sampling: Any) -> bool:
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def outer_noise_matches_model(model_sampling: Any, flow: bool) -> bool:
    """Whether the model puts a latent at sigma ``s`` where nested outer steps put it: ``x0 + s * noise`` (flow:
    ``(1 - s) x0 + s * noise``), asked of ComfyUI's own ``noise_scaling``. Image-to-image models start from the
    image instead (ComfyUI's IMG_TO_IMG_FLOW sampling ignores the noise): a fresh outer step means nothing to them."""
    noise_scale = float(getattr(model_sampling, "noise_scale", 1.0))
    x0 = torch.full((1, 1, 2, 2), 0.25)
    noise = torch.tensor([1.0, -2.0, 0.5, 3.0]).view(1, 1, 2, 2)
    for sigma in (0.3, 0.7):  # below 1 for flow models; either is a valid sigma for every model family
        try:
            placed = model_sampling.noise_scaling(torch.tensor(sigma), noise.clone(), x0.clone(), max_denoise=False)
        except Exception:  # a third-party model sampling that can't answer on CPU: trust it as before
            return True
        expected = renoise_step(x0, sigma, noise, flow, noise_scale)
        if not torch.allclose(torch.as_tensor(placed, dtype=expected.dtype), expected, rtol=1e-4, atol=1e-5):
            return False
    return True


def check_outer_steps_fit_model(model_sampling: Any, flow: bool, outer_steps: int) -> None:
    if outer_steps > 1 and not outer_noise_matches_model(model_sampling, flow):
        raise NestedDiffusionError(
            f"outer_steps {outer_steps}: this model ({type(model_sampling).__name__}) does not start from noise, so "
            f"nested outer steps cannot re-noise its images; outer_steps must be 1 for it (sampling as KSampler does)")


@dataclass
class NestedPlan:
    """Everything one nested run (or one stage of it) needs, resolved and checked before any model call."""

    outer_sigmas: torch.Tensor
    steps_per_outer: list[int]
    nfe_per_outer: list[int]
    nfe_exact: bool
    solver: Callable[..., torch.Tensor]
    inpaint_options: dict
    flow: bool
    inner_sigmas: list[torch.Tensor] = field(default_factory=list)
    first_outer_index: int = 0  # where this stage starts in the whole outer schedule
    total_outer_steps: int = 0
    nfe_before: int = 0  # NFEs the earlier stages spend
    outer_scheduler: Optional[str] = None  # the scheduler that spaced the outer steps (None: connected sigmas)
    walks_path: bool = False  # built for the "path" outer step (``path_schedules``)

    @property
    def nfe_total(self) -> int:
        return sum(self.nfe_per_outer)

    @property
    def takes_outer_steps(self) -> bool:
        """Whether any outer step moves the state on (one outer step to 0 is exactly KSampler)."""
        return bool((self.outer_sigmas[1:] > 0).any())

    def stage(self, start: int, end: int, full_denoise: bool = False) -> "NestedPlan":
        """Outer steps ``start`` to ``end - 1`` of this plan, as a plan of their own. It ends at the noisy outer
        state at sigma ``end``, or with ``full_denoise`` at its last inner result (its last sigma becomes 0)."""
        outer_sigmas = self.outer_sigmas[start:end + 1].clone()
        if full_denoise:
            outer_sigmas[-1] = 0.0
        return NestedPlan(
            outer_sigmas=outer_sigmas,
            steps_per_outer=self.steps_per_outer[start:end],
            nfe_per_outer=self.nfe_per_outer[start:end],
            nfe_exact=self.nfe_exact,
            solver=self.solver,
            inpaint_options=self.inpaint_options,
            flow=self.flow,
            inner_sigmas=self.inner_sigmas[start:end],
            first_outer_index=self.first_outer_index + start,
            total_outer_steps=self.total_outer_steps,
            nfe_before=self.nfe_before + sum(self.nfe_per_outer[:start]),
            outer_scheduler=self.outer_scheduler,
            walks_path=self.walks_path,
        )


def outer_sigmas_from(sigmas: torch.Tensor) -> torch.Tensor:
    """Connected SIGMAS as outer steps, read the way NestedKSampler builds its own schedule.

    A schedule that ends at 0 loses its last non-zero sigma (the scheduler's floor, where no inner
    diffusion can run; the last inner process ends at 0 anyway), so BasicScheduler with N + 1 steps
    gives N outer steps. A schedule that ends above 0 (the first half of SplitSigmas) is kept whole
    and the result is the noisy outer state at its last sigma.
    """
    sigmas = sigmas.detach().to(dtype=torch.float32, device="cpu").flatten()
    if sigmas.numel() < 2 or not bool(torch.isfinite(sigmas).all()) or float(sigmas[-1]) < 0:
        raise NestedDiffusionError(f"sigmas must hold at least 2 finite values >= 0 (one outer step), got "
                                   f"{sigmas_listed(sigmas)}")
    not_decreasing = torch.nonzero(sigmas[:-1] <= sigmas[1:]).flatten()
    if not_decreasing.numel():
        at = int(not_decreasing[0])
        raise NestedDiffusionError(f"sigmas must be strictly decreasing to be used as outer steps: sigma {at} "
                                   f"({float(sigmas[at]):.6g}) is not above sigma {at + 1} ({float(sigmas[at + 1]):.6g}) "
                                   f"in {sigmas_listed(sigmas)}")
    if float(sigmas[-1]) == 0.0 and sigmas.numel() >= 3:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def sigmas_listed(sigmas: torch.Tensor, shown: int = 6) -> str:
    """A schedule for an error message: whole when short, else its ends and its length (one may hold 10000)."""
    values = [f"{value:.6g}" for value in sigmas.tolist()]
    if len(values) <= shown:
        return f"[{', '.join(values)}]"
    half = shown // 2
    return f"[{', '.join(values[:half])}, ..., {', '.join(values[-half:])}] ({len(values)} values)"


def other_schedulers(scheduler: str) -> str:
    return " or ".join([name for name in ("normal", "karras", "exponential") if name != scheduler][:2])


FIT_SEARCH_SECONDS = 0.5  # the "at most N fit" answer: counted down for this long, then a binary search's answer


def largest_outer_steps_that_fit(schedule_fn: Callable[[int], torch.Tensor], outer_steps: int, start: Optional[float]) -> int:
    """Counted down one by one, since some schedulers (ddim_uniform) fit 200 outer steps but not 150; when that
    takes longer than FIT_SEARCH_SECONDS, the largest count a binary search finds (one that fits, its next does not)."""
    def fits(count: int) -> bool:
        schedule_cache.planning_checkpoint()
        try:
            outer_schedule(schedule_fn, count, start)
            return True
        except NestedDiffusionError:
            return False

    deadline = time.monotonic() + FIT_SEARCH_SECONDS
    for count in range(outer_steps - 1, 0, -1):
        if fits(count):
            return count
        if time.monotonic() > deadline:
            return largest_count_that_works(lambda n: outer_schedule(schedule_fn, n, start), count)
    return 0


def build_outer_sigmas(model_sampling: Any, scheduler: str, outer_steps: int, start: Optional[float]) -> torch.Tensor:
    schedule_fn = schedule_function(model_sampling, scheduler)
    try:
        return outer_schedule(schedule_fn, outer_steps, start)
    except NestedDiffusionError as error:
        fits = largest_outer_steps_that_fit(schedule_fn, outer_steps, start)
        raise NestedDiffusionError(
            f"outer_steps {outer_steps} is beyond the resolution of scheduler '{scheduler}' for this model: at most "
            f"{fits} outer steps fit; use fewer or another scheduler such as {other_schedulers(scheduler)} ({error})"
        ) from None


def build_inner_sigmas(inner_fn: Callable[[int], torch.Tensor], spec: InnerSolverSpec, steps: list[int],
                       outer_sigmas: torch.Tensor) -> list[torch.Tensor]:
    inner_sigmas = []
    for index, count in enumerate(steps):
        schedule_cache.planning_checkpoint()  # Cancel while planning many outer steps
        sigma = float(outer_sigmas[index])
        try:
            inner_sigmas.append(truncated_schedule(inner_fn, count, sigma))
        except NestedDiffusionError:
            fits = largest_count_that_works(lambda n: truncated_schedule(inner_fn, n, sigma, scan_all=False), count)
            name = f"step_schedule entry {index + 1}" if spec.step_schedule else spec.steps_input
            raise NestedDiffusionError(
                f"{name} {count} is beyond the resolution of scheduler '{spec.scheduler}' for this model at outer step "
                f"{index + 1} (sigma {sigma:.3g}): at most {fits} inner steps fit there; use fewer or another "
                f"scheduler such as {other_schedulers(spec.scheduler)}"
            ) from None
    return inner_sigmas


@schedule_cache.planning  # single-threaded: thousands of small tensor operations
def plan_nested_run(model_sampling: Any, spec: InnerSolverSpec, outer_steps: int, outer_scheduler: Optional[str] = None,
                    denoise: float = 1.0, outer_sigmas: Optional[torch.Tensor] = None, path: bool = False) -> NestedPlan:
    """Resolve schedules, solver and NFE budget; raises NestedDiffusionError naming any bad input.

    The outer schedule is ``outer_scheduler``'s (with KSampler's ``denoise`` start), or ``outer_sigmas``
    as given (already checked by ``outer_sigmas_from``). ``path``: the "path" outer step's schedules instead, the
    inner solver's scheduler's own grid (``path_schedules``).
    """
    check_solver_names(spec)
    outer_sigmas_given = outer_sigmas
    steps = spec.steps_per_outer(outer_steps)
    inner_fn = schedule_function(model_sampling, spec.scheduler, spec.sampler_name)
    if path:
        outer_sigmas, inner_sigmas = path_schedules(inner_fn, steps, denoise)
    else:
        if outer_sigmas is None:
            start = denoise_start_sigma(inner_fn, sum(steps), denoise, f"scheduler '{spec.scheduler}' for this model "
                                        f"({outer_steps} outer_steps x {spec.steps_input})")
            if start is None and outer_steps == 1:  # exactly KSampler with the inner steps
                start = float(inner_fn(steps[0])[0])
            outer_sigmas = build_outer_sigmas(model_sampling, outer_scheduler, outer_steps, start)
        inner_sigmas = build_inner_sigmas(inner_fn, spec, steps, outer_sigmas)
    solver, inpaint_options = inner_solver_function(spec)
    flow = is_flow_model(model_sampling)
    check_outer_steps_fit_model(model_sampling, flow, len(outer_sigmas) - 1)
    # Measured by running the bound solver on a counting stand-in (solver_cost), never looked up by its name
    costs = measure_inner_costs(solver, inner_sigmas, flow, model_sampling)
    return NestedPlan(
        outer_sigmas=outer_sigmas,
        steps_per_outer=steps,
        nfe_per_outer=[cost.nfe for cost in costs],
        nfe_exact=all(cost.exact for cost in costs),
        solver=solver,
        inpaint_options=inpaint_options,
        flow=flow,
        inner_sigmas=inner_sigmas,
        total_outer_steps=len(outer_sigmas) - 1,
        outer_scheduler=outer_scheduler if outer_sigmas_given is None else None,
        walks_path=path,
    )


def plan_node_run(model_sampling: Any, spec: InnerSolverSpec, outer_steps: int, scheduler: str, denoise: float = 1.0,
                  path: bool = False, stage: Optional[tuple[int, int, bool]] = None) -> NestedPlan:
    """The NestedKSampler nodes' plan: ``outer_steps`` spaced by their ``scheduler`` from ``denoise``'s start (``path``:
    the path outer step's grid), and with ``stage`` (start, end, full_denoise) only those outer steps, as
    NestedKSamplerAdvanced runs them (``NestedPlan.stage``)."""
    plan = plan_nested_run(model_sampling, spec, outer_steps, scheduler, denoise, path=path)
    return plan if stage is None else plan.stage(*stage)


OUTER_STEP_MODES = ("auto", "ddim", "renoise", "trajectory", "path")
_POSTERIOR_PROBES: dict = {}  # (solver, options, schedule, flow, channels) -> "ddim" / "renoise", bounded below
POSTERIOR_PROBE_CACHE_LIMIT = 256


def check_outer_step_mode(mode: str) -> str:
    if mode not in OUTER_STEP_MODES:
        raise NestedDiffusionError(f"outer_step must be one of {', '.join(OUTER_STEP_MODES)}, got {mode!r}")
    return mode


def _probe_key(plan: NestedPlan, inner_sigmas: torch.Tensor, channels: int) -> tuple:
    return (solver_key(plan.solver), tuple(inner_sigmas.tolist()), plan.flow, channels)


def resolve_outer_step_mode(mode: str, plan: NestedPlan, model_wrap: Any, channels: int) -> str:
    """The outer step a run takes: as asked, or for "auto" what the measured solver needs ("ddim" or "renoise")."""
    if mode == "path" and not plan.walks_path:
        raise NestedDiffusionError(
            "outer_step path walks KSampler's own grid, which NestedKSampler and NestedKSamplerAdvanced build from "
            "their scheduler; with connected sigmas (SamplerCustom) use trajectory, the closest step")
    if mode != "auto":
        return check_outer_step_mode(mode)
    return measured_outer_step(plan, model_wrap, channels) if plan.takes_outer_steps else "ddim"


def measured_outer_step(plan: NestedPlan, model_wrap: Any, channels: int) -> str:
    """The outer step "auto" takes: the inner solver's posterior ratio, probed over the middle outer step's own inner
    schedule, decides (``solver_probe.outer_step_for_ratio``)."""
    inner_sigmas = plan.inner_sigmas[len(plan.inner_sigmas) // 2]
    key = _probe_key(plan, inner_sigmas, channels)
    if key not in _POSTERIOR_PROBES:
        if len(_POSTERIOR_PROBES) >= POSTERIOR_PROBE_CACHE_LIMIT:
            _POSTERIOR_PROBES.clear()
        ratio = measured_posterior_ratio(plan.solver, inner_sigmas, model_wrap, plan.flow, channels)
        _POSTERIOR_PROBES[key] = outer_step_for_ratio(ratio, plan.flow)
    return _POSTERIOR_PROBES[key]


def plan_from_sigmas(model_sampling: Any, spec: InnerSolverSpec, sigmas: torch.Tensor) -> NestedPlan:
    """The plan for connected SIGMAS (SamplerCustom): their outer steps as ``outer_sigmas_from`` reads them."""
    outer_sigmas = outer_sigmas_from(sigmas)
    outer_steps = len(outer_sigmas) - 1
    try:
        return plan_nested_run(model_sampling, spec, outer_steps, outer_sigmas=outer_sigmas)
    except NestedDiffusionError as error:  # its messages speak of NestedKSampler's outer_steps input
        raise NestedDiffusionError(f"{error} (outer_steps: the {outer_steps} outer steps of the connected sigmas, "
                                   f"{len(sigmas)} values)") from None


class PacedPlan:
    """A plan whose inner lengths follow ``update_seconds`` (``nested_core.pacing``): after every inner process the
    outer steps left are placed again, from the current outer sigma down with the outer scheduler (the inner
    scheduler where the outer steps came as connected sigmas), and their inner schedules built as the plan's are.
    A re-plan replaces ``outer_sigmas``, ``steps`` and ``nfe`` with new lists (the reporter reads them from here, the
    stop rule is handed the new costs); ``inner_sigmas`` builds each inner schedule when the run first asks for it.
    Only for a plan that ends at 0 (a stage handing on leftover noise keeps its plan)."""

    def __init__(self, plan: NestedPlan, model_sampling: Any, spec: InnerSolverSpec, update_seconds: float):
        self.plan = plan
        self.spec = spec
        self.model_sampling = model_sampling
        self.update_seconds = update_seconds
        self.outer_sigmas = [float(s) for s in plan.outer_sigmas]
        self.steps = list(plan.steps_per_outer)
        self.nfe = list(plan.nfe_per_outer)
        self.inner_sigmas = PacedInnerSchedules(self)
        # However short update_seconds, no more outer steps than the nodes allow (or the connected sigmas gave)
        self.pacer = IntervalPacer(update_seconds, sum(self.steps), max_outer_steps=max(
            MAX_OUTER_STEPS - plan.first_outer_index, len(self.steps)))
        self.outer_fn = schedule_function(model_sampling, plan.outer_scheduler or spec.scheduler)
        self.inner_fn = schedule_function(model_sampling, spec.scheduler, spec.sampler_name)
        self.nfe_seen = 0

    @staticmethod
    def applies(plan: NestedPlan, update_seconds: float) -> bool:
        return update_seconds > 0 and float(plan.outer_sigmas[-1]) == 0.0 and len(plan.steps_per_outer) >= 1

    def inner_schedule(self, index: int) -> torch.Tensor:
        return truncated_schedule(self.inner_fn, self.steps[index], self.outer_sigmas[index])

    def replan(self, index: int, nfe_done: int, seconds: float) -> Optional[list[float]]:
        """``run_nested``'s ``replan``: the outer sigmas after outer step ``index``, or None to keep the plan."""
        calls, self.nfe_seen = nfe_done - self.nfe_seen, nfe_done
        counts = self.pacer.update(sum(self.steps[:index + 1]), self.steps[index], calls, seconds)
        if not counts:
            return None
        try:
            tail = [float(s) for s in paced_outer_sigmas(self.outer_fn, self.outer_sigmas[index], len(counts))]
            following = truncated_schedule(self.inner_fn, counts[0], tail[0])
        except NestedDiffusionError:  # beyond a scheduler's resolution: the plan so far stands
            self.inner_sigmas.prepare(index + 1)
            return None
        measured = measure_inner_costs(self.plan.solver, [following], self.plan.flow, self.model_sampling)[0].nfe
        # New lists, not edits of the old ones: whoever reads the plan asks this PacedPlan for its current lists.
        self.outer_sigmas = self.outer_sigmas[:index + 1] + tail
        self.steps = self.steps[:index + 1] + list(counts)
        # the next inner process's cost as measured; the later ones' at the same calls per step
        per_step = measured / max(counts[0], 1)
        self.nfe = self.nfe[:index + 1] + [measured] + [max(1, math.ceil(count * per_step - 1e-9)) for count in counts[1:]]
        self.inner_sigmas.replanned(index + 1, following)
        return tail


class PacedInnerSchedules:
    """The inner schedules of a PacedPlan, built when first asked for (a re-plan places every outer step left, but
    only the next one surely runs as placed)."""

    def __init__(self, paced: PacedPlan):
        self.paced = paced
        self.built: dict[int, torch.Tensor] = dict(enumerate(paced.plan.inner_sigmas))

    def __len__(self) -> int:
        return len(self.paced.steps)

    def __getitem__(self, index: int) -> torch.Tensor:
        if index not in self.built:
            self.prepare(index)
        return self.built[index]

    def prepare(self, index: int) -> None:
        if index not in self.built and index < len(self.paced.steps):
            self.built[index] = self.paced.inner_schedule(index)

    def replanned(self, index: int, schedule: torch.Tensor) -> None:
        self.built = {k: v for k, v in self.built.items() if k < index}
        self.built[index] = schedule


@dataclass(frozen=True)
class RunPlan:
    """Everything one run needs, settled before its first model call: the schedules and their measured costs
    (``nested``), the node's settings, the outer step it takes ("auto" resolved), the rule that moves the outer state
    and the update_seconds pacing (None: off). ``inner_sigmas``: the inner schedules the run asks for (the paced
    plan's, placed again as it goes, or the plan's)."""

    nested: NestedPlan
    settings: NestedSettings
    outer_step_mode: str
    rule: OuterStepRule
    paced: Optional[PacedPlan]
    inner_sigmas: Any


def plan_run(settings: NestedSettings, plan: Optional[NestedPlan], model_wrap: Any, sigmas: torch.Tensor,
             channels: int) -> RunPlan:
    """The plan of one run, made when ComfyUI hands the sampler its guider (``model_wrap``) and before the first model
    call: ``plan`` (the NestedKSampler nodes' own, made before ComfyUI loads the model) or the connected ``sigmas``'
    (SamplerCustom), then the outer step ("auto" probes the inner solver against ComfyUI's guider, which exists only
    now), the update_seconds pacing and the outer step rule."""
    model_sampling = model_wrap.inner_model.model_sampling
    nested = plan if plan is not None else plan_from_sigmas(model_sampling, settings.spec, sigmas)
    paced = None
    if PacedPlan.applies(nested, settings.update_seconds):
        paced = PacedPlan(nested, model_sampling, settings.spec, settings.update_seconds)
    mode = resolve_outer_step_mode(settings.outer_step, nested, model_wrap, channels)
    # A flow model's noise can be scaled (model_sampling.noise_scale, ComfyUI 0.21.1 on): fresh outer noise too.
    rule = OuterStepRule(eta=settings.outer_eta, flow=nested.flow, renoise=mode == "renoise",
                         trajectory=mode in ("trajectory", "path"),
                         noise_scale=float(getattr(model_sampling, "noise_scale", 1.0)))
    return RunPlan(nested, settings, mode, rule, paced, paced.inner_sigmas if paced is not None else nested.inner_sigmas)
