"""Inner steps per outer step: presets and per-step lists. What they cost is measured, not looked up
(nodes/solver_cost.py)."""
from __future__ import annotations

import re

from .errors import NestedDiffusionError
from .schedules import MAX_TOTAL_STEPS

_LIST_PATTERN = re.compile(r"^\s*\d+\s*(,\s*\d+\s*)*,?\s*$")
# Presets spread outer_steps x inner_steps over the outer steps differently, keeping the total.
STEP_SCHEDULE_PRESETS = ("uniform", "front-loaded", "back-loaded")


def preset_step_schedule(preset: str, outer_steps: int, inner_steps: int) -> list[int]:
    """Inner steps per outer step for a preset, summing to ``outer_steps * inner_steps``, each at least 1.

    front-loaded: weights K, K-1, ..., 1, so the first anytime images are already detailed;
    back-loaded: the reverse, so the first image comes sooner and later steps refine it.
    """
    total = outer_steps * inner_steps
    if preset == "uniform":
        weights = [1.0] * outer_steps
    elif preset == "front-loaded":
        weights = [float(outer_steps - k) for k in range(outer_steps)]
    elif preset == "back-loaded":
        weights = [float(k + 1) for k in range(outer_steps)]
    else:
        raise NestedDiffusionError(f"step_schedule preset must be one of {', '.join(STEP_SCHEDULE_PRESETS)}, got {preset!r}")
    spare = total - outer_steps  # every outer step gets 1, the rest goes by weight (largest remainder)
    shares = [spare * w / sum(weights) for w in weights]
    counts = [1 + int(share) for share in shares]
    by_remainder = sorted(range(outer_steps), key=lambda k: (-(shares[k] - int(shares[k])), k))
    for k in by_remainder[: total - sum(counts)]:
        counts[k] += 1
    return counts


def shortened(text, limit: int = 80) -> str:
    """``repr`` of a user's text for an error message, cut to about ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(text)} characters)"


def parse_step_schedule(text: str, outer_steps: int) -> list[int]:
    """Parse ``"20,10,5,5"``: one positive inner step count per outer step."""
    if not _LIST_PATTERN.match(text or ""):
        raise NestedDiffusionError(
            f"step_schedule must be a comma-separated list of positive integers such as '20,10,5,5', "
            f"or one of {', '.join(STEP_SCHEDULE_PRESETS)}; got {shortened(text)}"
        )
    parts = [part.strip() for part in text.split(",") if part.strip()]
    for index, part in enumerate(parts):
        if len(part.lstrip("0")) > len(str(MAX_TOTAL_STEPS)):  # before int(): Python refuses 4300+ digits
            raise NestedDiffusionError(
                f"step_schedule entry {index + 1} is a {len(part)}-digit number: each must be from 1 to {MAX_TOTAL_STEPS}"
            )
    counts = [int(part) for part in parts]
    if len(counts) != outer_steps:
        raise NestedDiffusionError(
            f"step_schedule lists {len(counts)} inner step counts but outer_steps is {outer_steps}: give exactly one per outer step"
        )
    for index, count in enumerate(counts):
        if not 1 <= count <= MAX_TOTAL_STEPS:
            raise NestedDiffusionError(
                f"step_schedule entry {index + 1} is {count}: each must be from 1 to {MAX_TOTAL_STEPS}"
            )
    return counts


def inner_steps_per_outer(outer_steps: int, inner_steps: int, step_schedule: str = "") -> list[int]:
    """The inner step count of every outer step: ``step_schedule`` (a list or a preset name) if given,
    else ``inner_steps`` each."""
    text = (step_schedule or "").strip()
    if text.lower() in STEP_SCHEDULE_PRESETS:
        return preset_step_schedule(text.lower(), outer_steps, inner_steps)
    if text:
        return parse_step_schedule(text, outer_steps)
    return [inner_steps] * outer_steps
