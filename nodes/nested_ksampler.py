"""NestedKSampler: a drop-in for KSampler that shows a real image after every inner diffusion."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from .inner_solver import InnerSolver
from .sampling import InnerSolverSpec, plan_nested_run, run_nested_sampling


def solver_spec(sampler_name: str, scheduler: str, inner_steps: int, inner_solver=None) -> InnerSolverSpec:
    """An InnerSolverSelect input overrides the node's own sampler_name / scheduler / inner_steps."""
    if inner_solver is not None:
        return inner_solver
    return InnerSolverSpec(sampler_name=sampler_name, scheduler=scheduler, steps=inner_steps)


class NestedKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NestedKSampler",
            display_name="Nested KSampler (anytime)",
            category="sampling/nested",
            description="KSampler with Nested Diffusion (Elata et al., WACV 2024): every outer step runs a complete "
                        "inner diffusion, so a real image is ready after each one, at the same cost as KSampler "
                        "with outer_steps x inner_steps steps.",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                io.Int.Input("outer_steps", default=4, min=1, max=1000,
                             tooltip="Outer steps: how many anytime images the run produces."),
                io.Int.Input("inner_steps", default=10, min=1, max=10000,
                             tooltip="Steps of the inner diffusion run at every outer step."),
                io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES,
                               tooltip="The inner solver."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                               tooltip="Spaces the outer steps, and the inner steps unless inner_solver is connected."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01),
                InnerSolver.Input("inner_solver", optional=True,
                                  tooltip="Overrides sampler_name, scheduler (inner only) and inner_steps."),
                io.Float.Input("outer_eta", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="0: deterministic outer DDIM steps (the paper). Above 0: ancestral outer steps."),
            ],
            outputs=[
                io.Latent.Output(display_name="samples"),
                io.Latent.Output(display_name="outer_previews",
                                 tooltip="The inner result of every outer step, outer-major."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, seed, outer_steps, inner_steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, inner_solver=None, outer_eta=0.0) -> io.NodeOutput:
        spec = solver_spec(sampler_name, scheduler, inner_steps, inner_solver)
        plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, scheduler, denoise)
        samples, previews = run_nested_sampling(model, seed, cfg, positive, negative, latent_image, plan,
                                                outer_eta, cls.hidden.unique_id)
        return io.NodeOutput(samples, previews)
