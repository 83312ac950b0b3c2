"""What a nested run shows while it runs: one progress bar counted in NFEs, a preview and an event after every inner
diffusion, a small preview of every batch item (the filmstrip), and the kept inner results (``outer_previews``).

Everything goes through ComfyUI's own ``ProgressBar``, ``latent_preview`` and ``PromptServer``.
"""
from __future__ import annotations

import base64
import io
import logging
import time
from typing import Any, Optional

import comfy.model_management
import comfy.utils
import latent_preview
import torch

from ..nested_core import projected_costs, spent_per_inner_process
from ..protocol import CANDIDATES_EVENT, OUTER_STEP_EVENT, PICKED_EVENT
from .filmstrip import FilmstripBudget, client_watching, thumbnail_side
from .kept_previews import MAX_PREVIEW_IMAGES, KeptPreviews, KeptStep
from .planning import NestedPlan, PacedPlan
from .prompt_server import executing_prompt_id, prompt_server, send_to_prompt_client

PREVIEW_FORMAT = "JPEG"
MAX_CANDIDATES = 64  # batch items shown per outer step in the filmstrip
# Progress between outer steps goes out at most this often. A fast model makes hundreds of calls a second, and every
# update is two websocket messages the page must handle in order: unthrottled, a busy page falls behind the run, and
# its "keep only this" and "Finish now" reach the server late. Every outer step's update (with its preview) is sent.
PROGRESS_INTERVAL_S = 0.1


def first_latent(x0: Any) -> torch.Tensor:
    """A multi-latent model's NestedTensor (ComfyUI 0.30.0 on) is shown by its first latent (the video), as ComfyUI's
    own previews do."""
    return x0.tensors[0] if getattr(x0, "is_nested", False) else x0


