"""Inner steps per outer step, and what they cost in model evaluations (NFEs)."""
from __future__ import annotations

import re
from typing import Sequence

from .errors import NestedDiffusionError
from .schedules import MAX_TOTAL_STEPS

# Solvers that evaluate the model twice per step, except on the step that ends at sigma 0 (plain Euler, or
# for sa_solver_pece no corrector evaluation there). Checked against counted model calls in the tests.
# Planning measures every solver's cost (nodes/solver_cost.py); these names only give an estimate where the
# measurement cannot run, and scale the measured cost onto the later steps of an update_seconds re-plan.
TWO_STAGE_SOLVERS = frozenset({
    "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "seeds_2", "sa_solver_pece",
})
THREE_STAGE_SOLVERS = frozenset({"seeds_3"})
# Solvers whose model calls cannot be known before running: the progress total is then an estimate.
ADAPTIVE_SOLVERS = frozenset({"dpm_adaptive"})

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


def nfe_for_inner_process(solver_name: str, steps: int) -> int:
    """Model evaluations one inner process of ``steps`` steps (ending at sigma 0) costs with this solver."""
    if solver_name in TWO_STAGE_SOLVERS:
        return 2 * steps - 1
    if solver_name in THREE_STAGE_SOLVERS:
        return 3 * steps - 2
    if solver_name == "heunpp2":  # 3 evaluations, 2 on the step before last, 1 on the last
        return max(1, 3 * steps - 3)
    return steps


def total_nfe(solver_name: str, steps_per_outer: Sequence[int]) -> int:
    return sum(nfe_for_inner_process(solver_name, steps) for steps in steps_per_outer)
