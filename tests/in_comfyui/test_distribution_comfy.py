"""Nested samples keep the data's distribution, measured on data wider than the smallest sigma.

The exact denoiser with one exemplar and spread 1.0 in latent units is N(0, I) data: the final samples'
standard deviation must be the data's (1.0), not only near a mode. The paper's eta-0 outer step after a
deterministic inner solver gives 1.4 (euler) to 1.7-2.0 (dpmpp_2m): reproduced below with outer_step "ddim".
The measuring code is the benchmark's (bench/spread.py), so the test and the report cannot drift apart.
"""
from __future__ import annotations

import pytest
import torch
from comfy_helpers import run_plan
from comfyui_nested_diffusion.bench.spread import (
    KNOWN_EXCEPTIONS,
    TOLERANCE,
    gaussian_latent,
    gaussian_model,
    ksampler_std,
    nested_std,
    node_default_spec,
    within_own_accuracy,
)

FAMILIES = [("eps", 1.0), ("v_prediction", 1.0), ("flow", 3.0)]


@pytest.mark.parametrize("prediction,shift", FAMILIES)
def test_defaults_keep_the_spread(pack, prediction, shift):
    """NestedKSampler's defaults (euler, normal, auto) and InnerSolverSelect's (euler_ancestral eta 0.85: re-noised on
    eps and v models, the paper's step on flow models, as measured on the learned digits models)."""
    from comfyui_nested_diffusion.nodes.nested_sampler import PAPER_INNER_SOLVER

    model = gaussian_model(prediction, shift)
    std, mode = nested_std(model, node_default_spec("euler"))
    assert mode == "renoise" and abs(std - 1.0) <= TOLERANCE, (std, mode)
    std, mode = nested_std(model, PAPER_INNER_SOLVER)
    row = {"auto": std, "ksampler_10": ksampler_std(model, "euler_ancestral", 10),
           "ksampler_40": ksampler_std(model, "euler_ancestral", 40)}
    assert mode == ("ddim" if prediction == "flow" else "renoise") and within_own_accuracy(row), (row, mode)


@pytest.mark.parametrize("prediction,shift", FAMILIES)
@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_eta0_outer_step_after_an_ode_widens_the_spread(pack, prediction, shift, sampler_name):
    """The measured defect, kept as a reproduction: the paper's step after a deterministic solver is too wide,
    and "auto" (renoise) is not (dpmpp_2m with karras, the example workflows' setting)."""
    model = gaussian_model(prediction, shift)
    spec = node_default_spec(sampler_name, "karras" if sampler_name == "dpmpp_2m" else "normal")
    wide, _ = nested_std(model, spec, outer_step="ddim")
    fixed, mode = nested_std(model, spec)
    assert wide > 1.25, wide
    assert mode == "renoise" and abs(fixed - 1.0) <= TOLERANCE + 0.02, fixed


@pytest.mark.parametrize("prediction,shift", [("eps", 1.0), ("flow", 3.0)])  # v gives eps's numbers on this model
def test_every_inner_solver_keeps_the_spread_or_its_own_accuracy(pack, prediction, shift):
    """Every sampler a user can pick, at the node's defaults (normal, 4 x 10, auto): within 10% of the data's
    spread, or no further off than the same solver's own KSampler run of 10 steps (one inner process: nested
    cannot be more exact than that) or 40 steps. Exceptions are listed in bench/spread.py and docs/results.md."""
    import comfy.samplers

    model = gaussian_model(prediction, shift)
    failures = []
    for name in comfy.samplers.SAMPLER_NAMES:
        std, mode = nested_std(model, node_default_spec(name))
        if abs(std - 1.0) <= TOLERANCE:
            continue
        row = {"auto": std, "ksampler_10": ksampler_std(model, name, 10), "ksampler_40": ksampler_std(model, name, 40)}
        if not within_own_accuracy(row):
            failures.append((name, mode, row))
    assert {name for name, *_ in failures} <= KNOWN_EXCEPTIONS.get(prediction, set()), failures


@pytest.mark.parametrize("prediction,shift", [("eps", 1.0), ("flow", 3.0)])
def test_the_trajectory_step_keeps_each_solvers_own_spread(pack, prediction, shift):
    """outer_step = trajectory continues from the inner solver's own state at the next outer sigma: the final spread is
    the solver's own 40-step KSampler spread (within 0.05), where re-noising moves it (dpmpp_2m with normal: 1.09 /
    1.18 against KSampler's 1.02 / 1.04). deis and ipndm report their input as every step's state, uni_pc no sigma:
    those re-noise, within 10% of the data's spread."""
    model = gaussian_model(prediction, shift)
    for name in ("euler", "dpmpp_2m", "heun", "res_multistep", "dpmpp_2m_sde"):
        std, mode = nested_std(model, node_default_spec(name), outer_step="trajectory")
        ksampler = ksampler_std(model, name, 40)
        assert mode == "trajectory" and abs(std - ksampler) <= 0.05, (name, std, ksampler)
    for name in ("deis", "ipndm", "uni_pc"):
        std, _ = nested_std(model, node_default_spec(name), outer_step="trajectory")
        renoised, _ = nested_std(model, node_default_spec(name), outer_step="renoise")
        assert std == renoised and abs(std - 1.0) <= TOLERANCE, (name, std, renoised)


