"""Every ComfyUI sampler as the inner solver: model calls counted by ComfyUI's own wrapper equal the NFEs
the node plans and reports, and every inner result lands on the data manifold."""
import pytest
from comfy_helpers import SPREAD, empty_latent, exemplar_setup, ksampler, nested

from tools.comfy_env import counting_clone

STOP_AT_SIGMA_MIN = {"dpm_fast", "dpm_adaptive"}


def all_sampler_names():
    from conftest import import_comfy

    import_comfy()
    import comfy.samplers

    return list(comfy.samplers.SAMPLER_NAMES)


@pytest.fixture(scope="module")
def eps_family(pack):
    return exemplar_setup(pack, "eps")


def all_scheduler_names():
    from conftest import import_comfy

    import_comfy()
    import comfy.samplers

    return list(comfy.samplers.SCHEDULER_NAMES)


@pytest.mark.parametrize("scheduler", ["karras", "normal", "beta"])
@pytest.mark.parametrize("sampler_name", all_sampler_names())
def test_counted_model_calls_equal_reported_and_planned_nfes(eps_family, pack, sampler_name, scheduler):
    from comfyui_nested_diffusion.nested_core.exemplars import manifold_distance
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.sampling import plan_nested_run

    model, cond, exemplars = eps_family
    counted, calls = counting_clone(model)
    outer, inner = 3, 8
    plan = plan_nested_run(counted.get_model_object("model_sampling"), solver_spec(sampler_name, scheduler, inner), outer, scheduler)
    _, previews = nested(pack, counted, cond, empty_latent(1), seed=1, outer_steps=outer, inner_steps=inner,
                         sampler_name=sampler_name, scheduler=scheduler)
    assert previews["nested_nfe"][-1] == calls["n"]
    if plan.nfe_exact:
        assert plan.nfe_total == calls["n"], f"{sampler_name}: planned {plan.nfe_total}, counted {calls['n']}"
    distances, _ = manifold_distance(previews["samples"], exemplars)
    if sampler_name in STOP_AT_SIGMA_MIN:
        # These stop at the schedule's smallest sigma, keeping its noise, in KSampler too: match vanilla.
        vanilla = ksampler(model, cond, empty_latent(1), seed=1, steps=inner, sampler_name=sampler_name, scheduler=scheduler)
        vanilla_distance, _ = manifold_distance(vanilla, exemplars)
        assert float(distances.max()) <= 1.5 * float(vanilla_distance.max()), f"{sampler_name}: {distances.tolist()}"
    else:
        assert float(distances.max()) <= 3 * SPREAD, f"{sampler_name}: {distances.tolist()}"


@pytest.fixture(scope="module", params=["eps", "v_prediction", "flow"])
def any_family(request, pack):
    return exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "uni_pc"])
@pytest.mark.parametrize("scheduler", all_scheduler_names())
def test_every_scheduler_builds_inner_processes_for_every_family(any_family, pack, scheduler, sampler_name):
    from comfyui_nested_diffusion.nested_core import check_schedule
    from comfyui_nested_diffusion.nested_core.exemplars import manifold_distance
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.sampling import plan_nested_run

    model, cond, exemplars = any_family
    outer, inner = 3, 10
    plan = plan_nested_run(model.get_model_object("model_sampling"), solver_spec(sampler_name, scheduler, inner), outer, scheduler)
    for k, sigmas in enumerate(plan.inner_sigmas):
        check_schedule(sigmas)
        assert float(sigmas[0]) == float(plan.outer_sigmas[k])
    _, previews = nested(pack, model, cond, empty_latent(2), seed=2, outer_steps=outer, inner_steps=inner,
                         sampler_name=sampler_name, scheduler=scheduler)
    assert previews["nested_nfe"][-1] == plan.nfe_total
    distances, _ = manifold_distance(previews["samples"][-2:], exemplars)
    if float(distances.max()) > 3 * SPREAD:
        # Some schedules are poor for some families (linear_quadratic on eps jumps from sigma 5 to 0):
        # then the inner process must do as well as KSampler does with the same steps.
        vanilla = ksampler(model, cond, empty_latent(2), seed=2, steps=inner, sampler_name=sampler_name, scheduler=scheduler)
        vanilla_distances, _ = manifold_distance(vanilla, exemplars)
        assert float(distances.mean()) <= 1.5 * float(vanilla_distances.mean()), f"{scheduler}/{sampler_name}: {distances.tolist()}"
