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
    """``rule(index, nfe_done)`` after outer step ``index``: True ends the run with that step's inner result.

    ``max_nfe``: never start an outer step whose inner diffusion would take the run past this many NFEs.
    ``max_seconds``: don't start one that, at the speed measured so far, would end past this time.
    0 disables a budget.
    """

    nfe_per_outer: Sequence[int]
    max_nfe: int = 0
    max_seconds: float = 0.0
    finish_requested: Optional[Callable[[], bool]] = None
    started: float = field(default_factory=time.monotonic)
    reason: Optional[str] = None

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

    def __call__(self, index: int, nfe_done: int) -> bool:
        self.reason = self._reason_to_stop(index, nfe_done)
        return self.reason is not None

    def _reason_to_stop(self, index: int, nfe_done: int) -> Optional[str]:
        following = index + 1
        if following >= len(self.nfe_per_outer):
            return None
        if self.finish_requested is not None and self.finish_requested():
            return "finish requested"
        cost = self.nfe_per_outer[following]
        if self.max_nfe and nfe_done + cost > self.max_nfe:
            return "max_nfe"
        if self.max_seconds and nfe_done > 0:
            elapsed = time.monotonic() - self.started
            if elapsed + elapsed / nfe_done * cost > self.max_seconds:
                return "max_seconds"
        return None