class NestedRunReporter:
    """One progress bar per node run, counted in NFEs; a preview and an event after every inner process."""

    def __init__(self, model: Any, node_id: Optional[str], plan: NestedPlan, own_progress_bar: bool = True,
                 batch_indices: Optional[list[int]] = None, keep_previews: bool = True):
        self.node_id = node_id
        self.prompt_id = executing_prompt_id()
        self.planned_sigmas = [float(s) for s in plan.outer_sigmas]
        self.first_outer_index = plan.first_outer_index
        self.outer_steps = plan.total_outer_steps or len(self.planned_sigmas) - 1
        self.nfe_before = plan.nfe_before
        self.nfe_total = max(plan.nfe_total, 1)
        self.planned_nfe = list(plan.nfe_per_outer)
        self.nfe_spent: list[int] = []  # what each inner process of this run really spent
        self.nfe_done = 0
        self.progress_sent_at = -float("inf")
        self.batch_indices = batch_indices
        # Inside SamplerCustom(Advanced) the node's own bar already counts outer steps and shows the previews.
        self.progress = comfy.utils.ProgressBar(self.nfe_total) if own_progress_bar else None
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
        # For outer_previews: a bounded, evenly spread selection (kept_previews); nothing where no output takes them.
        self.kept = KeptPreviews(MAX_PREVIEW_IMAGES if keep_previews else 0)
        self.outer_step_mode: Optional[str] = None  # "ddim", "renoise" or "trajectory", once "auto" is resolved
        self.picked: Optional[int] = None  # the batch position a pick kept
        self.run_batch_size: Optional[int] = None  # the batch the run started with (a pick leaves 1)
        self.paced: Optional[PacedPlan] = None  # update_seconds: the outer steps, their sigmas and NFEs follow it
        self.filmstrip = FilmstripBudget()  # the candidates events' bytes, bounded per model call (filmstrip.py)

    def follow(self, paced: PacedPlan) -> None:
        """Read the outer sigmas, inner steps and planned NFEs from ``paced`` (re-planned as the run goes)."""
        self.paced = paced

    @property
    def outer_sigmas(self) -> list[float]:
        return self.paced.outer_sigmas if self.paced is not None else self.planned_sigmas

    @property
    def nfe_planned(self) -> list[int]:
        return self.paced.nfe if self.paced is not None else self.planned_nfe

    def set_outer_step_mode(self, mode: str) -> None:
        self.outer_step_mode = mode

    def on_model_call(self, calls: int) -> None:
        self.nfe_done = calls
        if calls > self.nfe_total:  # adaptive solvers can only be estimated beforehand
            self.nfe_total = calls
        # Cancel, at every model call: ComfyUI's progress hook looks for it too, but a newer ComfyUI's ProgressBar
        # (0.33.0) skips its hook for updates under 0.5% of the total (a batch-64 run there ignored Cancel for 19 s).
        comfy.model_management.throw_exception_if_processing_interrupted()
        due = time.monotonic() - self.progress_sent_at >= PROGRESS_INTERVAL_S
        if self.progress is not None and due and not self.ends_inner_process():
            self.send_progress()

    def ends_inner_process(self) -> bool:
        """Whether the model call just counted is the running inner diffusion's last as planned: the outer step's
        update (with its preview) follows at once, and a second one at the same count would only add traffic (an
        adaptive solver that runs longer than planned skips one update)."""
        index = len(self.nfe_spent)
        planned = self.nfe_planned
        return index < len(planned) and self.nfe_done == sum(self.nfe_spent) + planned[index]

    def send_progress(self, preview=None) -> None:
        """The bar at the NFEs done so far (with ``preview``, a previewer's image); the throttle counts from now."""
        self.progress_sent_at = time.monotonic()
        self.progress.update_absolute(self.nfe_done, self.nfe_total, preview)

    def items(self, batch: int) -> list[int]:
        """The batch index of every item now in the run (a pick leaves one)."""
        if self.batch_indices is not None and len(self.batch_indices) == batch:
            return list(self.batch_indices)
        return list(range(batch))

    def on_outer_step(self, index: int, x0: torch.Tensor) -> None:
        x0 = first_latent(x0)
        if self.paced is not None:
            self.outer_steps = self.first_outer_index + len(self.paced.steps)
        # The total: what the inner processes so far spent plus the projected cost of the rest (exact for solvers
        # whose model calls do not depend on the model; dpm_adaptive's follows what it really spends).
        self.nfe_spent = spent_per_inner_process(self.nfe_spent, self.nfe_done)
        self.nfe_total = max(sum(projected_costs(self.nfe_planned, self.nfe_spent)), self.nfe_done, 1)
        sigma = self.outer_sigmas[index]
        if self.kept.active:  # the copy only where an outer_previews output takes it
            self.kept.add(KeptStep(index, x0.detach().to(comfy.model_management.intermediate_device(), copy=True),
                                   self.nfe_before + self.nfe_done, sigma, self.first_outer_index + index + 1,
                                   self.items(x0.shape[0])))
        # ComfyUI's previewers show a batch by its first item: the progress preview is the first candidate's.
        first = self.preview_bytes(x0[:1])
        if self.progress is not None:
            self.send_progress(first)
        step = self.step_fields(index)
        send_to_prompt_client(OUTER_STEP_EVENT, {**step, "sigma": sigma, "outer_step_mode": self.outer_step_mode})
        self.send_filmstrip(step, x0, first)

    def send_filmstrip(self, step: dict, x0: torch.Tensor, first) -> None:
        """The candidates event, where a client receives it and it fits the run's budget (filmstrip.py); one decode
        per batch item, Cancel honoured between them."""
        server = prompt_server()
        if server is None or not client_watching(server):
            return
        self.filmstrip.count_preview(first)
        if not self.filmstrip.fits(self.nfe_done):
            return
        images = self.item_previews(x0, thumbnail_side(x0.shape[0]), first)
        data = {**step, "display_node": self.node_id, "batch_indices": self.items(x0.shape[0])[:MAX_CANDIDATES],
                "images": images, "picked": self.picked}
        self.filmstrip.count_event(CANDIDATES_EVENT, data)
        send_to_prompt_client(CANDIDATES_EVENT, data)
        comfy.model_management.throw_exception_if_processing_interrupted()  # a Cancel meanwhile: before the next call

    def step_fields(self, index: int) -> dict:
        fields = {"node": self.node_id, "prompt_id": self.prompt_id, "outer_step": self.first_outer_index + index + 1,
                  "outer_steps": self.outer_steps, "nfe": self.nfe_done, "nfe_total": self.nfe_total}
        if self.paced is not None:  # update_seconds: this outer step's inner steps, and the next one's as chosen
            steps = self.paced.steps
            fields.update(update_seconds=self.paced.update_seconds, inner_steps=steps[index],
                          next_inner_steps=steps[index + 1] if index + 1 < len(steps) else None)
        return fields

    def on_pick(self, index: int, position: int, batch_index: int) -> None:
        """A pick kept batch position ``position`` after outer step ``index``."""
        self.batch_indices = [batch_index]
        self.picked = position
        send_to_prompt_client(PICKED_EVENT, {"node": self.node_id, "prompt_id": self.prompt_id, "index": position,
                                             "batch_index": batch_index, "outer_step": self.first_outer_index + index + 1})

    def preview_bytes(self, x0: torch.Tensor):
        if self.previewer is None:
            return None
        try:
            return self.previewer.decode_latent_to_preview_image(PREVIEW_FORMAT, x0)
        except Exception as error:  # a preview must never fail the run
            logging.warning("nested diffusion: preview failed: %s", error)
            return None

    def item_previews(self, x0: torch.Tensor, side: int, first=None) -> list:
        """ComfyUI's preview of every batch item (at most MAX_CANDIDATES; ``first``: item 0's, already decoded) as a
        data URL at most ``side`` pixels, None where there is none. A Cancel between two items stops the run there."""
        images = [data_url(first if first is not None else self.preview_bytes(x0[:1]), side)]
        for item in range(1, min(x0.shape[0], MAX_CANDIDATES)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            images.append(data_url(self.preview_bytes(x0[item:item + 1]), side))
        return images


def data_url(preview, side: int = thumbnail_side(1)) -> Optional[str]:
    """A previewer's ``(format, image, size)`` as a small JPEG data URL for the filmstrip, at most ``side`` pixels
    on its longest side (None stays None)."""
    if preview is None:
        return None
    image = preview[1].copy()
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def outer_previews_latent(reporter: NestedRunReporter, model: Any) -> dict:
    """All inner results, outer-major, with what a downstream node needs to label them. The kept latents are moved
    into the output (the reporter keeps none of them afterwards)."""
    kept = reporter.kept.steps
    batch = kept[0].latent.shape[0] if kept else 0
    sizes = [step.latent.shape[0] for step in kept]
    return {
        "samples": moved_into_one_latent(kept, sum(sizes), model),
        "nested_outer_steps": reporter.outer_steps,
        "nested_outer_step_numbers": [s.number for s in kept],
        "nested_batch_size": batch,
        "nested_step_batch_sizes": sizes,  # a pick leaves 1 after it
        "nested_batch_indices": [item for s in kept for item in s.items],
        "nested_nfe": [s.nfe for s in kept],
        "nested_nfe_total": reporter.nfe_before + reporter.nfe_total,
        "nested_sigmas": [s.sigma for s in kept],
        "nested_outer_step_mode": reporter.outer_step_mode,
        "nested_picked": reporter.picked,  # the batch position a pick kept (its images after the pick), or None
        "nested_run_batch_size": reporter.run_batch_size,  # the batch the run started with (before any pick)
    }


def moved_into_one_latent(kept: list, total: int, model: Any) -> torch.Tensor:
    """The kept steps' latents, converted out of the model's latent space, in one tensor filled step by step; each
    step's latent is let go once copied. Peak memory: the result plus one step, where converting them all and
    concatenating held three copies at once (the cost benchmark's peak on small latents). ``total``: their images."""
    samples, start = torch.zeros(0), 0
    for step in kept:
        converted = model.model.process_latent_out(step.latent)
        if start == 0:
            samples = converted.new_empty((total, *converted.shape[1:]))
        samples[start:start + converted.shape[0]] = converted
        start += converted.shape[0]
        step.latent = None
    return samples
