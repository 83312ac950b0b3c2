"""When to end a nested run early while keeping its image: NFE and time budgets, or a finish request.
Checked after every inner diffusion, never inside one."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from .errors import NestedDiffusionError


@dataclass
class StopRule:
    """``rule(index, nfe_done)`` after outer step ``index``: a reason ends the run with that step's inner result
    (None: go on).

    ``max_nfe``: never start an outer step whose inner diffusion would take the run past this many NFEs.
    ``max_seconds``: don't start one that, at the speed measured so far, would end past this time.
    0 disables a budget.
    """

    nfe_per_outer: Sequence[int]
    max_nfe: int = 0
    max_seconds: float = 0.0
    finish_requested: Optional[Callable[[], bool]] = None
    started: float = field(default_factory=time.monotonic)
    spent: list = field(default_factory=list)  # NFEs each inner process so far really spent

    def __post_init__(self) -> None:
        if self.max_nfe < 0:
            raise NestedDiffusionError(f"max_nfe must be 0 (no limit) or positive, got {self.max_nfe}")
        if not math.isfinite(self.max_seconds) or self.max_seconds < 0:
            raise NestedDiffusionError(f"max_seconds must be 0 (no limit) or a positive number of seconds, got {self.max_seconds}")
        if self.max_nfe and self.nfe_per_outer and self.nfe_per_outer[0] > self.max_nfe:
            raise NestedDiffusionError(
                f"max_nfe {self.max_nfe} is below the cost of the first inner diffusion ({self.nfe_per_outer[0]} NFEs): "
                f"raise max_nfe to at least {self.nfe_per_outer[0]}, or use fewer inner steps"
            )

    def __call__(self, index: int, nfe_done: int) -> Optional[str]:
        self.spent = spent_per_inner_process(self.spent[:index], nfe_done)
        return self._reason_to_stop(index, nfe_done)

    def _reason_to_stop(self, index: int, nfe_done: int) -> Optional[str]:
        following = index + 1
        if following >= len(self.nfe_per_outer):
            return None
        if self.finish_requested is not None and self.finish_requested():
            return "finish requested"
        cost = projected_costs(self.nfe_per_outer, self.spent)[following]
        if self.max_nfe and nfe_done + cost > self.max_nfe:
            return "max_nfe"
        if self.max_seconds and nfe_done > 0:
            elapsed = time.monotonic() - self.started
            if elapsed + elapsed / nfe_done * cost > self.max_seconds:
                return "max_seconds"
        return None


def spent_per_inner_process(spent: Sequence[int], nfe_done: int) -> list[int]:
    """``spent`` (NFEs of the inner processes before) extended by the one that just ended at ``nfe_done`` in all."""
    return [*spent, nfe_done - sum(spent)]


def projected_costs(planned: Sequence[int], spent: Sequence[int]) -> list[int]:
    """The NFEs of every inner process: what the ones already run really spent, then the planned (measured) cost of
    the rest, scaled by the largest ratio of spent to planned seen so far. Exactly the plan for a solver whose
    calls do not depend on the model; for an adaptive one (``dpm_adaptive``) the real model's own tendency."""
    ratios = [done / plan for done, plan in zip(spent, planned) if plan > 0]
    ratio = max(ratios) if ratios else 1.0
    return [*spent, *(max(1, math.ceil(plan * ratio - 1e-9)) for plan in planned[len(spent):])]
