"""The one SAMPLER that runs nested diffusion inside ComfyUI, and the KSampler-like way the nodes call it.

``NestedDiffusionSampler`` is a ComfyUI ``KSAMPLER``: SamplerCustom(Advanced) and the guider give it the model, the sigmas,
the noise and the latent, as to any sampler. It plans from the sigmas it is given (or takes the plan the
NestedKSampler nodes made from their own inputs), resolves the "auto" outer step against the real model, reports
progress, previews and events, honours Finish now, picks and the budgets, and runs ``nested_core.run_nested``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any, Optional

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..nested_core import (
    NestedDiffusionError,
    NestedResult,
    OuterStepRule,
    RunHooks,
    StopRule,
    check_number,
    check_update_seconds,
    run_nested,
)
from . import rerun, schedule_cache
from .planning import (
    InnerSolverSpec,
    NestedPlan,
    PacedPlan,
    check_outer_step_mode,
    plan_from_sigmas,
    resolve_outer_step_mode,
)
from .reporting import NestedRunReporter, executing_node_id, outer_previews_latent
from .steering import RunControl, finishable_run


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


class NestedDiffusionSampler(comfy.samplers.KSAMPLER):
    """Nested diffusion as a ComfyUI SAMPLER. ``plan``: the NestedKSampler nodes' own plan (their scheduler, denoise,
    stage); without it the connected sigmas are the outer steps (``outer_sigmas_from``). ``own_progress``: a
    progress bar and preview of its own (inside SamplerCustom, the node's bar and previews count outer steps).
    ``batch_indices``: the latent's ``batch_index`` (each item's outer noise follows its index). ``cached_output``:
    this sampler is a node's output (NestedSampler's SAMPLER), which ComfyUI's cache keeps for as long as the graph
    keeps the node, so after each run it holds no latents and no previewer: its result keeps only the stop reason,
    NFEs and pick."""

    def __init__(self, settings: NestedSettings, plan: Optional[NestedPlan] = None, own_progress: bool = False,
                 rerun_key: Optional[tuple] = None, batch_indices: Optional[list[int]] = None,
                 cached_output: bool = False):
        super().__init__(None)
        self.settings = settings
        self.plan = plan
        self.own_progress = own_progress
        self.rerun_key = rerun_key
        self.batch_indices = batch_indices
        self.cached_output = cached_output
        self.keep_previews = False  # sample_latent sets it: the NestedKSampler nodes' outer_previews output
        # The NestedKSampler nodes hand sample_custom ``report_outer_step`` as its callback, so that the reporter sees
        # each inner result as ComfyUI's guider hands callbacks it (a multi-latent model's x0 as a NestedTensor).
        self.reports_through_callback = False
        self.reporter: Optional[NestedRunReporter] = None  # the running or last run's (outer_previews come from it)
        self.last_result: Optional[NestedResult] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        model_sampling = model_wrap.inner_model.model_sampling
        plan = self.plan if self.plan is not None else plan_from_sigmas(model_sampling, self.settings.spec, sigmas)
        reporter = NestedRunReporter(model_wrap.model_patcher, executing_node_id(), plan, self.own_progress,
                                     self.batch_indices, keep_previews=self.keep_previews)
        paced = None
        if PacedPlan.applies(plan, self.settings.update_seconds):
            paced = PacedPlan(plan, model_sampling, self.settings.spec, self.settings.update_seconds)
            reporter.follow(paced)
        mode = resolve_outer_step_mode(self.settings.outer_step, plan, model_wrap, channels_of(noise))
        reporter.set_outer_step_mode(mode)
        self.reporter = reporter
        # A flow model's noise can be scaled (model_sampling.noise_scale, ComfyUI 0.21.1 on): fresh outer noise too.
        rule = OuterStepRule(eta=self.settings.outer_eta, flow=plan.flow, renoise=mode == "renoise",
                             trajectory=mode in ("trajectory", "path"), noise_scale=float(getattr(model_sampling, "noise_scale", 1.0)))
        self.inpaint_options = plan.inpaint_options
        results: list[NestedResult] = []
        with finishable_run(reporter.prompt_id, reporter.node_id) as control:
            control.set_batch_size(int(noise.shape[0]))  # what a pick may name
            reporter.run_batch_size = int(noise.shape[0])  # outer_previews tells Pick Candidate the stage's batch
            self.sampler_function = self.nested_function(plan, rule, reporter, control, results, paced)
            try:
                samples = super().sample(model_wrap, plan.outer_sigmas.to(sigmas.device), extra_args, callback, noise,
                                         latent_image, denoise_mask, disable_pbar)
            finally:
                self.sampler_function = None  # its closure holds the run's state
            rerun.run_ended(self.rerun_key, results[0])  # a stop or pick not given by the inputs defeats ComfyUI's cache
        self.last_result = without_latents(results[0]) if self.cached_output else results[0]
        if self.cached_output:
            reporter.previewer = None  # a TAESD previewer is a model
        return samples

    def nested_function(self, plan: NestedPlan, rule: OuterStepRule, reporter: NestedRunReporter, control: RunControl,
                        results: list, paced: Optional[PacedPlan] = None) -> Any:
        """The sampler function KSAMPLER.sample calls with ComfyUI's model (``KSamplerX0Inpaint``) for one run; its
        NestedResult goes to ``results``. With ``paced`` (update_seconds) the outer steps after each inner process
        are placed again: the reporter reads the current plan from it, the stop rule is handed its new costs."""
        limits = self.settings.limits
        inner_sigmas = paced.inner_sigmas if paced is not None else plan.inner_sigmas

        # Finish now acts at the next model call of a run a client can reach (one with a prompt and node id), which then
        # holds its latest image through the running inner diffusion
        steerable = reporter.prompt_id is not None and reporter.node_id is not None

        def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            completed = [0]  # inner diffusions run to the end and reported
            # its clock starts here, with the sampling (max_seconds)
            stop_rule = StopRule(plan.nfe_per_outer if paced is None else paced.nfe, limits.max_nfe,
                                 limits.max_seconds, control.finish_requested)

            def replan(index: int, nfe_done: int, seconds: float):
                with schedule_cache.single_threaded():
                    following = paced.replan(index, nfe_done, seconds)
                stop_rule.nfe_per_outer = paced.nfe  # the new plan's costs
                return following

            def on_inner_result(index: int, state: torch.Tensor, x0: torch.Tensor) -> None:
                if not self.reports_through_callback:
                    reporter.on_outer_step(index, x0)
                if callback is not None:
                    sigma = sigmas[index] if paced is None else torch.tensor(paced.outer_sigmas[index])
                    callback({"x": state, "i": index, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
                completed[0] += 1

            def on_pick(index: int, position: int, batch_index: int) -> None:
                # at the model call that takes the pick: from then on ComfyUI's inpainting wrapper sees that item only
                narrow_inpainting(model_k, position)
                reporter.on_pick(index, position, batch_index)
                control.set_batch_size(1)

            try:
                result = run_nested(
                    model_k, x, sigmas, inner_sigmas, plan.solver, extra_args, rule=rule, hooks=RunHooks(
                        on_inner_result=on_inner_result, on_model_call=reporter.on_model_call,
                        stop_rule=stop_rule,
                        finish_now=control.finish_requested if steerable else None,
                        take_pick=control.take_pick, on_pick=on_pick,
                        replan=replan if paced is not None else None),
                    index_offset=plan.first_outer_index, max_calls=limits.max_nfe, batch_indices=self.batch_indices,
                )
            except Exception as error:
                restart_error = failure_after_a_restart(error, completed[0])
                if restart_error is None:
                    raise
                raise restart_error from error
            results.append(result)
            return result.x

        return sampler_function

    def report_outer_step(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The sample_custom callback of the NestedKSampler nodes: the running reporter's outer step."""
        self.reporter.on_outer_step(step, x0)


