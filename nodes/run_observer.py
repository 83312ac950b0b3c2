"""The one door a nested run reports and is steered through: ``RunObserver``.

The core's hooks (``nested_core.RunHooks``: the run's start, every model call, every inner result, the stop rule,
Finish now, a pick, a re-plan, the run's end) are its methods, and ComfyUI's sampler callback lands on it too.
Behind it: the progress bar, previews and events (``reporting``), Finish now and picks (``steering``), the NFE and
time budgets (``nested_core.budget``), ``update_seconds`` re-plans (``planning.PacedPlan``) and honest caching
(``rerun``). It is a plain value until the run starts: ``started`` sets up what the run holds, ``ended`` lets it go,
whether the run ended or raised.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import torch

from ..nested_core import NestedResult, StopRule
from . import rerun, schedule_cache
from .planning import RunPlan
from .reporting import NestedRunReporter, outer_previews_latent
from .steering import RunControl, finishable_run


@dataclass(eq=False)
class RunObserver:
    """What one run reports to and is steered by. ``prompt_id`` / ``node_id``: the executing prompt and node (a run
    without both cannot be reached by a client). ``reports_through_callback``: ComfyUI's callback leads back here
    (``comfy_reported``; the NestedKSampler nodes hand ``sample_custom`` one, so that a multi-latent model's inner
    result arrives unpacked, as ComfyUI's guider hands callbacks it), so an inner result is reported there, not
    when the core hands it over. ``cached_output``: the sampler is a node's output, which ComfyUI's cache keeps:
    after the run the observer keeps no latents and no previewer."""

    plan: Optional[RunPlan]  # None once the run ended
    model_patcher: Any
    prompt_id: Optional[str] = None
    node_id: Optional[str] = None
    own_progress: bool = False
    batch_indices: Optional[list[int]] = None
    keep_previews: bool = False
    reports_through_callback: bool = False
    rerun_key: Optional[tuple] = None
    cached_output: bool = False
    # What ComfyUI hands the sampler function: its model (a pick narrows its inpainting latents), its callback and the
    # outer sigmas on the sampling device (the callback's sigma).
    model_k: Any = None
    comfy_callback: Optional[Callable[[dict], None]] = None
    sigmas: Optional[torch.Tensor] = None
    # The run's own, from ``started`` on
    reporter: Optional[NestedRunReporter] = None
    control: Optional[RunControl] = None
    budget: Optional[StopRule] = None
    completed: int = 0  # inner diffusions run to the end and reported
    result: Optional[NestedResult] = None
    registration: Optional[contextlib.ExitStack] = None

    # -- the run's start and end --
    def started(self, x: torch.Tensor) -> None:
        """Before the first model call: the reporter, the registration that lets a client steer the run, and the
        budgets, whose clock starts here with the sampling (max_seconds)."""
        plan, batch = self.plan, int(x.shape[0])
        self.registration = contextlib.ExitStack()
        self.control = self.registration.enter_context(finishable_run(self.prompt_id, self.node_id))
        self.control.set_batch_size(batch)  # what a pick may name
        self.reporter = NestedRunReporter(self.model_patcher, self.node_id, plan.nested, self.own_progress,
                                          self.batch_indices, keep_previews=self.keep_previews)
        if plan.paced is not None:
            self.reporter.follow(plan.paced)
        self.reporter.set_outer_step_mode(plan.outer_step_mode)
        self.reporter.run_batch_size = batch  # outer_previews tells Pick Candidate the stage's batch
        limits = plan.settings.limits
        self.budget = StopRule(plan.nested.nfe_per_outer if plan.paced is None else plan.paced.nfe, limits.max_nfe,
                               limits.max_seconds, self.control.finish_requested)

    def ended(self, result: Optional[NestedResult]) -> None:
        """The run ended with ``result`` (None: it raised). A stop or pick not given by the inputs defeats ComfyUI's
        cache (``rerun``); the run is no longer steerable; what ComfyUI handed it is let go."""
        try:
            if result is not None:
                rerun.run_ended(self.rerun_key, result)
        finally:
            if self.registration is not None:
                self.registration.close()
            # What ComfyUI handed the run and what it held: a sampler kept in ComfyUI's cache keeps only the reporter
            # and the result (no model, no latents, no functions reaching further)
            self.model_k = self.comfy_callback = self.sigmas = self.model_patcher = None
            self.registration = self.control = self.budget = self.plan = None
        self.result = without_latents(result) if self.cached_output and result is not None else result
        if self.cached_output and self.reporter is not None:
            self.reporter.previewer = None  # a TAESD previewer is a model

    # -- every model call --
    def model_called(self, calls: int) -> None:
        self.reporter.on_model_call(calls)

    def finish_requested(self) -> bool:
        return self.control.finish_requested()

    def take_pick(self, batch: int) -> Optional[int]:
        return self.control.take_pick(batch)

    def picked(self, index: int, position: int, batch_index: int) -> None:
        """At the model call that takes the pick: from then on ComfyUI's inpainting wrapper sees that item only."""
        narrow_inpainting(self.model_k, position)
        self.reporter.on_pick(index, position, batch_index)
        self.control.set_batch_size(1)

    # -- every inner result --
    def inner_result(self, index: int, state: torch.Tensor, x0: torch.Tensor) -> None:
        if not self.reports_through_callback:
            self.reporter.on_outer_step(index, x0)
        if self.comfy_callback is not None:
            paced = self.plan.paced
            sigma = self.sigmas[index] if paced is None else torch.tensor(paced.outer_sigmas[index])
            self.comfy_callback({"x": state, "i": index, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        self.completed += 1

    def comfy_reported(self, step: int, x0: Any) -> None:
        """ComfyUI's callback, where it leads back here (``reports_through_callback``)."""
        self.reporter.on_outer_step(step, x0)

    def should_stop(self, index: int, nfe_done: int) -> Optional[str]:
        return self.budget(index, nfe_done)

    def replan(self, index: int, nfe_done: int, seconds: float):
        """update_seconds: the outer steps after ``index`` placed again; the budgets are handed the new costs."""
        paced = self.plan.paced
        with schedule_cache.single_threaded():
            following = paced.replan(index, nfe_done, seconds)
        self.budget.nfe_per_outer = paced.nfe
        return following

    # -- the node's output --
    def outer_previews(self, model: Any) -> dict:
        """The NestedKSampler nodes' outer_previews LATENT (the kept inner results move into it)."""
        return outer_previews_latent(self.reporter, model)


def narrow_inpainting(model_k: Any, position: int) -> None:
    """After a pick, ComfyUI's inpainting wrapper keeps only the kept item's latent and noise."""
    for name in ("latent_image", "noise"):
        value = getattr(model_k, name, None)
        if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] > 1:
            setattr(model_k, name, value[position:position + 1])


def without_latents(result: NestedResult) -> NestedResult:
    """``result`` with its final state and latest image dropped (the caller has them as the returned samples)."""
    return replace(result, x=result.x.new_empty(0), latest=None)
