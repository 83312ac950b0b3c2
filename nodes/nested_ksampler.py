"""NestedKSampler and NestedKSamplerAdvanced: KSampler drop-ins that show a real image after every inner diffusion."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..nested_core import NestedDiffusionError
from . import rerun
from .inner_solver import InnerSolverType
from .nested_run import NestedDiffusionSampler, sample_latent
from .planning import OUTER_STEP_MODES, InnerSolverSpec, NestedSettings, RunLimits, plan_node_run
from .previews_wanted import outer_previews_wanted

OUTPUTS = [
    io.Latent.Output(display_name="samples"),
    io.Latent.Output(display_name="outer_previews",
                     tooltip="The inner results of the outer steps, outer-major: every outer step while they fit in 64 "
                             "images, else evenly spaced ones and always the latest."),
]


def solver_spec(sampler_name: str, scheduler: str, inner_steps: int, inner_solver=None) -> InnerSolverSpec:
    """An InnerSolverSelect input overrides the node's own sampler_name / scheduler / inner_steps."""
    if inner_solver is not None:
        return inner_solver
    return InnerSolverSpec(sampler_name=sampler_name, scheduler=scheduler, steps=inner_steps)


def step_inputs() -> list:
    return [
        io.Int.Input("outer_steps", default=4, min=1, max=1000, tooltip="Outer steps: how many anytime images the run produces."),
        io.Int.Input("inner_steps", default=10, min=1, max=10000, tooltip="Steps of the inner diffusion run at every outer step."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, tooltip="The inner solver."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES,
                       tooltip="Spaces the outer steps, and the inner steps unless inner_solver is connected."),
        io.Conditioning.Input("positive"),
        io.Conditioning.Input("negative"),
        io.Latent.Input("latent_image"),
    ]


def optional_inputs() -> list:
    """Inputs every nested sampler node shares: the inner solver override, outer eta and the early-finish budgets."""
    return [
        InnerSolverType.Input("inner_solver", optional=True, tooltip="Overrides sampler_name, scheduler (inner only) and inner_steps."),
        io.Float.Input("outer_eta", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="0: deterministic outer DDIM steps (the paper). Above 0: ancestral outer steps."),
        io.Int.Input("max_nfe", default=0, min=0, max=1000000, optional=True,
                     tooltip="0: no limit. Otherwise stop after the last outer step that fits in this many model "
                             "evaluations and return its image."),
        io.Float.Input("max_seconds", default=0.0, min=0.0, max=86400.0, step=0.5, optional=True,
                       tooltip="0: no limit. Otherwise don't start an outer step that would end past this time "
                               "(at the speed measured so far) and return the latest image."),
        io.Combo.Input("outer_step", options=list(OUTER_STEP_MODES), default="auto", optional=True,
                       tooltip="How the outer state moves on after each inner diffusion. ddim: the paper's step "
                               "(exact when the inner solver returns a sample of the posterior, as dpmpp_sde or seeds_2 do; "
                               "ancestral solvers come close). "
                               "renoise: the inner result diffused afresh (exact for any solver, needed for "
                               "deterministic ones like euler or dpmpp_2m, whose images otherwise get too much "
                               "contrast). trajectory: continue from the inner solver's own state at the next outer "
                               "sigma (keeps the solver's own KSampler distribution; solvers that report no path "
                               "re-noise). path: the outer steps walk KSampler's own grid with the inner "
                               "solver and each inner diffusion spends a quarter of its steps completing the anytime "
                               "image, so the final image is KSampler's at about three quarters of the steps (not "
                               "with update_seconds or connected sigmas). auto: measures the inner solver and picks ddim (posterior samplers; "
                               "ancestral solvers on flow models) or renoise (the rest)."),
        io.Float.Input("update_seconds", default=0.0, min=0.0, max=3600.0, step=0.5, optional=True,
                       tooltip="0: off. Otherwise a new image about every this many seconds: outer_steps x inner_steps "
                               "becomes the step budget, the first inner diffusion runs inner_steps steps, and each "
                               "following one gets as many steps as fit in this time at the measured speed (the "
                               "number of outer steps follows)."),
    ]


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
                *step_inputs(),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01),
                *optional_inputs(),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return rerun.fingerprint("NestedKSampler", inputs)

    @classmethod
    def execute(cls, model, seed, outer_steps, inner_steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, inner_solver=None, outer_eta=0.0, max_nfe=0, max_seconds=0.0,
                outer_step="auto", update_seconds=0.0) -> io.NodeOutput:
        key = rerun_key(cls, "NestedKSampler", locals())
        keep_previews = previews_wanted(cls)
        settings = nested_settings(sampler_name, scheduler, inner_steps, inner_solver, outer_eta, max_nfe, max_seconds,
                                   outer_step, update_seconds)
        plan = plan_node_run(model.get_model_object("model_sampling"), settings.spec, outer_steps, scheduler, denoise,
                             path=outer_step == "path")
        sampler = NestedDiffusionSampler(settings, plan, own_progress=True, rerun_key=key)
        return io.NodeOutput(*sample_latent(model, sampler, seed, cfg, positive, negative, latent_image,
                                            keep_previews=keep_previews))


