"""Nested samples keep the data's distribution (issue 10), measured on data wider than the smallest sigma.

The exact denoiser with one exemplar and spread 1.0 in latent units is N(0, I) data: the final samples'
standard deviation must be the data's (1.0), not only near a mode. Before the fix the eta-0 outer step after a
deterministic inner solver gave 1.4 (euler) to 1.7-2.0 (dpmpp_2m): reproduced below with outer_step "ddim".
"""
from __future__ import annotations

import pytest
import torch

from comfy_helpers import ksampler

FAMILIES = [("eps", 1.0), ("v_prediction", 1.0), ("flow", 3.0)]
BATCH = 64
TOLERANCE = 0.10


def gaussian_model(pack, prediction: str, shift: float):
    from comfyui_nested_diffusion.nodes.exemplar_model import build_exemplar_model

    return build_exemplar_model(torch.zeros(1, 3, 8, 8), 1.0, prediction, shift=shift, latent_scale=1.0)


def gaussian_latent(batch: int = BATCH) -> dict:
    return {"samples": torch.zeros(batch, 3, 8, 8)}


def nested_std(pack, model, spec, outer_step: str = "auto", outer_steps: int = 4, seed: int = 0) -> tuple[float, str]:
    """Final std of a NestedKSampler run, and the outer step it used."""
    from comfyui_nested_diffusion.nodes.exemplar_model import empty_conditioning
    from comfyui_nested_diffusion.nodes.sampling import plan_nested_run, run_nested_sampling

    cond = empty_conditioning()
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, spec.scheduler, 1.0)
    samples, previews = run_nested_sampling(model, seed, 1.0, cond, cond, gaussian_latent(), plan, 0.0, node_id="dist",
                                            outer_step=outer_step)
    return float(samples["samples"].std()), previews["nested_outer_step_mode"]


def node_default_spec(sampler_name: str, scheduler: str = "normal", steps: int = 10):
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec

    return solver_spec(sampler_name, scheduler, steps)


@pytest.mark.parametrize("prediction,shift", FAMILIES)
def test_defaults_keep_the_spread(pack, prediction, shift):
    """NestedKSampler's defaults (euler, normal, auto) and InnerSolverSelect's (euler_ancestral eta 0.85)."""
    from comfyui_nested_diffusion.nodes.nested_sampler import PAPER_INNER_SOLVER

    model = gaussian_model(pack, prediction, shift)
    std, mode = nested_std(pack, model, node_default_spec("euler"))
    assert mode == "renoise" and abs(std - 1.0) <= TOLERANCE, (std, mode)
    std, mode = nested_std(pack, model, PAPER_INNER_SOLVER)
    assert mode == "ddim" and abs(std - 1.0) <= TOLERANCE, (std, mode)


@pytest.mark.parametrize("prediction,shift", FAMILIES)
@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_eta0_outer_step_after_an_ode_widens_the_spread(pack, prediction, shift, sampler_name):
    """The measured defect, kept as a reproduction: the paper's step after a deterministic solver is too wide,
    and "auto" (renoise) is not."""
    model = gaussian_model(pack, prediction, shift)
    spec = node_default_spec(sampler_name, "karras" if sampler_name == "dpmpp_2m" else "normal")
    wide, _ = nested_std(pack, model, spec, outer_step="ddim")
    fixed, mode = nested_std(pack, model, spec)
    assert wide > 1.25, wide
    assert mode == "renoise" and abs(fixed - 1.0) <= TOLERANCE + 0.02, fixed


