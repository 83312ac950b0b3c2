"""How much of the filmstrip (the ``nested_diffusion.candidates`` event: a small preview of every batch item) a run
sends: bounded by what its progress previews send, so that a large batch does not multiply the websocket traffic.

ComfyUI's KSampler sends one preview per step (its previewer shows a batch by its first item). A nested run sends the
same preview per outer step, and the filmstrip besides: at batch 64, 128 px, 64 thumbnails per outer step were 261 KB
against KSampler's 20 KB per step. The rule:

* the filmstrip's bytes stay within ``SHARE`` of the progress previews' bytes so far, plus ``ALLOWANCE`` per run (so
  short runs and small batches show every outer step): an event that does not fit is skipped, and the latest
  candidates go out once the budget has grown again. Whole runs send at most about ``1 + SHARE`` times KSampler's
  preview bytes per model call;
* thumbnails get smaller as the batch grows (``thumbnail_side``): a batch of 4 at 128 px, of 64 at 32 px;
* nothing is decoded or sent while no client is connected to receive it (``client_watching``).
"""
from __future__ import annotations

import io
import math
from typing import Any, Optional

SHARE = 0.75  # filmstrip bytes per progress-preview byte
ALLOWANCE = 256 * 1024  # bytes per run the filmstrip may send beyond its share
CANDIDATE_SIZE = 256  # longest side of a filmstrip preview, in pixels (a batch of 1)
MIN_CANDIDATE_SIZE = 32
PREVIEW_QUALITY = 95  # ComfyUI encodes its binary previews as JPEG at this quality


def thumbnail_side(batch: int) -> int:
    """The longest side of each filmstrip preview for a batch of ``batch``: all of them together about the pixels of
    four 128 px images."""
    return max(MIN_CANDIDATE_SIZE, min(CANDIDATE_SIZE, int(256 / math.sqrt(max(batch, 1)))))


def encoded_size(preview: Any) -> int:
    """Bytes of a previewer's ``(format, image, size)`` as ComfyUI sends it (JPEG, quality 95)."""
    buffer = io.BytesIO()
    preview[1].convert("RGB").save(buffer, format="JPEG", quality=PREVIEW_QUALITY)
    return len(buffer.getvalue())


def client_watching(server: Any) -> bool:
    """Whether anyone receives the running prompt's events: its client is connected (a prompt queued without a
    client id goes to every connected client). True where the server does not say."""
    sockets = getattr(server, "sockets", None)
    if not isinstance(sockets, dict):
        return True
    client_id = getattr(server, "client_id", None)
    return client_id in sockets if client_id else bool(sockets)


class FilmstripBudget:
    """Per run: the bytes the progress previews and the filmstrip have sent, and whether the next filmstrip fits."""

    def __init__(self, share: float = SHARE, allowance: int = ALLOWANCE):
        self.share = share
        self.allowance = allowance
        self.preview_bytes = 0
        self.filmstrip_bytes = 0
        self.preview_size: Optional[int] = None  # the first preview's encoded size: later ones are alike
        self.skipped = 0

    def count_preview(self, preview: Any) -> None:
        if preview is None:
            return
        if self.preview_size is None:
            self.preview_size = encoded_size(preview)
        self.preview_bytes += self.preview_size

    def fits(self) -> bool:
        """Whether the next filmstrip may go out (it may overshoot the budget by that one event)."""
        fits = self.filmstrip_bytes <= self.share * self.preview_bytes + self.allowance
        self.skipped += not fits
        return fits

    def count_filmstrip(self, images: list) -> None:
        self.filmstrip_bytes += sum(len(image) for image in images if image is not None)
