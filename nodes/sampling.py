"""ComfyUI glue for nested sampling: solvers, schedules, progress, previews and events.

Everything model-specific comes from ComfyUI itself (``sampler_object``, ``calculate_sigmas``,
``latent_preview``, ``ProgressBar``, ``PromptServer``); the algorithm lives in ``nested_core``.
"""
from __future__ import annotations

import functools
import inspect
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch

from ..nested_core import (
    NestedDiffusionError,
    StopRule,
    check_number,
    denoise_start_sigma,
    inner_steps_per_outer,
    largest_count_that_works,
    nfe_for_inner_process,
    outer_schedule,
    projected_costs,
    sample_nested,
    spent_per_inner_process,
    truncated_schedule,
)
from . import rerun, schedule_cache
from .finish import finishable_run
from .kept_previews import KeptPreviews, KeptStep
from .solver_cost import measure_inner_costs, solver_key
from .solver_probe import inner_solver_is_posterior_sampler

OUTER_STEP_EVENT = "nested_diffusion.outer_step"
PREVIEW_FORMAT = "JPEG"


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

    @property
    def nfe_total(self) -> int:
        return sum(self.nfe_per_outer)

    def inner_schedule(self, index: int, sigma: float) -> torch.Tensor:
        return self.inner_sigmas[index]

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
        raise NestedDiffusionError(f"sigmas must hold at least 2 finite values >= 0 (one outer step), got {sigmas.tolist()}")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise NestedDiffusionError(f"sigmas must be strictly decreasing to be used as outer steps, got {sigmas.tolist()}")
    if float(sigmas[-1]) == 0.0 and sigmas.numel() >= 3:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


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
                    denoise: float = 1.0, outer_sigmas: Optional[torch.Tensor] = None) -> NestedPlan:
    """Resolve schedules, solver and NFE budget; raises NestedDiffusionError naming any bad input.

    The outer schedule is ``outer_scheduler``'s (with KSampler's ``denoise`` start), or ``outer_sigmas``
    as given (already checked by ``outer_sigmas_from``).
    """
    check_solver_names(spec)
    steps = spec.steps_per_outer(outer_steps)
    inner_fn = schedule_function(model_sampling, spec.scheduler, spec.sampler_name)
    if outer_sigmas is None:
        start = denoise_start_sigma(inner_fn, sum(steps), denoise, f"scheduler '{spec.scheduler}' for this model "
                                    f"({outer_steps} outer_steps x {spec.steps_input})")
        if start is None and outer_steps == 1:  # exactly KSampler with the inner steps
            start = float(inner_fn(steps[0])[0])
        outer_sigmas = build_outer_sigmas(model_sampling, outer_scheduler, outer_steps, start)
    inner_sigmas = build_inner_sigmas(inner_fn, spec, steps, outer_sigmas)
    solver, inpaint_options = inner_solver_function(spec)
    flow = is_flow_model(model_sampling)
    # Measured by running the bound solver on a counting stand-in (solver_cost); the name table only where it can't run.
    costs = measure_inner_costs(solver, inner_sigmas, flow, model_sampling,
                                fallbacks=[nfe_for_inner_process(spec.sampler_name, count) for count in steps])
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
    )


