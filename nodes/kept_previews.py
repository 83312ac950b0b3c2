"""Which inner results a nested run keeps for its outer_previews output: a bounded, evenly spread selection.

The rule (documented in docs/reliability.md): a run keeps at most ``MAX_PREVIEW_IMAGES`` images (outer steps x
batch), so at most ``max(1, MAX_PREVIEW_IMAGES // batch)`` outer steps; the latest outer step is always kept whole
(NestedPickCandidate reads it). While they fit, every outer step is kept; beyond that, the first outer step and every
``stride``-th one after it, the stride doubling whenever the selection would overflow, plus the latest. Batch 1 keeps
up to 64 outer steps, batch 4 up to 16, batch 16 up to 4, a batch above 32 only the latest. A sampler without an
outer_previews output (NestedSampler's SAMPLER) keeps none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

MAX_PREVIEW_IMAGES = 64


@dataclass
class KeptStep:
    index: int  # 0-based outer step of this run
    latent: Optional[torch.Tensor]  # None once moved into the outer_previews output
    nfe: int
    sigma: float
    number: int  # 1-based outer step in the whole schedule
    items: list[int] = field(default_factory=list)  # each image's batch index (after a pick: the one kept)


class KeptPreviews:
    """Streaming selection: ``add`` after every outer step, ``steps`` for the outer_previews output."""

    def __init__(self, max_images: int = MAX_PREVIEW_IMAGES):
        self.max_images = max_images
        self.capacity: Optional[int] = None  # outer steps, set from the first batch
        self.stride = 1
        self.grid: list[KeptStep] = []  # indices that are multiples of the stride
        self.latest: Optional[KeptStep] = None  # the latest step when it is not on the grid

    @property
    def active(self) -> bool:
        """False for a run without an outer_previews output: it keeps nothing."""
        return self.max_images > 0

    def add(self, step: KeptStep) -> None:
        if not self.active:
            return
        if self.capacity is None:
            batch = int(step.latent.shape[0]) if step.latent.ndim > 0 else 1
            self.capacity = max(1, self.max_images // max(batch, 1))
        if self.capacity == 1:
            self.grid, self.latest = [], step
            return
        if step.index % self.stride == 0:
            self.grid.append(step)
            self.latest = None
        else:
            self.latest = step
        while len(self.grid) + (self.latest is not None) > self.capacity:
            self.stride *= 2
            self.grid = [kept for kept in self.grid if kept.index % self.stride == 0]
            if self.latest is None and step not in self.grid:
                self.latest = step

    @property
    def steps(self) -> list[KeptStep]:
        return self.grid + ([self.latest] if self.latest is not None else [])

    def __len__(self) -> int:
        return len(self.steps)
