"""update_seconds inside ComfyUI: a new image about every N seconds on a model whose every call takes a fixed time.

The stand-in model is the exemplar model's clone with a unet function wrapper (ComfyUI's own hook, as
``tools.models.counting_clone``) that sleeps a fixed time per call; the intervals are taken between the
sampler's outer-step callbacks (``sample_custom``'s callback), and asserted on their median, which a busy shared
machine moves far less than single intervals (each one is printed).
"""
import statistics
import time

import pytest
import torch
from comfy_helpers import SPREAD, counting_clone, empty_latent, exemplar_setup, run_node

CALL_SECONDS = 0.03
TARGET = 0.4


@pytest.fixture(scope="module", params=["eps", "flow"])
def family(request, pack):
    return request.param, *exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)


def distances(images, exemplars):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    return manifold_distance(images, exemplars)[0]


def timed_run(model, cond, latent, seed, outer_steps, inner_steps, update_seconds, max_nfe=0, max_seconds=0.0,
              sampler_name="euler"):
    """NestedKSampler's sampler and plan through ``sample_custom`` with a callback that notes when every outer
    step's image arrives: (samples, arrival times, the sampler)."""
    import comfy.sample
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings, RunLimits
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = solver_spec(sampler_name, "normal", inner_steps)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, "normal")
    settings = NestedSettings(spec, limits=RunLimits(max_nfe, max_seconds), update_seconds=update_seconds)
    sampler = NestedDiffusionSampler(settings, plan, own_progress=True)
    arrivals = []
    noise = comfy.sample.prepare_noise(latent["samples"], seed)
    samples = comfy.sample.sample_custom(model, noise, 1.0, sampler, plan.outer_sigmas, cond, cond, latent["samples"],
                                         callback=lambda *_: arrivals.append(time.monotonic()), disable_pbar=True,
                                         seed=seed)
    return samples, arrivals, sampler


def test_a_new_image_about_every_update_seconds(family, pack):
    prediction, model, cond, exemplars = family
    slow, calls = counting_clone(model, seconds_per_call=CALL_SECONDS)
    samples, arrivals, sampler = timed_run(slow, cond, empty_latent(2), 3, outer_steps=4, inner_steps=20,
                                           update_seconds=TARGET)
    intervals = [later - earlier for earlier, later in zip(arrivals, arrivals[1:])]
    print(f"{prediction}: intervals after the first image {[round(i, 3) for i in intervals]} (target {TARGET})")
    paced = sampler.reporter.paced
    assert sum(paced.steps) == 4 * 20 and calls["n"] == 4 * 20  # the budget, spent exactly (euler, cfg 1)
    assert paced.steps[0] == 20 and len(paced.steps) == len(arrivals) >= 5
    # The requirement, on the median: single intervals move with the load of a shared machine (printed above; on
    # an idle one every interval lands within 25%, see bench/update_seconds.py). None may run away, though.
    assert abs(statistics.median(intervals) - TARGET) <= 0.25 * TARGET
    assert max(intervals) <= 2.5 * TARGET and min(intervals) >= 0.4 * TARGET
    assert float(distances(samples, exemplars).max()) <= 3 * SPREAD


def test_update_seconds_zero_changes_nothing(family, pack):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler, NestedKSamplerAdvanced

    _, model, cond, _ = family
    common = dict(model=model, seed=7, outer_steps=3, inner_steps=5, cfg=1.0, sampler_name="euler_ancestral",
                  scheduler="normal", positive=cond, negative=cond, latent_image=empty_latent(2))
    plain, plain_previews = run_node(NestedKSampler, denoise=1.0, **common)
    off, off_previews = run_node(NestedKSampler, denoise=1.0, update_seconds=0.0, **common)
    assert torch.equal(plain["samples"], off["samples"])
    assert torch.equal(plain_previews["samples"], off_previews["samples"])
    assert off_previews["nested_nfe"] == plain_previews["nested_nfe"]
    stage = dict(add_noise="enable", noise_seed=7, start_at_outer_step=0, end_at_outer_step=2,
                 return_with_leftover_noise="enable", **{k: v for k, v in common.items() if k != "seed"})
    first, _ = run_node(NestedKSamplerAdvanced, **stage)
    paced_stage, _ = run_node(NestedKSamplerAdvanced, update_seconds=1.0, **stage)  # leftover noise: keeps its plan
    assert torch.equal(first["samples"], paced_stage["samples"])


