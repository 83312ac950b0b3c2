"""NestedPickCandidate: the paper's generation with human feedback (section 5, Figure 7).

After a stage, every batch slot is a candidate. Picking one copies its outer state into every slot,
so the next stage explores variations of it (with a stochastic inner solver or outer_eta > 0).

A client may already have kept one item while the stage ran ("keep only this", ``POST /nested_diffusion/pick``):
the stage's samples then hold that item alone. That pick is the later choice, so it wins over ``index``: the node
shows and hands on the kept item, copied into the stage's whole batch again.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw

from ..nested_core import NestedDiffusionError
from .outer_preview import labelled_image, to_image_batch

PICK_FRAME = (40, 220, 90)


def check_pick(samples: dict, index: int) -> int:
    batch = int(samples["samples"].shape[0])
    if not 0 <= index < batch:
        raise NestedDiffusionError(f"index {index} is outside the batch of {batch} candidates: choose 0 to {batch - 1}")
    return batch


def latest_candidates(previews: dict, batch: int) -> torch.Tensor:
    """The last outer step's inner results (one per candidate) from a stage's outer_previews: as many as that step
    held where the previews say (``nested_step_batch_sizes``), else ``batch``."""
    images = previews.get("samples") if isinstance(previews, dict) else None
    sizes = previews.get("nested_step_batch_sizes") if isinstance(previews, dict) else None
    if isinstance(images, torch.Tensor) and isinstance(sizes, list) and sizes and sum(sizes) == images.shape[0]:
        return images[-int(sizes[-1]):]
    if not isinstance(images, torch.Tensor) or images.shape[0] < batch or images.shape[0] % batch:
        raise NestedDiffusionError(
            f"outer_previews must come from the same stage as samples ({batch} candidates per outer step)"
        )
    return images[-batch:]


def client_pick(samples: dict, previews: dict) -> Optional[tuple[int, int]]:
    """(the kept item's position among the last step's candidates, the stage's batch) where a client's pick narrowed
    the stage to one item while it ran; None otherwise."""
    if not isinstance(previews, dict) or int(samples["samples"].shape[0]) != 1:
        return None
    picked, batch = previews.get("nested_picked"), previews.get("nested_run_batch_size")
    if not isinstance(picked, int) or isinstance(picked, bool) or not isinstance(batch, int) or batch < 2:
        return None
    sizes = previews.get("nested_step_batch_sizes") or []
    last_step_held_all = bool(sizes) and sizes[-1] == batch  # the pick came after the last step's images
    return (picked if last_step_held_all else 0), batch


def repeat_slot(latent: dict, index: int, batch: int) -> dict:
    """Every batch slot becomes a copy of slot ``index`` (its state, and its mask if it has one per slot)."""
    out = {key: value for key, value in latent.items() if key != "batch_index"}
    out["samples"] = latent["samples"][index:index + 1].repeat_interleave(batch, dim=0)
    mask = latent.get("noise_mask")
    if isinstance(mask, torch.Tensor) and mask.shape[0] == batch and batch > 1:
        out["noise_mask"] = mask[index:index + 1].repeat_interleave(batch, dim=0)
    return out


def framed(image: Image.Image, chosen: bool) -> Image.Image:
    if chosen:
        draw = ImageDraw.Draw(image)
        for inset in range(4):
            draw.rectangle([inset, inset, image.width - 1 - inset, image.height - 1 - inset], outline=PICK_FRAME)
    return image


class NestedPickCandidate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NestedPickCandidate",
            display_name="Pick Candidate (nested)",
            category="sampling/nested",
            description="Generation with human feedback: choose one candidate after a stage of Nested KSampler "
                        "(advanced). Its outer state replaces every batch slot, so the next stage explores variations "
                        "of it. Connect a VAE to see the candidates, the chosen one framed in green.",
            inputs=[
                io.Latent.Input("samples", tooltip="The stage's samples (return_with_leftover_noise enabled)."),
                io.Latent.Input("outer_previews", tooltip="The same stage's outer_previews: the candidates' images."),
                io.Int.Input("index", default=0, min=0, max=4095, tooltip="The candidate to keep, 0-based."),
                io.Vae.Input("vae", optional=True),
            ],
            outputs=[
                io.Latent.Output(display_name="samples"),
                io.Latent.Output(display_name="picked_preview", tooltip="The chosen candidate's latest image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, samples, outer_previews, index, vae=None) -> io.NodeOutput:
        kept_by_client = client_pick(samples, outer_previews)
        if kept_by_client is None:
            batch = check_pick(samples, index)
            candidates = latest_candidates(outer_previews, batch)
            chosen, slot = index, index
        else:
            (chosen, batch), slot = kept_by_client, 0
            candidates = latest_candidates(outer_previews, 1)
            if index != chosen:
                logging.info("nested diffusion: Pick Candidate keeps the item a client kept while the stage ran "
                             "(index %d is ignored)", index)
            index = outer_previews["nested_picked"]
        picked = {"samples": candidates[chosen:chosen + 1].clone()}
        shown = None
        if vae is not None:
            images = vae.decode(candidates)
            # after a client's pick the candidates may be the kept item alone: label it by its batch position
            numbers = [outer_previews["nested_picked"]] if kept_by_client and len(images) == 1 else range(len(images))
            tiles = [framed(labelled_image(image, f"index {i}{' · picked' if i == index else ''}"), i == index)
                     for i, image in zip(numbers, images)]
            shown = ui.PreviewImage(to_image_batch(tiles), cls=cls)
        return io.NodeOutput(repeat_slot(samples, slot, batch), picked, ui=shown)
