"""Anytime control inside ComfyUI: staged runs, candidate picking, NFE and time budgets, step presets."""
import pytest
import torch
from comfy_helpers import SPREAD, advanced_inputs, empty_latent, exemplar_setup, nested, node_with_hidden, run_node


@pytest.fixture(scope="module", params=["eps", "flow"])
def family(request, pack):
    return request.param, *exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)


def advanced_node():
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSamplerAdvanced

    return NestedKSamplerAdvanced


def distances(images, exemplars):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    return manifold_distance(images, exemplars)[0]


@pytest.mark.parametrize("sampler_name,outer_eta,outer_step", [("euler", 0.0, "auto"), ("euler_ancestral", 0.0, "auto"),
                                                                ("dpmpp_2m", 0.6, "auto"), ("dpmpp_2m", 0.0, "trajectory"),
                                                                ("euler", 0.0, "path")])
def test_two_stages_equal_one_run(family, pack, sampler_name, outer_eta, outer_step):
    prediction, model, cond, _ = family
    options = dict(sampler_name=sampler_name, outer_eta=outer_eta, outer_step=outer_step)
    full, full_previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(3), 6, 4, 5, 0, 4, False, **options))
    first, first_previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(3), 6, 4, 5, 0, 2, True, **options))
    second, second_previews = run_node(advanced_node(), **advanced_inputs(model, cond, first, 6, 4, 5, 2, 4, False, add_noise=False,
                                                                           **options))
    assert torch.allclose(second["samples"], full["samples"], atol=1e-5, rtol=0)
    staged = torch.cat([first_previews["samples"], second_previews["samples"]])
    assert torch.allclose(staged, full_previews["samples"], atol=1e-5, rtol=0)
    assert second_previews["nested_outer_step_numbers"] == [3, 4]
    assert second_previews["nested_nfe"] == full_previews["nested_nfe"][2:]


def test_full_advanced_run_equals_nested_ksampler(family, pack):
    prediction, model, cond, _ = family
    (advanced, _) = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(2), 3, 3, 4, 0, 1000, False))
    plain, _ = nested(pack, model, cond, empty_latent(2), seed=3, outer_steps=3, inner_steps=4)
    assert torch.allclose(advanced["samples"], plain["samples"], atol=1e-6, rtol=0)


def test_stage_without_leftover_noise_returns_its_last_inner_result(family, pack):
    prediction, model, cond, exemplars = family
    samples, previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(4), 9, 4, 6, 0, 2, False))
    assert torch.allclose(samples["samples"], previews["samples"][-4:], atol=1e-5)
    assert float(distances(samples["samples"], exemplars).max()) <= 3 * SPREAD
    leftover, _ = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(4), 9, 4, 6, 0, 2, True))
    assert float(distances(leftover["samples"], exemplars).min()) > 3 * SPREAD  # still noisy


def test_bad_stage_bounds_are_refused(family, pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    _, model, cond, _ = family
    with pytest.raises(NestedDiffusionError, match="start_at_outer_step"):
        run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(1), 1, 4, 3, 4, 1000, False))


def test_picking_a_candidate_starts_every_slot_from_it(family, pack):
    """Picked after 3 of 4 outer steps (sigma 0.7 for eps, 0.5 for flow), where the state decides its exemplar
    whatever the seed: after the first of 3 (sigma 2.9, where the exemplars are only ~3 nats apart) the
    variations may leave it, and whether they did depended on the CPU noise of the seed (different in 0.33.0)."""
    from comfyui_nested_diffusion.nodes.pick_candidate import NestedPickCandidate

    prediction, model, cond, exemplars = family
    first, first_previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(4), 12, 4, 5, 0, 3, True,
                                                                         sampler_name="euler_ancestral"))
    picked, picked_preview = run_node(NestedPickCandidate, samples=first, outer_previews=first_previews, index=2)
    assert picked["samples"].shape == first["samples"].shape
    for slot in range(4):
        assert torch.equal(picked["samples"][slot], first["samples"][2])
    assert torch.equal(picked_preview["samples"][0], first_previews["samples"][-4:][2])
    second, _ = run_node(advanced_node(), **advanced_inputs(model, cond, picked, 12, 4, 5, 3, 4, False, add_noise=False,
                                                             sampler_name="euler_ancestral"))
    nearest_of_pick = torch.cdist(picked_preview["samples"].flatten(1), exemplars.flatten(1)).argmin(1)
    nearest_after = torch.cdist(second["samples"].flatten(1), exemplars.flatten(1)).argmin(1)
    assert float(distances(second["samples"], exemplars).max()) <= 3 * SPREAD
    assert bool((nearest_after == nearest_of_pick).all()), "variations stay near the picked candidate's exemplar"


def test_pick_index_outside_the_batch_is_refused(family, pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.nodes.pick_candidate import NestedPickCandidate

    _, model, cond, _ = family
    first, previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(2), 1, 2, 2, 0, 1, True))
    with pytest.raises(NestedDiffusionError, match="outside the batch of 2"):
        run_node(NestedPickCandidate, samples=first, outer_previews=previews, index=2)


@pytest.mark.parametrize("max_nfe,expected_steps", [(10, 2), (14, 2), (15, 3), (20, 4)])
def test_max_nfe_returns_the_last_outer_step_that_fits(family, pack, max_nfe, expected_steps):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    prediction, model, cond, exemplars = family
    samples, previews = run_node(NestedKSampler, model=model, seed=4, outer_steps=4, inner_steps=5, cfg=1.0,
                                 sampler_name="euler", scheduler="normal", positive=cond, negative=cond,
                                 latent_image=empty_latent(2), denoise=1.0, max_nfe=max_nfe)
    assert len(previews["nested_nfe"]) == expected_steps
    assert previews["nested_nfe"][-1] <= max_nfe
    assert torch.allclose(samples["samples"], previews["samples"][-2:], atol=1e-6)
    assert float(distances(samples["samples"], exemplars).max()) <= 3 * SPREAD


