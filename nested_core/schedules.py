"""Outer and inner sigma schedules, built from any scheduler.

A *schedule function* maps a step count ``n`` to ``n + 1`` decreasing sigmas ending with 0, the way
ComfyUI's ``calculate_sigmas(model_sampling, scheduler, n)`` does. Everything here works on such a
function, so every scheduler and every model sampling (eps, v, flow with its shift) is handled alike.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .errors import NestedDiffusionError

ScheduleFn = Callable[[int], torch.Tensor]

MAX_TOTAL_STEPS = 10000
LINEAR_SCAN_LIMIT = 2000
SCAN_EVALUATIONS = 50  # lengths the last-resort scan tries before it gives up (each costs a whole schedule)
# The longest schedule ever built: KSampler's own largest, 10000 steps at denoise 0.01 (4 MB of float32 sigmas).
MAX_SCHEDULE_LENGTH = 1_000_000


def check_schedule(sigmas: torch.Tensor, what: str = "sigmas") -> None:
    """Raise unless ``sigmas`` is finite, strictly decreasing and ends with exactly one 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise NestedDiffusionError(f"{what} must hold at least two values (a start and a final 0), got {sigmas.numel()}")
    if not torch.isfinite(sigmas).all():
        raise NestedDiffusionError(f"{what} must be finite, got {sigmas.tolist()}")
    if float(sigmas[-1]) != 0.0:
        raise NestedDiffusionError(f"{what} must end with 0, got {float(sigmas[-1])}")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise NestedDiffusionError(f"{what} must be strictly decreasing, got {sigmas.tolist()}")


def is_valid_schedule(sigmas: torch.Tensor) -> bool:
    try:
        check_schedule(sigmas)
    except NestedDiffusionError:
        return False
    return True


def check_steps(value: int, name: str, minimum: int = 1, maximum: int = MAX_TOTAL_STEPS) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise NestedDiffusionError(f"{name} must be an integer from {minimum} to {maximum}, got {value!r}")
    return value


def _sigma_before_tail(schedule_fn: ScheduleFn, total_steps: int, tail_steps: int) -> Optional[float]:
    """First sigma of the last ``tail_steps`` steps of a ``total_steps`` schedule; None if it can't be built."""
    try:
        sigmas = schedule_fn(total_steps)
    except Exception:  # schedulers have their own resolution limits (ddim_uniform stops at 1000 steps)
        return None
    if sigmas.numel() < tail_steps + 1:  # some schedulers (ddim_uniform) return more or fewer sigmas than asked
        return None
    return float(sigmas[-(tail_steps + 1)])


def _pinned_tail(schedule_fn: ScheduleFn, total_steps: int, tail_steps: int, start_sigma: float) -> Optional[torch.Tensor]:
    try:
        sigmas = schedule_fn(total_steps)
    except Exception:
        return None
    if sigmas.numel() < tail_steps + 1:
        return None
    tail = sigmas[-(tail_steps + 1):].detach().to(dtype=torch.float32, device="cpu").clone()
    tail[0] = start_sigma
    return tail if is_valid_schedule(tail) else None


REFERENCE_LENGTH = 1000  # the schedule read to guess the length whose tail starts at a given sigma


def _guess_length(schedule_fn: ScheduleFn, steps: int, start_sigma: float, max_total_steps: int) -> Optional[int]:
    """The schedule length whose tail of ``steps`` steps starts near ``start_sigma``, for a scheduler that spaces a
    fixed curve over its length (most do): where ``start_sigma`` falls on a reference schedule, as a fraction ``p``
    of it, and the length ``n`` with ``(n - steps) / (n - 1) = p``. Only a starting point for the search."""
    try:
        reference = schedule_fn(min(REFERENCE_LENGTH, max_total_steps)).detach().to(dtype=torch.float64, device="cpu")
    except Exception:
        return None
    sigmas = reference[:-1]
    count = sigmas.numel()
    if count < 2 or not bool(torch.isfinite(sigmas).all()):
        return None
    above = int((sigmas > start_sigma).sum())
    if above == 0:
        return steps
    if above >= count:
        return max_total_steps
    high, low = float(sigmas[above - 1]), float(sigmas[above])
    within = 0.0
    if low > 0 and high > low:
        within = (math.log(high) - math.log(start_sigma)) / (math.log(high) - math.log(low))
    fraction = min(max((above - 1 + within) / (count - 1), 0.0), 1.0)
    if fraction >= 1.0 - 1e-9:
        return max_total_steps
    return int(min(max(round((steps - fraction) / (1 - fraction)), steps), max_total_steps))


def _closer_first(start_sigma: float, candidates: Sequence[int], values: dict[int, float]) -> list[int]:
    def log_gap(total: int) -> float:
        return abs(math.log(max(values[total], 1e-12)) - math.log(start_sigma))

    return sorted(candidates, key=log_gap)


