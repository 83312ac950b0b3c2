"""OuterStepPreview: decode a nested sampler's outer_previews and show them, labelled, in the node.

Besides ComfyUI's ``images``, the node's UI output (``/history``'s ``outputs[node]``, the ``executed`` event) carries,
per image shown, ``nested_labels`` (the text under it) and ``nested_previews``: ``{"outer_step", "outer_steps",
"batch_index", "nfe"}`` (None where the previews carry no metadata), for clients that need the numbers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from comfy_api.latest import io, ui
from PIL import Image, ImageDraw, ImageFont

from ..nested_core import NestedDiffusionError

MIN_LABELLED_SIZE = 256
LABEL_HEIGHT = 28
MAX_SHOWN = 64  # labelled images shown (and written to temp/) per run; outer_previews holds at most 64 anyway


def preview_metadata(previews: dict) -> list[Optional[dict]]:
    """Per image, outer-major: ``{"outer_step", "outer_steps", "batch_index", "nfe"}`` from the metadata NestedKSampler
    writes (``nfe``: spent up to that outer step, None if unknown); all None when the previews carry none."""
    count = int(previews["samples"].shape[0])
    outer_steps = int(previews.get("nested_outer_steps") or 0)
    batch = int(previews.get("nested_batch_size") or 0)
    nfe = list(previews.get("nested_nfe") or [])
    numbers = list(previews.get("nested_outer_step_numbers") or range(1, outer_steps + 1))
    sizes = list(previews.get("nested_step_batch_sizes") or [batch] * len(numbers))  # after a pick: 1 per step
    if outer_steps <= 0 or batch <= 0 or len(sizes) != len(numbers) or sum(sizes) != count:
        return [None] * count
    picked = previews.get("nested_picked")
    return [{"outer_step": int(numbers[step]), "outer_steps": outer_steps,
             "batch_index": position if size == batch or picked is None else int(picked),
             "nfe": int(nfe[step]) if step < len(nfe) else None}
            for step, size in enumerate(sizes) for position in range(size)]


def preview_label(index: int, metadata: Optional[dict], batch: int) -> str:
    """'outer k/K · n NFE · index i' (the index 0-based, like batch_index and Pick Candidate; only for batches)."""
    if metadata is None:
        return f"image {index + 1}"
    spent = f" · {metadata['nfe']} NFE" if metadata["nfe"] is not None else ""
    item = f" · index {metadata['batch_index']}" if batch > 1 else ""
    return f"outer {metadata['outer_step']}/{metadata['outer_steps']}{spent}{item}"


def _label_font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed bitmap font
        return ImageFont.load_default()


def labelled_image(image: torch.Tensor, label: str) -> Image.Image:
    """The image enlarged (nearest) to at least MIN_LABELLED_SIZE wide, with its label on a bar beneath."""
    pixels = Image.fromarray(np.clip(image.cpu().numpy() * 255.0, 0, 255).astype(np.uint8))
    scale = max(1, -(-MIN_LABELLED_SIZE // pixels.width))
    pixels = pixels.resize((pixels.width * scale, pixels.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (pixels.width, pixels.height + LABEL_HEIGHT), (20, 20, 20))
    canvas.paste(pixels.convert("RGB"), (0, 0))
    ImageDraw.Draw(canvas).text((6, pixels.height + 5), label, fill=(235, 235, 235), font=_label_font(16))
    return canvas


def to_image_batch(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0) for image in images])


def check_previews_for_vae(previews: dict, vae) -> None:
    samples = previews.get("samples") if isinstance(previews, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] == 0:
        raise NestedDiffusionError("previews must be the outer_previews output of a nested sampler (it holds no images)")
    expected = getattr(vae, "latent_channels", None)
    if expected is not None and samples.shape[1] != expected:
        raise NestedDiffusionError(
            f"previews have {samples.shape[1]} latent channels but this vae decodes {expected}-channel latents: "
            f"connect the VAE that matches the sampler's model"
        )


class OuterStepPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="OuterStepPreview",
            display_name="Outer Step Preview (nested)",
            category="sampling/nested",
            description="Decodes the inner result of every outer step and shows them, labelled with the outer step "
                        "and the NFEs spent so far. Long runs and big batches are thinned to at most 64 images: every "
                        "outer step while they fit, else evenly spaced ones and always the latest.",
            inputs=[
                io.Latent.Input("previews", tooltip="The outer_previews output of a nested sampler."),
                io.Vae.Input("vae"),
            ],
            outputs=[io.Image.Output(display_name="images")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, previews, vae) -> io.NodeOutput:
        check_previews_for_vae(previews, vae)
        images = vae.decode(previews["samples"])
        if images.ndim == 5:  # video VAEs decode to [batch, frames, H, W, C]
            images = images.reshape(-1, *images.shape[-3:])
        metadata = preview_metadata(previews)
        if len(metadata) != images.shape[0]:
            metadata = [None] * images.shape[0]
        metadata = metadata[:MAX_SHOWN]  # a batch above 64 (only possible for the latest outer step): its first 64
        batch = int(previews.get("nested_batch_size") or 0)
        labels = [preview_label(index, item, batch) for index, item in enumerate(metadata)]
        shown = to_image_batch([labelled_image(image, label) for image, label in zip(images, labels)])
        preview = ui.PreviewImage(shown, cls=cls)
        return io.NodeOutput(images, ui={**preview.as_dict(), "nested_labels": labels, "nested_previews": metadata})
