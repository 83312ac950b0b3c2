"""A new image every ``update_seconds``: the inner processes' lengths chosen from the measured time per model call.

``outer_steps x inner_steps`` is a budget of S steps. The first inner process runs as planned; after every inner
process the rest of the budget is planned again: each following inner process gets
``n = round((update_seconds - overhead) / (seconds per call x calls per step))`` steps, the steps left are split
evenly over ``round(left / n)`` outer steps, and those outer steps take the sigmas of the outer scheduler's own
schedule from the current outer sigma down (``outer_schedule`` pinned there), the way the whole run's outer steps
were placed. Everything here is pure: the clock is read by the caller.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import NestedDiffusionError
from .schedules import ScheduleFn, outer_schedule

MAX_UPDATE_SECONDS = 3600.0
MAX_OUTER_STEPS = 1000  # the nested sampler nodes' outer_steps maximum: no re-plan places more, however short the wait


def check_update_seconds(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= MAX_UPDATE_SECONDS:
        raise NestedDiffusionError(f"update_seconds must be 0 (off) or a number of seconds up to {MAX_UPDATE_SECONDS:g}, got {value!r}")
    return float(value)


def steps_for_interval(update_seconds: float, seconds_per_call: float, calls_per_step: float,
                       overhead_seconds: float = 0.0) -> int:
    """Inner steps whose model calls fill ``update_seconds`` less the per-outer-step ``overhead_seconds`` (at least 1)."""
    step_seconds = max(seconds_per_call, 0.0) * max(calls_per_step, 0.0)
    if step_seconds <= 0 or not math.isfinite(step_seconds):
        return 1
    available = max(update_seconds - max(overhead_seconds, 0.0), 0.0)
    return max(1, int(round(available / step_seconds)))


def split_steps(remaining: int, steps: int) -> list[int]:
    """``remaining`` steps as ``round(remaining / steps)`` (at least 1) inner processes of near-equal length, longer
    first: every process stays within a factor 1.5 of ``steps`` and the budget is spent exactly."""
    if remaining <= 0:
        return []
    count = max(1, min(remaining, int(round(remaining / max(steps, 1)))))
    base, extra = divmod(remaining, count)
    return [base + 1] * extra + [base] * (count - extra)


def paced_outer_sigmas(schedule_fn: ScheduleFn, sigma: float, outer_steps: int) -> torch.Tensor:
    """The ``outer_steps`` outer sigmas after ``sigma`` and a final 0: the outer scheduler's schedule of
    ``outer_steps + 1`` outer steps pinned to start at ``sigma``, without ``sigma`` itself. With the planned counts
    it gives back the planned outer sigmas (for schedulers whose truncation finds the plan's length)."""
    sigmas = outer_schedule(schedule_fn, outer_steps + 1, start_sigma=sigma)
    return sigmas[1:]


@dataclass
class IntervalPacer:
    """Chooses the following inner processes' lengths after each one: ``update(...)`` returns the step counts of the
    outer steps left (summing to what is left of ``total_steps``), measured afresh every time: the time per call,
    the calls per step and the overhead per outer step are the medians of the last ``window`` inner processes after
    the first, so one process slowed by a busy machine does not make the next one short, and a model that slows down
    for good is followed from its second slow process on."""

    update_seconds: float
    total_steps: int
    window: int = 3
    max_outer_steps: int = MAX_OUTER_STEPS  # outer steps this pacer's run may have in all (the measured ones included)
    clock: Callable[[], float] = time.monotonic
    last_end: Optional[float] = None
    measured: list = field(default_factory=list)  # (steps, calls, inner seconds, overhead seconds) per inner process

    def update(self, steps_done: int, steps: int, calls: int, inner_seconds: float) -> list[int]:
        """After an inner process of ``steps`` steps and ``calls`` model calls that took ``inner_seconds``, with
        ``steps_done`` steps spent in all (it included)."""
        now = self.clock()
        overhead = 0.0 if self.last_end is None else max(now - self.last_end - inner_seconds, 0.0)
        self.last_end = now
        self.measured.append((steps, calls, inner_seconds, overhead))
        remaining = self.total_steps - steps_done
        if remaining <= 0:
            return []
        if calls <= 0 or steps <= 0:
            return split_steps(remaining, remaining)
        # The first inner process counts only until another is measured: it may carry a warm-up (first calls on a
        # GPU) and it has no overhead measured.
        later = [m for m in self.measured[1:] if m[0] > 0 and m[1] > 0]
        recent = later[-self.window:] if later else self.measured[:1]
        n = steps_for_interval(self.update_seconds, statistics.median(m[2] / m[1] for m in recent),
                               statistics.median(m[1] / m[0] for m in recent), statistics.median(m[3] for m in recent))
        return split_steps(remaining, min(max(n, self.fewest_steps(remaining)), remaining))

    def fewest_steps(self, remaining: int) -> int:
        """The shortest inner process that keeps the run within ``max_outer_steps``: the ``remaining`` steps over the
        outer steps still allowed (at least one; ``split_steps`` makes at most ``remaining / steps`` of them)."""
        allowed = max(self.max_outer_steps - len(self.measured), 1)
        return -(-remaining // allowed)