def failure_after_a_restart(error: Exception, completed: int) -> Optional[NestedDiffusionError]:
    """The error to show for a failure in a later inner diffusion (``completed`` ran to the end before it), or None
    to let ``error`` through unchanged: a failure in the first one (as KSampler would meet it), Cancel and out of
    memory (ComfyUI handles them; Cancel's exception is an Exception up to 0.3.x).

    Every inner diffusion restarts from a higher sigma than the last one ended at: a model patch that keeps state
    across a run's steps and expects its sigmas only to fall fails there (ComfyUI's LazyCache, measured in 0.3.75
    and 0.33.0), with a message of its own that does not say so."""
    out_of_memory = comfy.model_management.OOM_EXCEPTION
    passed_on = (NestedDiffusionError, comfy.model_management.InterruptProcessingException)
    if completed == 0 or isinstance(error, passed_on) or (
            out_of_memory is not Exception and isinstance(error, out_of_memory)):
        return None
    return NestedDiffusionError(
        f"inner diffusion {completed + 1} failed after {completed} ran to the end ({type(error).__name__}: {error}). "
        f"Each inner diffusion restarts from a higher sigma than the last one ended at; a model patch that expects "
        f"one run's sigmas only to fall (ComfyUI's LazyCache does) fails there: remove it, or set outer_steps to 1 "
        f"(sampling as KSampler does)")


