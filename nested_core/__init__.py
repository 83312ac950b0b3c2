"""The nested diffusion algorithm in pure torch: no ComfyUI imports, testable alone."""
from .budget import StopRule, projected_costs, spent_per_inner_process
from .errors import NestedDiffusionError, check_number
from .nested import (
    CountedModel,
    NestedResult,
    OuterStepRule,
    RunHooks,
    derive_seed,
    outer_step,
    renoise_step,
    run_nested,
    seeded_outer_noise,
)
from .pacing import IntervalPacer, check_update_seconds, paced_outer_sigmas, split_steps, steps_for_interval
from .schedules import (
    MAX_TOTAL_STEPS,
    check_schedule,
    check_steps,
    denoise_start_sigma,
    is_valid_schedule,
    largest_count_that_works,
    outer_schedule,
    path_completion_steps,
    path_schedules,
    truncated_schedule,
)
from .steps import (
    STEP_SCHEDULE_PRESETS,
    inner_steps_per_outer,
    parse_step_schedule,
    preset_step_schedule,
)

__all__ = [
    "MAX_TOTAL_STEPS", "STEP_SCHEDULE_PRESETS", "StopRule", "preset_step_schedule", "CountedModel", "NestedResult", "OuterStepRule", "RunHooks", "run_nested", "NestedDiffusionError", "check_number", "check_schedule", "check_steps",
    "denoise_start_sigma", "derive_seed", "inner_steps_per_outer", "is_valid_schedule", "largest_count_that_works",
    "outer_schedule", "outer_step", "renoise_step", "parse_step_schedule", "seeded_outer_noise",
    "truncated_schedule", "path_completion_steps", "path_schedules", "projected_costs", "spent_per_inner_process",
    "IntervalPacer", "check_update_seconds", "paced_outer_sigmas", "split_steps", "steps_for_interval",
]