def nested_settings(sampler_name: str, scheduler: str, inner_steps: int, inner_solver, outer_eta: float, max_nfe: int,
                    max_seconds: float, outer_step: str, update_seconds: float = 0.0) -> NestedSettings:
    return NestedSettings(solver_spec(sampler_name, scheduler, inner_steps, inner_solver), outer_eta, outer_step,
                          RunLimits(max_nfe, max_seconds), update_seconds)


def previews_wanted(cls) -> bool:
    """Whether this run keeps its inner results for outer_previews: unless the prompt marks it as taken by no node
    (previews_wanted.py: the mark is part of ComfyUI's cache key)."""
    return outer_previews_wanted(cls.hidden.prompt, cls.hidden.unique_id)


def rerun_key(cls, node_class: str, arguments: dict):
    """The key under which an early stop of this node's run defeats ComfyUI's cache (see rerun.py)."""
    names = [name for name in arguments if name != "cls"]
    return rerun.key_from_prompt(node_class, cls.hidden.prompt, cls.hidden.unique_id, names)


def check_stage(start: int, end: int, outer_steps: int) -> int:
    """The stage's end, clamped to outer_steps like KSamplerAdvanced clamps end_at_step."""
    end = min(end, outer_steps)
    if start >= end:
        raise NestedDiffusionError(
            f"start_at_outer_step ({start}) must be below end_at_outer_step ({end}) and outer_steps ({outer_steps})"
        )
    return end


class NestedKSamplerAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NestedKSamplerAdvanced",
            display_name="Nested KSampler (anytime, advanced)",
            category="sampling/nested",
            description="Runs outer steps start_at_outer_step to end_at_outer_step - 1 of a nested schedule, like "
                        "KSamplerAdvanced. With return_with_leftover_noise its samples are the noisy outer state, so "
                        "a second stage continues exactly where this one stopped, with its own prompt if you like.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("add_noise", options=["enable", "disable"]),
                io.Int.Input("noise_seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True),
                *step_inputs(),
                io.Int.Input("start_at_outer_step", default=0, min=0, max=1000),
                io.Int.Input("end_at_outer_step", default=1000, min=1, max=1000),
                io.Combo.Input("return_with_leftover_noise", options=["disable", "enable"]),
                *optional_inputs(),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        return rerun.fingerprint("NestedKSamplerAdvanced", inputs)

    @classmethod
    def execute(cls, model, add_noise, noise_seed, outer_steps, inner_steps, cfg, sampler_name, scheduler, positive,
                negative, latent_image, start_at_outer_step, end_at_outer_step, return_with_leftover_noise,
                inner_solver=None, outer_eta=0.0, max_nfe=0, max_seconds=0.0, outer_step="auto",
                update_seconds=0.0) -> io.NodeOutput:
        key = rerun_key(cls, "NestedKSamplerAdvanced", locals())
        end = check_stage(start_at_outer_step, end_at_outer_step, outer_steps)
        keep_previews = previews_wanted(cls)
        settings = nested_settings(sampler_name, scheduler, inner_steps, inner_solver, outer_eta, max_nfe, max_seconds,
                                   outer_step, update_seconds)
        stage = plan_node_run(model.get_model_object("model_sampling"), settings.spec, outer_steps, scheduler,
                              path=outer_step == "path",
                              stage=(start_at_outer_step, end, return_with_leftover_noise != "enable"))
        sampler = NestedDiffusionSampler(settings, stage, own_progress=True, rerun_key=key)
        return io.NodeOutput(*sample_latent(model, sampler, noise_seed, cfg, positive, negative, latent_image,
                                            add_noise=add_noise == "enable", keep_previews=keep_previews))
