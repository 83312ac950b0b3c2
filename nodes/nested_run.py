"""The one SAMPLER that runs nested diffusion inside ComfyUI, and the KSampler-like way the nodes call it.

``NestedDiffusionSampler`` is a ComfyUI ``KSAMPLER``: SamplerCustom(Advanced) and the guider give it the model, the sigmas,
the noise and the latent, as to any sampler. A run reads top to bottom: ``sample`` completes the plan
(``planning.plan_run``: the NestedKSampler nodes' own plan, or the connected sigmas'; the outer step "auto" takes,
probed against ComfyUI's guider; the update_seconds pacing), the sampler function runs ``nested_core.run_nested``
with that plan, the model, the state and one ``RunObserver`` as its hooks, and everything the run reports or is
steered by (progress, previews, events, Finish now, picks, budgets, caching, ``outer_previews``) goes through that
observer.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import torch

from ..nested_core import NestedDiffusionError, NestedResult, RunHooks, check_number, run_nested
from .planning import NestedPlan, NestedSettings, RunLimits, RunPlan, plan_run
from .prompt_server import executing_node_id, executing_prompt_id
from .reporting import NestedRunReporter
from .run_observer import RunObserver

__all__ = ["NestedDiffusionSampler", "NestedSettings", "RunLimits", "sample_latent"]


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
        # The NestedKSampler nodes hand sample_custom ``report_outer_step`` as its callback, so that the observer sees
        # each inner result as ComfyUI's guider hands callbacks it (a multi-latent model's x0 as a NestedTensor).
        self.reports_through_callback = False
        self.observer: Optional[RunObserver] = None  # the running or last run's

    @property
    def reporter(self) -> Optional[NestedRunReporter]:
        """The running or last run's progress, previews and events (outer_previews come from it)."""
        return self.observer.reporter if self.observer is not None else None

    @property
    def last_result(self) -> Optional[NestedResult]:
        return self.observer.result if self.observer is not None else None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        plan = plan_run(self.settings, self.plan, model_wrap, sigmas, channels_of(noise))
        self.observer = RunObserver(plan, model_wrap.model_patcher, executing_prompt_id(), executing_node_id(),
                                    own_progress=self.own_progress, batch_indices=self.batch_indices,
                                    keep_previews=self.keep_previews,
                                    reports_through_callback=self.reports_through_callback, rerun_key=self.rerun_key,
                                    cached_output=self.cached_output)
        self.inpaint_options = plan.nested.inpaint_options
        self.sampler_function = self.nested_function(plan, self.observer)
        try:
            return super().sample(model_wrap, plan.nested.outer_sigmas.to(sigmas.device), extra_args, callback, noise,
                                  latent_image, denoise_mask, disable_pbar)
        finally:
            self.sampler_function = None  # its closure holds the run's state

    def nested_function(self, plan: RunPlan, observer: RunObserver) -> Any:
        """The sampler function KSAMPLER.sample calls with ComfyUI's model (``KSamplerX0Inpaint``) for one run: the
        core runs the plan, and every hook it has is the observer's."""
        # Finish now acts at the next model call of a run a client can reach (one with a prompt and node id), which then
        # holds its latest image through the running inner diffusion
        steerable = observer.prompt_id is not None and observer.node_id is not None
        hooks = RunHooks(on_start=observer.started, on_model_call=observer.model_called,
                         finish_now=observer.finish_requested if steerable else None, take_pick=observer.take_pick,
                         on_pick=observer.picked, on_inner_result=observer.inner_result,
                         stop_rule=observer.should_stop, replan=observer.replan if plan.paced is not None else None,
                         on_end=observer.ended)

        def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            observer.model_k, observer.comfy_callback, observer.sigmas = model_k, callback, sigmas
            try:
                result = run_nested(model_k, x, sigmas, plan.inner_sigmas, plan.nested.solver, extra_args,
                                    rule=plan.rule, hooks=hooks, index_offset=plan.nested.first_outer_index,
                                    max_calls=plan.settings.limits.max_nfe, batch_indices=self.batch_indices)
            except Exception as error:
                restart_error = failure_after_a_restart(error, observer.completed)
                if restart_error is None:
                    raise
                raise restart_error from error
            return result.x

        return sampler_function

    def report_outer_step(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        """The sample_custom callback of the NestedKSampler nodes: the running run's outer step, to its observer."""
        self.observer.comfy_reported(step, x0)


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


def channels_of(noise: torch.Tensor) -> int:
    return int(noise.shape[1]) if noise.ndim >= 2 else 1


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
    return out, sampler.observer.outer_previews(model)


def keep_picked_item(latent: dict, position: int) -> None:
    """The other per-item entries of a LATENT narrowed to the kept item (its batch_index, its noise_mask)."""
    batch_index = latent.get("batch_index")
    latent["batch_index"] = [batch_index[position]] if batch_index is not None else [position]
    mask = latent.get("noise_mask")
    if torch.is_tensor(mask) and mask.ndim > 0 and mask.shape[0] > 1:
        latent["noise_mask"] = mask[position:position + 1]