def truncated_schedule(schedule_fn: ScheduleFn, steps: int, start_sigma: float, max_total_steps: int = MAX_TOTAL_STEPS,
                       scan_all: bool = True) -> torch.Tensor:
    """The last ``steps`` steps of the scheduler's own schedule, pinned to start exactly at ``start_sigma``.

    This is KSampler's ``denoise`` truncation run backwards: find the schedule length whose tail of
    ``steps`` steps starts closest to ``start_sigma``, then set its first sigma to exactly that value.
    It keeps each scheduler's spacing (and a flow model's shift) instead of re-deriving sigmas from
    timesteps, which for flow models would apply the shift twice and end with two zeros.
    """
    check_steps(steps, "steps", maximum=max_total_steps)
    if not (math.isfinite(start_sigma) and start_sigma > 0):
        raise NestedDiffusionError(f"start sigma must be a finite number above 0, got {start_sigma}")

    values: dict[int, float] = {}

    def value(total: int) -> Optional[float]:
        if total not in values:
            found = _sigma_before_tail(schedule_fn, total, steps)
            if found is None:
                return None
            values[total] = found
        return values[total]

    first = value(steps)
    if first is None:
        raise NestedDiffusionError(f"the scheduler cannot build a schedule of {steps} steps")
    if first <= start_sigma * (1 + 1e-6):
        tail = _pinned_tail(schedule_fn, steps, steps, start_sigma)
        if tail is not None:
            return tail

    def at_or_below(total: int) -> bool:
        found = value(total)
        return found is None or found <= start_sigma

    # Find the first length whose tail starts at or below start_sigma: gallop from a guess read off one reference
    # schedule (usually within a few lengths), then bisect. Each length costs a whole schedule, so few are tried.
    low, high = steps, None
    guess = _guess_length(schedule_fn, steps, start_sigma, max_total_steps)
    if guess is not None and guess > low:
        if at_or_below(guess):
            high, jump = guess, 1
            while high - jump > low:
                if not at_or_below(high - jump):
                    low = high - jump
                    break
                high, jump = high - jump, jump * 2
        else:
            low = guess
    if high is None:
        jump = 1
        while low + jump <= max_total_steps:
            if at_or_below(low + jump):
                high = low + jump
                break
            low, jump = low + jump, jump * 2
        if high is None:
            high = max_total_steps
    while high - low > 1:
        middle = (low + high) // 2
        if at_or_below(middle):
            high = middle
        else:
            low = middle

    # The two ends of the bracket (the closer first), then their neighbours, then, for schedulers whose sigmas don't
    # move monotonically with the step count, lengths further out (at most LINEAR_SCAN_LIMIT tried).
    tried: set[int] = set()

    def pinned(candidates) -> Optional[torch.Tensor]:
        usable = [t for t in candidates if steps <= t <= max_total_steps and t not in tried and value(t) is not None]
        for total in _closer_first(start_sigma, usable, values):
            tried.add(total)
            tail = _pinned_tail(schedule_fn, total, steps, start_sigma)
            if tail is not None:
                return tail
        return None

    for candidates in ([low, high], [low - 2, low - 1, high + 1, high + 2]):
        tail = pinned(candidates)
        if tail is not None:
            return tail
    if scan_all:
        scan_limit = min(max_total_steps, LINEAR_SCAN_LIMIT)
        outward = sorted(range(steps, scan_limit + 1), key=lambda t: (min(abs(t - low), abs(t - high)), t))
        for total in outward[:LINEAR_SCAN_LIMIT]:
            if total in tried or value(total) is None:
                continue
            tried.add(total)
            tail = _pinned_tail(schedule_fn, total, steps, start_sigma)
            if tail is not None:
                return tail
            if len(tried) >= SCAN_EVALUATIONS:
                break
    raise NestedDiffusionError(
        f"{steps} steps starting at sigma {start_sigma:.6g} is beyond this scheduler's resolution "
        f"(it cannot place that many distinct sigmas below the start); use fewer steps or another scheduler"
    )


def denoise_start_sigma(schedule_fn: ScheduleFn, total_steps: int, denoise: float,
                        scheduler: str = "this scheduler") -> Optional[float]:
    """Where a vanilla KSampler with ``total_steps`` steps and this ``denoise`` starts; None for a full run."""
    if not (math.isfinite(denoise) and 0.0 < denoise <= 1.0):
        raise NestedDiffusionError(f"denoise must be above 0 and at most 1, got {denoise}")
    if denoise > 0.9999:
        return None
    steps, length = denoise_lengths(total_steps, denoise)
    full = schedule_fn(length)
    if full.numel() < steps + 1:
        raise NestedDiffusionError(
            f"denoise {denoise:g} with {total_steps} steps in all is beyond the resolution of {scheduler}: it gives "
            f"{full.numel() - 1} steps when asked for {length}; use fewer steps, a higher denoise or another scheduler"
        )
    return float(full[-(steps + 1)])