def test_paced_run_on_the_node_ends_clean_and_reports_its_steps(family, pack):
    """Through the node, fast: the steps are re-planned, the budget holds, outer_previews follow the re-plan."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model, cond, exemplars = family
    slow, calls = counting_clone(model, seconds_per_call=0.01)
    samples, previews = run_node(NestedKSampler, model=slow, seed=2, outer_steps=2, inner_steps=12, cfg=1.0,
                                 sampler_name="euler_ancestral", scheduler="karras", positive=cond, negative=cond,
                                 latent_image=empty_latent(2), denoise=1.0, update_seconds=0.05)
    steps = len(previews["nested_outer_step_numbers"])
    assert steps > 2 and previews["nested_outer_steps"] == steps
    assert previews["nested_nfe"][-1] == calls["n"] <= 24
    assert previews["nested_nfe"][0] == 12  # the first inner diffusion as planned
    assert all(a > b for a, b in zip(previews["nested_sigmas"], previews["nested_sigmas"][1:]))
    assert float(distances(samples["samples"], exemplars).max()) <= 3 * SPREAD


@pytest.mark.parametrize("budget", [dict(max_nfe=23), dict(max_seconds=0.6)])
def test_budgets_still_end_a_paced_run(family, pack, budget):
    """max_nfe and max_seconds follow the re-planned costs: the run ends within them with its latest image."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model, cond, _ = family
    slow, calls = counting_clone(model, seconds_per_call=0.02)
    started = time.monotonic()
    samples, previews = run_node(NestedKSampler, model=slow, seed=5, outer_steps=4, inner_steps=10, cfg=1.0,
                                 sampler_name="euler", scheduler="normal", positive=cond, negative=cond,
                                 latent_image=empty_latent(1), denoise=1.0, update_seconds=0.2, **budget)
    elapsed = time.monotonic() - started
    assert calls["n"] == previews["nested_nfe"][-1] < 40
    assert calls["n"] <= budget.get("max_nfe", 40)
    assert torch.equal(samples["samples"], previews["samples"][-1:])
    if "max_seconds" in budget:
        print(f"max_seconds 0.6: ended after {elapsed:.2f} s, {calls['n']} calls")


def test_nested_sampler_with_connected_sigmas_paces_too(family, pack):
    """SamplerCustom's sigmas carry no scheduler: the outer steps left are placed with the inner solver's."""
    import comfy.sample
    import comfy.samplers
    from comfyui_nested_diffusion.nodes.nested_sampler import NestedSampler

    _, model, cond, exemplars = family
    slow, calls = counting_clone(model, seconds_per_call=0.01)
    (sampler,) = run_node(NestedSampler, update_seconds=0.04)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 4)
    latent = empty_latent(1)
    noise = comfy.sample.prepare_noise(latent["samples"], 1)
    samples = comfy.sample.sample_custom(slow, noise, 1.0, sampler, sigmas, cond, cond, latent["samples"],
                                         disable_pbar=True, seed=1)
    paced = sampler.reporter.paced
    assert sum(paced.steps) == 3 * 10 and len(paced.steps) > 3
    assert float(distances(samples, exemplars).max()) <= 3 * SPREAD


def test_finish_now_ends_a_paced_run_with_its_latest_image(family, pack):
    """Finish now, requested during the second inner diffusion, ends the run at its next model call with the first
    inner diffusion's image (as without update_seconds)."""
    from comfy_execution.utils import CurrentNodeContext
    from comfyui_nested_diffusion.nodes.steering import request_finish

    _, model, cond, exemplars = family
    answers = []
    slow, calls = counting_clone(model, seconds_per_call=0.01)
    base = slow.model_options["model_function_wrapper"]

    def wrapper(apply_model, args):
        if calls["n"] == 10:  # the first inner diffusion (10 steps) is over: the second one starts
            answers.append(request_finish("paced-finish", "1"))
        return base(apply_model, args)

    slow.set_model_unet_function_wrapper(wrapper)
    with CurrentNodeContext("paced-finish", "1"):
        samples, _, sampler = timed_run(slow, cond, empty_latent(1), 4, outer_steps=4, inner_steps=10,
                                        update_seconds=0.2)
    assert answers and answers[0][0] == 200
    result = sampler.last_result
    assert result.stop_reason == "finish requested"
    assert result.nfe == 11  # the call the request came in, and no other
    assert torch.allclose(samples, slow.model.process_latent_out(result.latest))
    assert float(distances(samples, exemplars).max()) <= 3 * SPREAD