@pytest.mark.parametrize("prediction,shift", FAMILIES)
def test_one_outer_step_still_equals_ksampler(pack, prediction, shift):
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import empty_conditioning
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    import nodes

    model = gaussian_model(prediction, shift)
    cond = empty_conditioning()
    reference = nodes.common_ksampler(model, 5, 12, 1.0, "dpmpp_2m", "normal", cond, cond, gaussian_latent(8))[0]
    for outer_step in ("auto", "renoise", "ddim", "trajectory"):
        spec = node_default_spec("dpmpp_2m", steps=12)
        plan = plan_nested_run(model.get_model_object("model_sampling"), spec, 1, "normal")
        samples, _ = run_plan(model, plan, spec, 5, cond, gaussian_latent(8), outer_step=outer_step)
        assert torch.allclose(samples["samples"], reference["samples"], atol=1e-5), outer_step


def test_probe_tells_odes_from_posterior_samplers(pack):
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    model = gaussian_model("eps", 1.0)
    cases = [("euler", None, "renoise"), ("uni_pc", None, "renoise"), ("euler_ancestral", 1.0, "renoise"),
             ("euler_ancestral", 0.85, "renoise"), ("euler_ancestral", 0.3, "renoise"), ("euler_ancestral", 0.0, "renoise"),
             ("dpmpp_sde", 1.0, "ddim"), ("seeds_2", None, "ddim"), ("res_multistep_ancestral", None, "renoise")]
    for name, eta, expected in cases:
        _, mode = nested_std(model, InnerSolverSpec(name, "normal", 10, eta=eta), batch=4)
        assert mode == expected, (name, eta, mode)


def test_auto_by_posterior_ratio(pack):
    """ODE solvers and over-noising solvers re-noise; posterior samplers keep the paper's step; partial posterior
    samplers (ancestral) re-noise on eps / v models and keep the paper's step on flow models (docs/results.md)."""
    from comfyui_nested_diffusion.nodes.solver_probe import outer_step_for_ratio

    for flow in (False, True):
        assert outer_step_for_ratio(0.0, flow) == "renoise" and outer_step_for_ratio(2.4, flow) == "renoise"
        assert outer_step_for_ratio(0.93, flow) == "ddim" and outer_step_for_ratio(None, flow) == "ddim"
    assert outer_step_for_ratio(0.56, False) == "renoise" and outer_step_for_ratio(0.61, True) == "ddim"


def test_explicit_outer_step_is_honoured_and_bad_names_refused(pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    model = gaussian_model("eps", 1.0)
    _, mode = nested_std(model, node_default_spec("euler_ancestral"), outer_step="renoise", batch=4)
    assert mode == "renoise"
    with pytest.raises(NestedDiffusionError, match="outer_step must be one of auto, ddim, renoise, trajectory"):
        nested_std(model, node_default_spec("euler"), outer_step="sometimes", batch=4)


def _nested_settings(prompt: dict) -> list[tuple[str, object, int]]:
    """(workflow, inner solver spec, outer steps) of every nested sampler in an API-format prompt."""
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    found = []
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "NestedKSampler":
            found.append((InnerSolverSpec(inputs["sampler_name"], inputs["scheduler"], inputs["inner_steps"]),
                          inputs["outer_steps"], inputs.get("outer_step", "auto")))
        elif node["class_type"] == "NestedSampler":
            inner = prompt[inputs["inner_solver"][0]]["inputs"]
            sigmas = next(n["inputs"] for n in prompt.values() if n["class_type"] == "BasicScheduler")
            found.append((InnerSolverSpec(inner["sampler_name"], sigmas["scheduler"], inner["steps"], eta=inner["eta"],
                                          s_noise=inner["s_noise"]), sigmas["steps"] - 1, inputs.get("outer_step", "auto")))
    return found


@pytest.mark.parametrize("name", ["sd15_txt2img", "sd15_img2img", "sd15_inpaint", "sdxl_txt2img", "flux_custom_advanced"])
def test_real_model_example_workflows_keep_the_distribution(pack, name):
    """The example workflows' sampler settings for real models, run on the wide-spread exact model of their family."""
    import json
    from dataclasses import replace
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "example_workflows" / "api" / f"{name}_nested_api.json"
    settings = _nested_settings(json.loads(path.read_text()))
    assert settings, f"{path.name} holds no nested sampler"
    model = gaussian_model("flow", 3.0) if name.startswith("flux") else gaussian_model("eps", 1.0)
    for spec, outer_steps, outer_step in settings:
        outer_spec = replace(spec, scheduler=spec.scheduler)
        std, mode = nested_std(model, outer_spec, outer_step=outer_step, outer_steps=outer_steps)
        assert abs(std - 1.0) <= TOLERANCE, (name, spec, outer_steps, mode, std)


def test_a_cancel_during_solver_measurement_stops_planning(pack):
    """The stand-in runs (cost and posterior probes) honour Cancel and do not mistake it for a solver they cannot
    drive: a plan of a long deterministic solver raises ComfyUI's interrupt instead of falling back to estimates."""
    import comfy.model_management
    from comfyui_nested_diffusion.nodes.planning import inner_solver_function
    from comfyui_nested_diffusion.nodes.solver_cost import measure_inner_costs
    from comfyui_nested_diffusion.nodes.solver_probe import measured_posterior_ratio

    model_sampling = gaussian_model("eps", 1.0).get_model_object("model_sampling")
    solver, _ = inner_solver_function(node_default_spec("uni_pc", steps=37))
    schedule = torch.linspace(3.7, 0, 38)  # a schedule no earlier test measured (nothing cached)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            measure_inner_costs(solver, [schedule], False, model_sampling)
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            measured_posterior_ratio(solver, schedule, None, False, 3)
    finally:
        comfy.model_management.interrupt_current_processing(False)