@pytest.mark.parametrize("prediction,shift", [("eps", 1.0), ("flow", 3.0)])  # v gives eps's numbers on this model
def test_every_inner_solver_keeps_the_spread_or_its_own_accuracy(pack, prediction, shift):
    """Every sampler a user can pick, at the node's defaults (normal, 4 x 10, auto): within 10% of the data's
    spread, or no further off than the same solver's own single run of the inner step count (KSampler with
    10 steps: nested cannot be more exact than its inner process) or of 40 steps. Exceptions are listed."""
    import comfy.samplers

    from comfyui_nested_diffusion.nodes.exemplar_model import empty_conditioning

    model = gaussian_model(pack, prediction, shift)
    cond = empty_conditioning()
    failures = []
    for name in comfy.samplers.SAMPLER_NAMES:
        std, mode = nested_std(pack, model, node_default_spec(name))
        if abs(std - 1.0) <= TOLERANCE:
            continue
        own = [float(ksampler(model, cond, gaussian_latent(), 0, steps, sampler_name=name).std()) for steps in (10, 40)]
        if abs(std - 1.0) > max(abs(value - 1.0) for value in own) + 0.05:
            failures.append((name, mode, round(std, 3), [round(value, 3) for value in own]))
    known = KNOWN_EXCEPTIONS.get(prediction, set())
    assert {name for name, *_ in failures} <= known, failures


# Measured and listed in the README. On flow models dpmpp_2s_ancestral_cfg_pp is +26% with the ddim outer step that
# its posterior ratio (0.60) selects (outer_step "renoise" gives +11%); ddpm and res_multistep_ancestral do not suit
# flow models at all: KSampler with 40 steps is +52% and +150% off itself.
KNOWN_EXCEPTIONS = {"flow": {"dpmpp_2s_ancestral_cfg_pp", "ddpm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp"}}


@pytest.mark.parametrize("prediction,shift", FAMILIES)
def test_one_outer_step_still_equals_ksampler(pack, prediction, shift):
    from comfyui_nested_diffusion.nodes.exemplar_model import empty_conditioning

    model = gaussian_model(pack, prediction, shift)
    cond = empty_conditioning()
    from comfyui_nested_diffusion.nodes.sampling import plan_nested_run, run_nested_sampling

    for outer_step in ("auto", "renoise", "ddim"):
        plan = plan_nested_run(model.get_model_object("model_sampling"), node_default_spec("dpmpp_2m", steps=12), 1, "normal")
        samples, _ = run_nested_sampling(model, 5, 1.0, cond, cond, gaussian_latent(8), plan, 0.0, node_id="one",
                                         outer_step=outer_step)
        reference = ksampler(model, cond, gaussian_latent(8), 5, 12, sampler_name="dpmpp_2m")
        assert torch.allclose(samples["samples"], reference, atol=1e-5), outer_step


def test_probe_tells_odes_from_posterior_samplers(pack):
    from comfyui_nested_diffusion.nodes.sampling import InnerSolverSpec

    model = gaussian_model(pack, "eps", 1.0)
    modes = {}
    for name, eta in [("euler", None), ("uni_pc", None), ("euler_ancestral", 1.0), ("euler_ancestral", 0.85),
                      ("euler_ancestral", 0.3), ("euler_ancestral", 0.0), ("dpmpp_sde", 1.0)]:
        _, modes[(name, eta)] = nested_std(pack, model, InnerSolverSpec(name, "normal", 10, eta=eta))
    assert modes == {("euler", None): "renoise", ("uni_pc", None): "renoise", ("euler_ancestral", 1.0): "ddim",
                     ("euler_ancestral", 0.85): "ddim", ("euler_ancestral", 0.3): "renoise",
                     ("euler_ancestral", 0.0): "renoise", ("dpmpp_sde", 1.0): "ddim"}


def test_explicit_outer_step_is_honoured_and_bad_names_refused(pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    model = gaussian_model(pack, "eps", 1.0)
    _, mode = nested_std(pack, model, node_default_spec("euler_ancestral"), outer_step="renoise")
    assert mode == "renoise"
    with pytest.raises(NestedDiffusionError, match="outer_step must be one of auto, ddim, renoise"):
        nested_std(pack, model, node_default_spec("euler"), outer_step="sometimes")