def denoise_lengths(total_steps: int, denoise: float, max_length: int = MAX_SCHEDULE_LENGTH) -> tuple[int, int]:
    """(steps, schedule length) for KSampler's denoise truncation: ``(total_steps, int(total_steps / denoise))``
    while that length is at most ``max_length`` (KSampler's own largest); beyond it, the same fraction of the
    schedule at a resolution that fits (100 outer x 10000 inner at denoise 0.01 would otherwise ask for 10^8 sigmas)."""
    steps = int(total_steps)
    length = int(steps / denoise)
    if length > max_length:
        steps = max(1, int(steps * max_length / length))
        while steps > 1 and int(steps / denoise) > max_length:
            steps -= 1
        length = max(int(steps / denoise), steps)
    return steps, length


def outer_schedule(schedule_fn: ScheduleFn, outer_steps: int, start_sigma: Optional[float] = None) -> torch.Tensor:
    """``outer_steps`` sigmas and a final 0: the scheduler's ``outer_steps + 1`` steps without the last non-zero sigma.

    The last inner process already ends at 0, so an outer step at the schedule's smallest sigma would
    spend a whole inner process refining an almost clean image (the paper's reference does the same).
    """
    check_steps(outer_steps, "outer_steps")
    if start_sigma is None:
        full = schedule_fn(outer_steps + 1).detach().to(dtype=torch.float32, device="cpu")
    else:
        full = truncated_schedule(schedule_fn, outer_steps + 1, start_sigma)
    sigmas = torch.cat([full[:-2], full[-1:]])
    if sigmas.numel() != outer_steps + 1:
        raise NestedDiffusionError(
            f"the scheduler gives {full.numel() - 1} steps when asked for {outer_steps + 1}: it cannot space {outer_steps} outer steps"
        )
    check_schedule(sigmas, "outer schedule")
    return sigmas



def largest_count_that_works(build: Callable[[int], object], upper: int) -> int:
    """The largest step count below ``upper`` for which ``build`` succeeds (binary search; 0 if none does).
    Used to tell the user what fits when a count is beyond a scheduler's resolution."""
    low, high = 0, upper
    while high - low > 1:
        middle = (low + high) // 2
        try:
            build(middle)
            low = middle
        except NestedDiffusionError:
            high = middle
    return low


def path_completion_steps(inner_steps: int) -> int:
    """Of an inner diffusion of ``inner_steps`` steps on the "path" outer step, the steps that complete the anytime
    image from the next outer sigma to 0: a quarter, at least one (none for a single step, which the trajectory
    step's Euler move carries down to the next outer sigma)."""
    return max(1, math.ceil(inner_steps / 4)) if inner_steps > 1 else 0


def path_schedules(schedule_fn: ScheduleFn, steps_per_outer: Sequence[int],
                   denoise: float = 1.0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Outer sigmas and inner schedules for the "path" outer step: the outer chain is KSampler's own path.

    One grid, the scheduler's schedule for N steps (with KSampler's ``denoise`` truncation), where N is every inner
    diffusion's steps less its completion steps (``path_completion_steps``), the last one's whole. Outer sigma k is
    the grid point after the path steps of the inner diffusions before it. Inner diffusion k walks the grid down to
    outer sigma k + 1, then completes to 0 in its completion steps spaced as the scheduler spaces a schedule that
    starts there; the last walks the grid to 0. Taken with the trajectory outer step (the solver's state where it
    crosses the next outer sigma), the outer chain is the solver on KSampler's N-step grid (exactly KSampler's path
    for a one-step solver such as euler), the final image KSampler's at N steps, and each anytime image a short
    completion of the path so far.
    """
    counts = [check_steps(count, "inner_steps") for count in steps_per_outer]
    if not counts:
        raise NestedDiffusionError("the path outer step needs at least one outer step")
    walked = [count - path_completion_steps(count) if count > 1 else 1 for count in counts[:-1]]
    total = sum(walked) + counts[-1]
    steps, length = denoise_lengths(total, denoise) if denoise <= 0.9999 else (total, total)
    if steps != total:
        raise NestedDiffusionError(f"denoise {denoise:g} with {total} path steps needs a schedule longer than "
                                   f"{MAX_SCHEDULE_LENGTH} sigmas; use a higher denoise or fewer steps")
    full = schedule_fn(length).detach().to(dtype=torch.float32, device="cpu")
    grid = full[-(total + 1):]
    if full.numel() != length + 1 or not is_valid_schedule(grid):
        raise NestedDiffusionError(f"the scheduler gives {full.numel() - 1} steps when asked for {length}: it cannot "
                                   f"place the path's {total} steps; use fewer steps or another scheduler")
    starts = [sum(walked[:k]) for k in range(len(counts))]
    inner = []
    for k, count in enumerate(counts[:-1]):
        segment = grid[starts[k]:starts[k + 1] + 1]
        completion = path_completion_steps(count)
        tail = truncated_schedule(schedule_fn, completion, float(segment[-1]))[1:] if completion else grid.new_zeros(1)
        inner.append(torch.cat([segment, tail]) if completion else torch.cat([segment[:1], tail]))
    inner.append(grid[starts[-1]:].clone())
    outer = torch.cat([grid[starts], grid.new_zeros(1)])
    check_schedule(outer, "outer schedule")
    return outer, inner
