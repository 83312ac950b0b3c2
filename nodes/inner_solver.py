"""InnerSolverSelect: choose the solver, scheduler and steps of every inner diffusion."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..nested_core import STEP_SCHEDULE_PRESETS, NestedDiffusionError, check_number, parse_step_schedule
from .planning import InnerSolverSpec

InnerSolverType = io.Custom("NESTED_INNER_SOLVER")


def check_step_schedule_text(step_schedule: str) -> None:
    """Reject malformed text early; whether it matches outer_steps is checked by the sampler."""
    if step_schedule.strip() and step_schedule.strip().lower() not in STEP_SCHEDULE_PRESETS:
        entries = len([part for part in step_schedule.split(",") if part.strip()])
        parse_step_schedule(step_schedule, max(entries, 1))


class InnerSolverSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InnerSolverSelect",
            display_name="Inner Solver (nested)",
            category="sampling/nested",
            description="The diffusion that runs inside every outer step of a nested sampler. The default, "
                        "euler_ancestral with eta 0.85, is the paper's DDIM with eta 0.85 in ComfyUI's terms "
                        "(ComfyUI's 'ddim' is the deterministic eta 0 case).",
            inputs=[
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler_ancestral"),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal"),
                io.Int.Input("steps", default=10, min=1, max=10000, tooltip="Inner steps per outer step."),
                io.Float.Input("eta", default=0.85, min=0.0, max=100.0, step=0.01, round=False,
                               tooltip="Noise of ancestral and SDE solvers (ignored by deterministic ones)."),
                io.Float.Input("s_noise", default=1.0, min=0.0, max=100.0, step=0.01, round=False,
                               tooltip="Noise scale of ancestral and SDE solvers."),
                io.String.Input("step_schedule", default="", optional=True,
                                tooltip="Inner steps per outer step, e.g. '20,10,5,5' (overrides steps), or a preset "
                                        "that keeps outer x steps in total: uniform, front-loaded (more inner "
                                        "steps early), back-loaded (more late)."),
            ],
            outputs=[InnerSolverType.Output(display_name="inner_solver")],
        )

    @classmethod
    def execute(cls, sampler_name, scheduler, steps, eta, s_noise, step_schedule="") -> io.NodeOutput:
        step_schedule = step_schedule or ""
        check_step_schedule_text(step_schedule)
        eta, s_noise = check_number("eta", eta, 0.0, 100.0), check_number("s_noise", s_noise, 0.0, 100.0)
        spec = InnerSolverSpec(sampler_name=sampler_name, scheduler=scheduler, steps=steps, eta=eta,
                               s_noise=s_noise, step_schedule=step_schedule.strip(), steps_input="inner solver steps")
        return io.NodeOutput(spec)


__all__ = ["InnerSolverType", "InnerSolverSelect", "NestedDiffusionError"]