def test_max_nfe_below_the_first_inner_diffusion_is_refused(family, pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model, cond, _ = family
    with pytest.raises(NestedDiffusionError, match="max_nfe 4 is below"):
        run_node(NestedKSampler, model=model, seed=4, outer_steps=4, inner_steps=5, cfg=1.0, sampler_name="euler",
                 scheduler="normal", positive=cond, negative=cond, latent_image=empty_latent(1), denoise=1.0, max_nfe=4)


def test_max_seconds_keeps_the_latest_image(family, pack):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model, cond, exemplars = family
    common = dict(model=model, seed=5, outer_steps=4, inner_steps=5, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=cond, negative=cond, latent_image=empty_latent(2), denoise=1.0)
    samples, previews = run_node(NestedKSampler, max_seconds=1e-6, **common)
    assert len(previews["nested_nfe"]) == 1
    assert float(distances(samples["samples"], exemplars).max()) <= 3 * SPREAD
    _, unlimited = run_node(NestedKSampler, max_seconds=3600.0, **common)
    assert len(unlimited["nested_nfe"]) == 4


def test_early_finish_in_a_stage_with_leftover_noise_hands_on_a_state_the_next_stage_continues(family, pack):
    """A stage with leftover noise that ends early (max_nfe, Finish now) hands on its latest inner result diffused
    afresh to the stage's last sigma (noise of exactly that sigma around it), not the clean image, which would make
    the next stage lose contrast; the next stage continues from it onto the data."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    prediction, model, cond, exemplars = family
    batch = 4
    samples, previews = run_node(advanced_node(), **advanced_inputs(model, cond, empty_latent(batch), 2, 4, 5, 0, 3, True,
                                                                     max_nfe=5))
    assert len(previews["nested_nfe"]) == 1  # ended early after the first outer step
    plan = plan_nested_run(model.get_model_object("model_sampling"), solver_spec("euler", "normal", 5), 4, "normal")
    sigma_end = float(plan.outer_sigmas[3])
    # the latent a stage returns at sigma s: x0 + s eps (eps, v), x / (1 - s) = x0 + s / (1 - s) eps (flow)
    noise_std = sigma_end / (1 - sigma_end) if prediction == "flow" else sigma_end
    to_model = model.model.process_latent_in  # LATENTs hold the latent format's scaling; sigma is in the model's
    measured = float((to_model(samples["samples"]) - to_model(previews["samples"])).std())
    assert abs(measured / noise_std - 1) < 0.05, f"noise std {measured:.4g}, expected {noise_std:.4g}"
    second, second_previews = run_node(advanced_node(), **advanced_inputs(model, cond, samples, 2, 4, 5, 3, 4, False,
                                                                           add_noise=False))
    assert float(distances(second["samples"], exemplars).max()) <= 3 * SPREAD
    assert second_previews["nested_outer_step_numbers"] == [4]


@pytest.mark.parametrize("preset", ["front-loaded", "back-loaded", "uniform"])
def test_step_presets_keep_the_total_nfes(family, pack, preset):
    from comfyui_nested_diffusion.nodes.inner_solver import InnerSolverSelect

    _, model, cond, exemplars = family
    (spec,) = run_node(InnerSolverSelect, sampler_name="euler", scheduler="normal", steps=6, eta=0.0, s_noise=1.0,
                       step_schedule=preset)
    _, previews = nested(pack, model, cond, empty_latent(2), seed=1, outer_steps=4, inner_steps=6, inner_solver=spec)
    assert previews["nested_nfe"][-1] == 24
    spent = [b - a for a, b in zip([0] + previews["nested_nfe"][:-1], previews["nested_nfe"])]
    if preset == "front-loaded":
        assert spent == sorted(spent, reverse=True) and spent[0] > spent[-1]
    elif preset == "back-loaded":
        assert spent == sorted(spent) and spent[0] < spent[-1]
    else:
        assert spent == [6, 6, 6, 6]
    # back-loaded gives the first image sooner, with fewer inner steps: only its final image is held to the manifold
    checked = previews["samples"][-2:] if preset == "back-loaded" else previews["samples"]
    assert float(distances(checked, exemplars).max()) <= 3 * SPREAD


def test_outer_previews_do_not_depend_on_what_is_connected(family, pack):
    """Without the server's prompt handler's mark in its inputs (in-process use, as here), a run fills outer_previews
    whatever the hidden prompt shows connected, and gives the same samples either way."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model, cond, _ = family
    graph = {"7": {"class_type": "NestedKSampler", "inputs": {}}, "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0]}}}
    inputs = dict(model=model, seed=4, outer_steps=3, inner_steps=4, cfg=1.0, sampler_name="euler", scheduler="normal",
                  positive=cond, negative=cond, latent_image=empty_latent(2), denoise=1.0)
    unconnected = node_with_hidden(NestedKSampler, unique_id="7", prompt=graph).execute(**inputs).args
    full = run_node(NestedKSampler, **inputs)
    assert torch.equal(unconnected[0]["samples"], full[0]["samples"])
    assert torch.equal(unconnected[1]["samples"], full[1]["samples"]) and full[1]["samples"].shape[0] == 3 * 2
    assert unconnected[1]["nested_nfe"] == full[1]["nested_nfe"] == [4, 8, 12]