def without_latents(result: NestedResult) -> NestedResult:
    """``result`` with its final state and latest image dropped (the caller has them as the returned samples)."""
    return replace(result, x=result.x.new_empty(0), latest=None)


def channels_of(noise: torch.Tensor) -> int:
    return int(noise.shape[1]) if noise.ndim >= 2 else 1


def narrow_inpainting(model_k: Any, position: int) -> None:
    """After a pick, ComfyUI's inpainting wrapper keeps only the kept item's latent and noise."""
    for name in ("latent_image", "noise"):
        value = getattr(model_k, name, None)
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] > 1:
            setattr(model_k, name, value[position:position + 1])


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


# What an empty-latent node records of the size it was made for; ComfyUI's KSampler fits an empty latent to the
# model's own spatial and temporal compression by them (releases after 0.3.75) and leaves them out of its output.
LATENT_DOWNSCALE_KEYS = ("downscale_ratio_spacial", "downscale_ratio_temporal")


def fitted_latent_image(model: Any, latent: dict) -> torch.Tensor:
    """``latent["samples"]`` as ComfyUI's KSampler samples it: an empty latent given the model's channel count and,
    on releases whose ``fix_empty_latent_channels`` takes the recorded downscale ratios, the model's own size."""
    accepted = inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    ratios = {key: latent.get(key) for key in LATENT_DOWNSCALE_KEYS if key in accepted}
    return comfy.sample.fix_empty_latent_channels(model=model, latent_image=latent["samples"], **ratios)


def sample_latent(model: Any, sampler: NestedDiffusionSampler, seed: int, cfg: float, positive, negative, latent: dict,
                  add_noise: bool = True, keep_previews: bool = True) -> tuple[dict, dict]:
    """Sample like ``nodes.common_ksampler`` with a NestedDiffusionSampler holding its plan; returns (samples,
    outer_previews: empty where ``keep_previews`` is False)."""
    check_number("cfg", cfg, 0.0, 100.0)
    latent_image = fitted_latent_image(model, latent)
    check_latent(model, latent_image)
    if add_noise:
        noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(latent_image.size(), dtype=latent_image.dtype, layout=latent_image.layout, device="cpu")
    sampler.batch_indices = latent.get("batch_index")
    sampler.reports_through_callback = True
    sampler.keep_previews = keep_previews
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, sampler.plan.outer_sigmas, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=sampler.report_outer_step,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    out = {key: value for key, value in latent.items() if key not in LATENT_DOWNSCALE_KEYS}
    out["samples"] = samples
    if sampler.last_result.kept is not None:  # a pick: the kept item, as LatentFromBatch would give it
        keep_picked_item(out, sampler.last_result.kept)
    return out, outer_previews_latent(sampler.reporter, model)


def keep_picked_item(latent: dict, position: int) -> None:
    """The other per-item entries of a LATENT narrowed to the kept item (its batch_index, its noise_mask)."""
    batch_index = latent.get("batch_index")
    latent["batch_index"] = [batch_index[position]] if batch_index is not None else [position]
    mask = latent.get("noise_mask")
    if torch.is_tensor(mask) and mask.ndim > 0 and mask.shape[0] > 1:
        latent["noise_mask"] = mask[position:position + 1]
