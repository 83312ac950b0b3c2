"""NestedPickCandidate: the paper's generation with human feedback (section 5, Figure 7).

After a stage, every batch slot is a candidate. Picking one copies its outer state into every slot,
so the next stage explores variations of it (with a stochastic inner solver or outer_eta > 0).
"""
from __future__ import annotations

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
    """The last outer step's inner results (one per candidate) from a stage's outer_previews."""
    images = previews.get("samples") if isinstance(previews, dict) else None
    if not isinstance(images, torch.Tensor) or images.shape[0] < batch or images.shape[0] % batch:
        raise NestedDiffusionError(
            f"outer_previews must come from the same stage as samples ({batch} candidates per outer step)"
        )
    return images[-batch:]


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
        batch = check_pick(samples, index)
        candidates = latest_candidates(outer_previews, batch)
        picked = {"samples": candidates[index:index + 1].clone()}
        shown = None
        if vae is not None:
            images = vae.decode(candidates)
            tiles = [framed(labelled_image(image, f"index {i}{' · picked' if i == index else ''}"), i == index)
                     for i, image in enumerate(images)]
            shown = ui.PreviewImage(to_image_batch(tiles), cls=cls)
        return io.NodeOutput(repeat_slot(samples, index, batch), picked, ui=shown)