@functools.lru_cache(maxsize=None)
def _prompt_server_class():
    """ComfyUI's PromptServer class, or None where ``server`` cannot be imported (looked up once, not per step)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return PromptServer


def send_to_prompt_client(event: str, data: dict) -> None:
    """Send a websocket event to the client that queued the running prompt (as ComfyUI's progress does)."""
    server = getattr(_prompt_server_class(), "instance", None)
    if server is not None:
        server.send_sync(event, data, server.client_id)


def _executing_context():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # ComfyUI releases before the execution context existed
        return None
    return get_executing_context()


def executing_prompt_id() -> Optional[str]:
    context = _executing_context()
    return context.prompt_id if context is not None else None


def executing_node_id() -> Optional[str]:
    context = _executing_context()
    return context.node_id if context is not None else None


class NestedRunReporter:
    """One progress bar per node run, counted in NFEs; a preview and an event after every inner process."""

    def __init__(self, model: Any, node_id: Optional[str], plan: NestedPlan, own_progress_bar: bool = True):
        self.node_id = node_id
        self.outer_sigmas = [float(s) for s in plan.outer_sigmas]
        self.first_outer_index = plan.first_outer_index
        self.outer_steps = plan.total_outer_steps or len(self.outer_sigmas) - 1
        self.nfe_before = plan.nfe_before
        self.nfe_total = max(plan.nfe_total, 1)
        self.nfe_planned = list(plan.nfe_per_outer)
        self.nfe_spent: list[int] = []  # what each inner process of this run really spent
        self.nfe_done = 0
        # Inside SamplerCustom(Advanced) the node's own bar already counts outer steps and shows the previews.
        self.progress = comfy.utils.ProgressBar(self.nfe_total) if own_progress_bar else None
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format) if own_progress_bar else None
        self.kept = KeptPreviews()  # for outer_previews: a bounded, evenly spread selection (kept_previews)
        self.outer_step_mode: Optional[str] = None  # "ddim" or "renoise", once "auto" is resolved

    def set_outer_step_mode(self, mode: str) -> None:
        self.outer_step_mode = mode

    def on_model_call(self, calls: int) -> None:
        self.nfe_done = calls
        if calls > self.nfe_total:  # adaptive solvers can only be estimated beforehand
            self.nfe_total = calls
        if self.progress is not None:
            self.progress.update_absolute(calls, self.nfe_total)  # its hook also honours Cancel
        else:
            comfy.model_management.throw_exception_if_processing_interrupted()

    def on_outer_step(self, index: int, x0: torch.Tensor, sigma: float) -> None:
        if getattr(x0, "is_nested", False):  # a multi-latent model's NestedTensor (ComfyUI 0.30.0 on): as ComfyUI's
            x0 = x0.tensors[0]  # own previews do, the previews and outer_previews show its first latent (the video)
        # The total: what the inner processes so far spent plus the projected cost of the rest (exact for solvers
        # whose model calls do not depend on the model; dpm_adaptive's follows what it really spends).
        self.nfe_spent = spent_per_inner_process(self.nfe_spent, self.nfe_done)
        self.nfe_total = max(sum(projected_costs(self.nfe_planned, self.nfe_spent)), self.nfe_done, 1)
        self.kept.add(KeptStep(index, x0.detach().to(comfy.model_management.intermediate_device(), copy=True),
                               self.nfe_before + self.nfe_done, sigma, self.first_outer_index + index + 1))
        if self.progress is not None:
            self.progress.update_absolute(self.nfe_done, self.nfe_total, self.preview_bytes(x0))
        send_to_prompt_client(OUTER_STEP_EVENT, {
            "node": self.node_id,
            "prompt_id": executing_prompt_id(),
            "outer_step": self.first_outer_index + index + 1,
            "outer_steps": self.outer_steps,
            "nfe": self.nfe_done,
            "nfe_total": self.nfe_total,
            "sigma": sigma,
            "outer_step_mode": self.outer_step_mode,
        })

    def preview_bytes(self, x0: torch.Tensor):
        if self.previewer is None:
            return None
        try:
            return self.previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, x0)
        except Exception as error:  # a preview must never fail the run
            logging.warning("nested diffusion: preview failed: %s", error)
            return None

    def ksampler_callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The ``callback(step, x0, x, total_steps)`` KSAMPLER calls once per outer step."""
        self.on_outer_step(step, x0, self.outer_sigmas[step])


OUTER_STEP_MODES = ("auto", "ddim", "renoise")
_POSTERIOR_PROBES: dict = {}  # (solver, options, schedule, flow, channels) -> bool, bounded below
POSTERIOR_PROBE_CACHE_LIMIT = 256


def check_outer_step_mode(mode: str) -> str:
    if mode not in OUTER_STEP_MODES:
        raise NestedDiffusionError(f"outer_step must be one of {', '.join(OUTER_STEP_MODES)}, got {mode!r}")
    return mode


def _probe_key(plan: NestedPlan, inner_sigmas: torch.Tensor, channels: int) -> tuple:
    return (solver_key(plan.solver), tuple(inner_sigmas.tolist()), plan.flow, channels)


def inner_solver_needs_renoise(plan: NestedPlan, model_wrap: Any, channels: int) -> bool:
    """Whether "auto" re-noises: the inner solver, probed over the middle outer step's own inner schedule, is not
    close enough to a posterior sampler for the eta-0 outer step (see ``solver_probe``)."""
    inner_sigmas = plan.inner_sigmas[len(plan.inner_sigmas) // 2]
    key = _probe_key(plan, inner_sigmas, channels)
    if key not in _POSTERIOR_PROBES:
        if len(_POSTERIOR_PROBES) >= POSTERIOR_PROBE_CACHE_LIMIT:
            _POSTERIOR_PROBES.clear()
        posterior = inner_solver_is_posterior_sampler(plan.solver, inner_sigmas, model_wrap, plan.flow, channels)
        _POSTERIOR_PROBES[key] = posterior is False  # a solver the probe cannot drive keeps the paper's step
    return _POSTERIOR_PROBES[key]


class NestedKSAMPLER(comfy.samplers.KSAMPLER):
    """KSAMPLER running the nested outer loop. It resolves the "auto" outer step against the real model before
    sampling. A run that ends early returns its last inner result; a stage whose schedule ends above sigma 0
    returns that result diffused afresh to its last sigma (``sample_nested``), a state the next stage continues."""

    def __init__(self, plan: NestedPlan, outer_mode: str, extra_options: dict,
                 on_outer_mode: Optional[Callable[[str], None]] = None):
        super().__init__(sample_nested, extra_options=extra_options, inpaint_options=plan.inpaint_options)
        self.plan = plan
        self.outer_mode = check_outer_step_mode(outer_mode)
        self.on_outer_mode = on_outer_mode

    def resolve_outer_mode(self, model_wrap: Any, channels: int) -> str:
        mode = self.outer_mode
        if mode == "auto":
            takes_outer_steps = bool((self.plan.outer_sigmas[1:] > 0).any())
            mode = "renoise" if takes_outer_steps and inner_solver_needs_renoise(self.plan, model_wrap, channels) else "ddim"
        if self.on_outer_mode is not None:
            self.on_outer_mode(mode)
        return mode

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        mode = self.resolve_outer_mode(model_wrap, int(noise.shape[1]) if noise.ndim >= 2 else 1)
        # A flow model's noise can be scaled (model_sampling.noise_scale, ComfyUI 0.21.1 on): fresh outer noise too.
        noise_scale = float(getattr(model_wrap.inner_model.model_sampling, "noise_scale", 1.0))
        self.extra_options = {**self.extra_options, "renoise": mode == "renoise", "noise_scale": noise_scale}
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


def nested_ksampler_object(plan: NestedPlan, outer_eta: float, s_noise: float = 1.0,
                           on_model_call: Optional[Callable[[int], None]] = None,
                           stop_after: Optional[Callable[[int, int], bool]] = None, outer_mode: str = "auto",
                           on_outer_mode: Optional[Callable[[str], None]] = None, max_calls: int = 0,
                           batch_indices: Optional[list[int]] = None) -> NestedKSAMPLER:
    """A ComfyUI SAMPLER whose sampler function is the nested outer loop; ``max_calls`` > 0 is a hard limit on
    model evaluations (``max_nfe``), even for a solver that spends more than measured."""
    options = {
        "max_calls": max_calls,
        "inner_solver": plan.solver,
        "inner_schedule": plan.inner_schedule,
        "outer_eta": outer_eta,
        "outer_s_noise": s_noise,
        "flow": plan.flow,
        "on_model_call": on_model_call,
        "stop_after": stop_after,
        "index_offset": plan.first_outer_index,
        "batch_indices": batch_indices,  # the latent's batch_index: each item's outer noise follows its index
    }
    return NestedKSAMPLER(plan, outer_mode, options, on_outer_mode)


def outer_previews_latent(reporter: NestedRunReporter, model: Any) -> dict:
    """All inner results, outer-major, with what a downstream node needs to label them."""
    kept = reporter.kept.steps
    batch = kept[0].latent.shape[0] if kept else 0
    samples = torch.cat([model.model.process_latent_out(step.latent) for step in kept]) if kept else torch.zeros(0)
    return {
        "samples": samples,
        "nested_outer_steps": reporter.outer_steps,
        "nested_outer_step_numbers": [s.number for s in kept],
        "nested_batch_size": batch,
        "nested_nfe": [s.nfe for s in kept],
        "nested_nfe_total": reporter.nfe_before + reporter.nfe_total,
        "nested_sigmas": [s.sigma for s in kept],
        "nested_outer_step_mode": reporter.outer_step_mode,
    }


def check_latent(model: Any, latent_image: torch.Tensor) -> None:
    """Refuse latents the model cannot denoise, before any model call."""
    expected = model.get_model_object("latent_format").latent_channels
    if not latent_image.is_nested and latent_image.ndim >= 2 and latent_image.shape[1] != expected:
        raise NestedDiffusionError(
            f"latent_image has {latent_image.shape[1]} channels but this model works on {expected}-channel latents: "
            f"use an empty latent or a VAE that matches the model"
        )
    if not latent_image.is_nested and not bool(torch.isfinite(latent_image).all()):
        raise NestedDiffusionError("latent_image contains NaN or Inf values: it must be finite")


@dataclass(frozen=True)
class RunLimits:
    """Ways to end a run early and keep its latest image (0 = no limit)."""

    max_nfe: int = 0
    max_seconds: float = 0.0


ReportingStopRule = rerun.reporting_stop_rule(StopRule)  # an early stop not given by the inputs defeats the cache


def stop_rule_for(plan: NestedPlan, limits: RunLimits, finish_flag=None) -> StopRule:
    return ReportingStopRule(
        nfe_per_outer=plan.nfe_per_outer,
        max_nfe=limits.max_nfe,
        max_seconds=limits.max_seconds,
        finish_requested=finish_flag.is_set if finish_flag is not None else None,
    )


def run_nested_sampling(model: Any, seed: int, cfg: float, positive, negative, latent: dict, plan: NestedPlan,
                        outer_eta: float, node_id: Optional[str], add_noise: bool = True,
                        limits: RunLimits = RunLimits(), outer_step: str = "auto") -> tuple[dict, dict]:
    """Sample like ``nodes.common_ksampler`` but with the nested outer loop; returns (samples, outer_previews)."""
    check_number("cfg", cfg, 0.0, 100.0)
    check_number("outer_eta", outer_eta, 0.0, 1.0)
    check_outer_step_mode(outer_step)
    latent_image = comfy.sample.fix_empty_latent_channels(model=model, latent_image=latent["samples"])
    check_latent(model, latent_image)
    if add_noise:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    reporter = NestedRunReporter(model, node_id, plan)
    with finishable_run(executing_prompt_id(), node_id) as finish_flag:
        stop_rule = stop_rule_for(plan, limits, finish_flag)
        sampler = nested_ksampler_object(plan, outer_eta, on_model_call=reporter.on_model_call, stop_after=stop_rule,
                                         outer_mode=outer_step, on_outer_mode=reporter.set_outer_step_mode,
                                         max_calls=limits.max_nfe, batch_indices=latent.get("batch_index"))
        samples = comfy.sample.sample_custom(
            model, noise, cfg, sampler, plan.outer_sigmas, positive, negative, latent_image,
            noise_mask=latent.get("noise_mask"), callback=reporter.ksampler_callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )
    if stop_rule.reason is not None:
        logging.info("nested diffusion: finished early (%s) after %d NFEs", stop_rule.reason, reporter.nfe_done)
    out = latent.copy()
    out["samples"] = samples
    return out, outer_previews_latent(reporter, model)


class NestedSamplerObject(comfy.samplers.KSAMPLER):
    """The SAMPLER NestedSampler outputs: the connected SIGMAS are the outer steps, the guider guides every inner step."""

    def __init__(self, spec: InnerSolverSpec, outer_eta: float, limits: RunLimits = RunLimits(), outer_step: str = "auto"):
        super().__init__(sample_nested)
        self.spec = spec
        self.outer_eta = check_number("outer_eta", outer_eta, 0.0, 1.0)
        self.outer_step = check_outer_step_mode(outer_step)
        self.limits = limits

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        outer_sigmas = outer_sigmas_from(sigmas)
        plan = plan_nested_run(model_wrap.inner_model.model_sampling, self.spec, len(outer_sigmas) - 1, outer_sigmas=outer_sigmas)
        reporter = NestedRunReporter(model_wrap.model_patcher, executing_node_id(), plan, own_progress_bar=False)

        def outer_callback(step, x0, x, total_steps):
            reporter.ksampler_callback(step, x0, x, total_steps)
            if callback is not None:
                callback(step, x0, x, total_steps)

        with rerun.running_node(getattr(self, "rerun_key", None)), \
                finishable_run(executing_prompt_id(), reporter.node_id) as finish_flag:
            sampler = nested_ksampler_object(plan, self.outer_eta, on_model_call=reporter.on_model_call,
                                             outer_mode=self.outer_step, on_outer_mode=reporter.set_outer_step_mode,
                                             stop_after=stop_rule_for(plan, self.limits, finish_flag),
                                             max_calls=self.limits.max_nfe)
            return sampler.sample(model_wrap, plan.outer_sigmas.to(sigmas.device), extra_args, outer_callback, noise,
                                  latent_image, denoise_mask, disable_pbar)
