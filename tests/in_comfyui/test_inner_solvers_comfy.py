"""Every ComfyUI sampler as the inner solver: model calls counted by ComfyUI's own wrapper equal the NFEs
the node plans and reports, and every inner result lands on the data manifold."""
import pytest
import torch
from comfy_helpers import SPREAD, counting_clone, empty_latent, exemplar_setup, ksampler, nested, run_plan

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
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    model, cond, exemplars = eps_family
    counted, calls = counting_clone(model)
    outer, inner = 3, 8
    plan = plan_nested_run(counted.get_model_object("model_sampling"), solver_spec(sampler_name, scheduler, inner), outer, scheduler)
    _, previews = nested(pack, counted, cond, empty_latent(1), seed=1, outer_steps=outer, inner_steps=inner,
                         sampler_name=sampler_name, scheduler=scheduler)
    assert previews["nested_nfe"][-1] == calls["n"]
    assert previews["nested_nfe_total"] == calls["n"]  # the progress total at the end is what the run spent
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
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance
    from comfyui_nested_diffusion.nested_core import check_schedule
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

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


def run_with_budget(pack, model, cond, sampler_name, scheduler, outer, inner, max_nfe, seed=1, inner_solver=None):
    """NestedKSampler's code path with ``max_nfe``; returns (plan, outer_previews, model calls counted by ComfyUI)."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    counted, calls = counting_clone(model)
    spec = solver_spec(sampler_name, scheduler, inner, inner_solver)
    plan = plan_nested_run(counted.get_model_object("model_sampling"), spec, outer, scheduler)
    _, previews = run_plan(counted, plan, spec, seed, cond, empty_latent(1), max_nfe=max_nfe)
    return plan, previews, calls["n"]


@pytest.mark.parametrize("sampler_name", all_sampler_names())
def test_max_nfe_is_never_exceeded_and_fits_the_outer_steps_it_can(eps_family, pack, sampler_name):
    """Costs come from running the bound solver, so a solver that spends more calls per step than its name suggests
    (0.33.0's exp_heun_2_x0: 2) is planned right and max_nfe holds."""
    model, cond, _ = eps_family
    outer, inner = 4, 6
    plan = plan_nested_run_for(model, sampler_name, "karras", outer, inner)
    budget = plan.nfe_per_outer[0] + plan.nfe_per_outer[1] + 1  # two outer steps fit, a third does not
    _, previews, calls = run_with_budget(pack, model, cond, sampler_name, "karras", outer, inner, budget)
    assert calls <= budget, f"{sampler_name}: max_nfe {budget}, spent {calls}"
    assert previews["nested_nfe"][-1] == calls
    if plan.nfe_exact:
        assert len(previews["nested_nfe"]) == 2 and calls == budget - 1, f"{sampler_name}: {previews['nested_nfe']}"


def spec_for(sampler_name, scheduler, inner):
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec

    return solver_spec(sampler_name, scheduler, inner)


def plan_nested_run_for(model, sampler_name, scheduler, outer, inner):
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    return plan_nested_run(model.get_model_object("model_sampling"), spec_for(sampler_name, scheduler, inner), outer, scheduler)


@pytest.mark.parametrize("max_nfe", [30, 37, 44, 51, 58, 65, 80, 100])
def test_dpm_adaptive_never_exceeds_max_nfe(any_family, pack, max_nfe):
    """dpm_adaptive with max_nfe 30 must spend at most 30. It picks its own steps, so the
    budget goes by what each inner diffusion really spent, and a hard limit cuts one that would overrun."""
    model, cond, _ = any_family
    try:
        plan, previews, calls = run_with_budget(pack, model, cond, "dpm_adaptive", "normal", 4, 10, max_nfe, seed=3)
    except ValueError as error:  # the first inner diffusion alone needed more: a clear error, nothing spent past it
        assert "max_nfe" in str(error) and ("below the cost" in str(error) or "used up" in str(error))
        return
    assert not plan.nfe_exact
    assert calls <= max_nfe, f"max_nfe {max_nfe}, spent {calls}"
    assert len(previews["nested_nfe"]) >= 1 and previews["nested_nfe"][-1] <= calls


class ThirdPartySamplers:
    """Samplers registered the way other node packs add theirs (a ``sample_*`` function in k-diffusion's module
    and its name in KSAMPLER_NAMES / SAMPLER_NAMES), removed again afterwards."""

    NAMES = ("nested_test_three_calls", "nested_test_needs_the_guider", "nested_test_grows")

    def __enter__(self):
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.samplers

        def three_calls(model, x, sigmas, extra_args=None, callback=None, disable=None):
            """A third-order style solver: 3 model calls on every step, none known to any table."""
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                d = [model(x, sigmas[i] * s_in, **extra_args) for _ in range(3)][-1]
                x = d + (x - d) * (sigmas[i + 1] / sigmas[i])
            return x

        def needs_the_guider(model, x, sigmas, extra_args=None, callback=None, disable=None):
            """Reads the real guider's conds: the stand-in cannot drive it, so its cost is only an estimate."""
            assert model.inner_model.conds is not None
            return three_calls(model, x, sigmas, extra_args, callback, disable)

        runs = []

        def grows(model, x, sigmas, extra_args=None, callback=None, disable=None):
            """One call per step on the stand-ins; in a nested run on the real model 2 per step, then 4 per step from
            its second inner diffusion on (an adaptive solver meeting harder and harder work)."""
            if type(model).__name__ != "CountedModel":  # the cost measurement's and the outer step probe's stand-ins
                return three_calls.__wrapped_one__(model, x, sigmas, extra_args)
            runs.append(1)
            extra_args = {} if extra_args is None else extra_args
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                d = [model(x, sigmas[i] * s_in, **extra_args) for _ in range(2 if len(runs) == 1 else 4)][-1]
                x = d + (x - d) * (sigmas[i + 1] / sigmas[i])
            return x

        def one_call(model, x, sigmas, extra_args=None):
            s_in = x.new_ones([x.shape[0]])
            for i in range(len(sigmas) - 1):
                d = model(x, sigmas[i] * s_in, **(extra_args or {}))
                x = d + (x - d) * (sigmas[i + 1] / sigmas[i])
            return x

        three_calls.__wrapped_one__ = one_call
        self.grows_runs = runs
        self.added = {"sample_nested_test_three_calls": three_calls, "sample_nested_test_needs_the_guider": needs_the_guider,
                      "sample_nested_test_grows": grows}
        for attr, function in self.added.items():
            setattr(k_sampling, attr, function)
        for name in self.NAMES:
            comfy.samplers.KSAMPLER_NAMES.append(name)
            comfy.samplers.SAMPLER_NAMES.append(name)
        return self

    def __exit__(self, *exc):
        import comfy.k_diffusion.sampling as k_sampling
        import comfy.samplers

        for name in self.NAMES:
            comfy.samplers.KSAMPLER_NAMES.remove(name)
            comfy.samplers.SAMPLER_NAMES.remove(name)
        for attr in self.added:
            delattr(k_sampling, attr)


def test_third_party_samplers_costs_are_measured_and_budgets_kept(eps_family, pack, caplog):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    model, cond, exemplars = eps_family
    with ThirdPartySamplers() as samplers:
        plan = plan_nested_run_for(model, "nested_test_three_calls", "normal", 3, 5)
        assert plan.nfe_per_outer == [15, 15, 15] and plan.nfe_exact
        _, previews, calls = run_with_budget(pack, model, cond, "nested_test_three_calls", "normal", 3, 5, 0)
        assert calls == 45 == previews["nested_nfe_total"]
        _, previews, calls = run_with_budget(pack, model, cond, "nested_test_three_calls", "normal", 3, 5, 40)
        assert calls == 30 and len(previews["nested_nfe"]) == 2

        with caplog.at_level("WARNING"):
            plan = plan_nested_run_for(model, "nested_test_needs_the_guider", "normal", 3, 5)
        assert not plan.nfe_exact and plan.nfe_per_outer == [5, 5, 5]  # one call per step: an estimate
        assert "could not measure the inner solver's cost" in caplog.text
        _, previews, calls = run_with_budget(pack, model, cond, "nested_test_needs_the_guider", "normal", 3, 5, 0)
        assert calls == 45 == previews["nested_nfe_total"]  # the total follows what was really spent
        _, previews, calls = run_with_budget(pack, model, cond, "nested_test_needs_the_guider", "normal", 3, 5, 35)
        assert calls <= 35 and previews["nested_nfe"] == [15, 30]

        # Spends 10 in its first inner diffusion (planned 5), so the second is projected at 10 and fits in 25; it
        # wants 20: the hard limit cuts it at 25 and the run ends with the first inner diffusion's image.
        samplers.grows_runs.clear()
        from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
        from comfyui_nested_diffusion.nodes.planning import plan_nested_run

        counted, counter = counting_clone(model)
        spec = solver_spec("nested_test_grows", "normal", 5)
        plan = plan_nested_run(counted.get_model_object("model_sampling"), spec, 3, "normal")
        assert plan.nfe_per_outer == [5, 5, 5]
        out, previews = run_plan(counted, plan, spec, 1, cond, empty_latent(1), max_nfe=25)
        assert counter["n"] == 25 and previews["nested_nfe"] == [10] and len(samplers.grows_runs) == 2
        assert torch.allclose(out["samples"], previews["samples"][:1], atol=1e-5)
        distances, _ = manifold_distance(out["samples"], exemplars)
        assert float(distances.max()) <= 3 * SPREAD  # a clean image, not the cut inner diffusion's noisy state


@pytest.mark.parametrize("sampler_name", ["uni_pc", "uni_pc_bh2"])
def test_measuring_and_running_a_solver_leaves_the_plans_schedules_alone(eps_family, pack, sampler_name):
    """uni_pc writes 0.001 over the final 0 of the schedule it is given; the cost measurement, the outer step
    probe and the run itself must hand it copies (a plan's inner schedules end at 0 before and after)."""
    from comfyui_nested_diffusion.nested_core import check_schedule
    model, cond, _ = eps_family
    plan, spec = plan_nested_run_for(model, sampler_name, "normal", 3, 6), spec_for(sampler_name, "normal", 6)
    for sigmas in plan.inner_sigmas:
        check_schedule(sigmas)
    first, _ = run_plan(model, plan, spec, 4, cond, empty_latent(1))
    for sigmas in plan.inner_sigmas:
        check_schedule(sigmas)
    again, _ = run_plan(model, plan, spec, 4, cond, empty_latent(1))
    assert torch.equal(first["samples"], again["samples"])
