"""How much of the filmstrip (the ``nested_diffusion.candidates`` event: a small preview of every batch item) a run
sends: bounded per model call by a quantity that does not depend on what the images look like, so that a large
batch does not multiply the websocket traffic.

ComfyUI's KSampler sends one progress preview per step: its previewer shows the first batch item's x0, which the
server scales to ``--preview-size`` (512 px by default, small latents enlarged) and encodes as a JPEG. A nested run
sends the same preview (the first item's inner result, at the same size) after every inner diffusion, and the
filmstrip besides: at batch 64, 128 px, 64 thumbnails per outer step were 261 KB against KSampler's 20 KB per step.
How many bytes a preview's JPEG takes depends on the image (stripes 57 KB, a plain disc 11.6 KB, at 512 px),
so the rule counts pixels, not bytes:

* the filmstrip's bytes stay within ``SHARE`` bytes per pixel of one progress preview (as the server sends it) per
  model call, plus ``ALLOWANCE`` per run (so short runs and small batches show every outer step): 8 KB per model call
  at the default 512 px previews, below the smallest preview JPEG measured (bench/preview_traffic.py). An event
  that does not fit is skipped, and the latest candidates go out once the budget has grown again;
* thumbnails get smaller as the batch grows (``thumbnail_side``): a batch of 4 at 128 px, of 64 at 32 px;
* nothing is decoded or sent while no client is connected to receive it (``client_watching``).
"""
from __future__ import annotations

import json
import math
from typing import Any

SHARE = 1 / 32  # filmstrip bytes per pixel of a progress preview, per model call
ALLOWANCE = 256 * 1024  # bytes per run the filmstrip may send beyond its share
CANDIDATE_SIZE = 256  # longest side of a filmstrip preview, in pixels (a batch of 1)
MIN_CANDIDATE_SIZE = 32


def thumbnail_side(batch: int) -> int:
    """The longest side of each filmstrip preview for a batch of ``batch``: all of them together about the pixels of
    four 128 px images."""
    return max(MIN_CANDIDATE_SIZE, min(CANDIDATE_SIZE, int(256 / math.sqrt(max(batch, 1)))))


def sent_pixels(preview: Any) -> int:
    """Pixels of a previewer's ``(format, image, max_size)`` as ComfyUI's server sends it: the image scaled to fit
    ``max_size`` on its longer side (``ImageOps.contain``: small images are enlarged). 0 for no preview."""
    if preview is None:
        return 0
    width, height = preview[1].size
    max_size = preview[2] if len(preview) > 2 else None
    if not max_size or width <= 0 or height <= 0:
        return max(width, 0) * max(height, 0)
    scale = max_size / max(width, height)
    return max(1, round(width * scale)) * max(1, round(height * scale))


def client_watching(server: Any) -> bool:
    """Whether anyone receives the running prompt's events: its client is connected (a prompt queued without a
    client id goes to every connected client). True where the server does not say."""
    sockets = getattr(server, "sockets", None)
    if not isinstance(sockets, dict):
        return True
    client_id = getattr(server, "client_id", None)
    return client_id in sockets if client_id else bool(sockets)


class FilmstripBudget:
    """Per run: the bytes the filmstrip has sent, and whether the next filmstrip fits the budget after a number of
    model calls."""

    def __init__(self, share: float = SHARE, allowance: int = ALLOWANCE):
        self.share = share
        self.allowance = allowance
        self.preview_pixels = 0  # of the latest progress preview, as sent
        self.filmstrip_bytes = 0
        self.skipped = 0

    def count_preview(self, preview: Any) -> None:
        if preview is not None:
            self.preview_pixels = sent_pixels(preview)

    def budget(self, model_calls: int) -> float:
        return self.share * self.preview_pixels * model_calls + self.allowance

    def fits(self, model_calls: int) -> bool:
        """Whether the next filmstrip may go out after ``model_calls`` model calls of the run (it may overshoot the
        budget by that one event)."""
        fits = self.filmstrip_bytes <= self.budget(model_calls)
        self.skipped += not fits
        return fits

    def count_event(self, event: str, data: dict) -> None:
        """Count a filmstrip event's bytes as the server sends them: ``{"type": event, "data": data}`` as JSON."""
        self.filmstrip_bytes += len(json.dumps({"type": event, "data": data}))
