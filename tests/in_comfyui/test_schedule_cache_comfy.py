"""Planning stays bounded, in-process: the schedule cache is bounded by bytes, no
schedule is longer than KSampler's longest, the vectorised scheduler twins give ComfyUI's sigmas bit for bit, a
Cancel stops planning, and inputs that search over thousands of schedule lengths plan in well under a second each."""
from __future__ import annotations

import random
import time

import pytest
import torch
from comfy_helpers import exemplar_setup


@pytest.fixture(scope="module")
def cache_module(pack):
    from comfyui_nested_diffusion.nodes import schedule_cache

    return schedule_cache


@pytest.fixture(scope="module")
def samplings(pack):
    """eps, v and flow (shift 3) model samplings of the exemplar model: what the twins must match."""
    found = {}
    for prediction, shift in (("eps", 1.0), ("v_prediction", 1.0), ("flow", 3.0)):
        model, _, _ = exemplar_setup(pack, prediction, shift=shift)
        found[prediction] = model.get_model_object("model_sampling")
    return found


def test_vectorised_twins_give_comfyuis_sigmas_bit_for_bit(cache_module, samplings):
    import comfy.samplers

    rng = random.Random(13)
    lengths = [1, 2, 3, 4, 7, 99, 100, 101, 1000] + rng.sample(range(5, 10000), 6)
    for name, sampling in samplings.items():
        for scheduler, twin in cache_module.FAST_TWINS.items():
            for steps in lengths:
                expected = comfy.samplers.calculate_sigmas(sampling, scheduler, steps)
                got = twin(sampling, steps)
                assert got.shape == expected.shape and torch.equal(got, expected), (name, scheduler, steps)


def test_a_twin_that_differs_from_comfyui_is_not_used(cache_module, samplings, monkeypatch):
    sampling = samplings["eps"]
    monkeypatch.setitem(cache_module.FAST_TWINS, "normal", lambda s, n: torch.ones(n + 1))
    cache = cache_module._ModelSchedules()
    import comfy.samplers

    assert torch.equal(cache_module.scheduler_sigmas(sampling, "normal", 12, cache),
                       comfy.samplers.calculate_sigmas(sampling, "normal", 12))
    assert cache.twin_ok == {("normal", cache_module.sampling_fingerprint(sampling)): False}


def test_the_cache_is_bounded_by_bytes_and_lengths_by_ksamplers_longest(cache_module, samplings):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.nested_core.schedules import MAX_SCHEDULE_LENGTH

    sampling = samplings["v_prediction"]
    schedule = cache_module.schedule_function(sampling, "karras")
    for steps in range(9000, 10000, 7):  # ~143 schedules of ~38 KB: 5.4 MB
        schedule(steps)
    schedule(MAX_SCHEDULE_LENGTH)  # 4 MB: built, but above a quarter of the budget, so not kept
    for steps in range(2000, 10000, 3):  # ~2667 schedules, ~64 MB if nothing were dropped
        schedule(steps)
    held = cache_module._CACHES[sampling].bytes
    assert held <= cache_module.CACHE_BYTES, held
    assert held == sum(t.numel() * t.element_size() for t in cache_module._CACHES[sampling].entries.values())
    with pytest.raises(NestedDiffusionError, match="longest one KSampler builds"):
        schedule(MAX_SCHEDULE_LENGTH + 1)


def test_denoise_start_is_computed_at_a_bounded_length(pack):
    from comfyui_nested_diffusion.nested_core.schedules import MAX_SCHEDULE_LENGTH, denoise_lengths

    assert denoise_lengths(40, 0.5) == (40, 80)  # KSampler's own truncation while it fits
    assert denoise_lengths(10000, 0.01)[1] <= MAX_SCHEDULE_LENGTH
    steps, length = denoise_lengths(100 * 10000, 0.01)  # 100 x 10000: 10^8 sigmas, were it not bounded
    assert length <= MAX_SCHEDULE_LENGTH and abs(steps / length - 0.01) < 1e-4


def test_cancel_stops_planning(pack, samplings):
    import comfy.model_management
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, plan_nested_run

    spec = InnerSolverSpec(sampler_name="euler", scheduler="exponential", steps=777)
    comfy.model_management.interrupt_current_processing(True)
    try:
        started = time.monotonic()
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            plan_nested_run(samplings["flow"], spec, 37, "exponential", 0.83)
        assert time.monotonic() - started < 1.0
    finally:
        comfy.model_management.interrupt_current_processing(False)


def test_cancel_stops_the_inner_cost_measurement_at_its_next_stand_in_call(pack, samplings):
    """Measuring a solver's cost runs it on a stand-in, which honours a pending Cancel at its next call instead of
    letting the measurement run on to its time limit."""
    import comfy.model_management
    import comfy.samplers
    from comfyui_nested_diffusion.nodes.solver_cost import measure_inner_cost

    solver = comfy.samplers.sampler_object("dpmpp_3m_sde").sampler_function
    sigmas = torch.linspace(14.0, 0.0, 613)  # a schedule no earlier test has measured (nothing cached)
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            measure_inner_cost(solver, sigmas, False, samplings["eps"])
    finally:
        comfy.model_management.interrupt_current_processing(False)


# (outer, inner, scheduler, denoise): inputs that search over thousands of schedule lengths.
SLOW_BEFORE = [(50, 200, "normal", 1.0), (20, 2000, "normal", 1.0), (100, 1000, "normal", 1.0), (4, 250, "normal", 0.01),
               (100, 10000, "karras", 0.01), (1000, 1, "ddim_uniform", 0.5), (100, 100, "beta", 1.0),
               (300, 300, "linear_quadratic", 1.0), (500, 20, "sgm_uniform", 0.05), (200, 50, "simple", 0.3)]


def test_the_schedules_of_the_slow_inputs_take_well_under_a_second(pack, cache_module):
    """Inputs whose schedules take minutes when each length is built one sigma at a time and searched one by one
    (50 x 200 normal, 100 x 1000 normal, 4 x 250 normal at denoise 0.01). Only the schedules are timed here (build_inner_sigmas / build_outer_sigmas), on a fresh model
    sampling each, so no cache helps; the whole plan through the API is timed in test_server_limits_api.py."""
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError, denoise_start_sigma
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, build_inner_sigmas, build_outer_sigmas

    timings = {}
    for outer, inner, scheduler, denoise in SLOW_BEFORE:
        sampling = exemplar_setup(pack, "eps")[0].get_model_object("model_sampling")
        spec = InnerSolverSpec(sampler_name="euler", scheduler=scheduler, steps=inner)
        started = time.monotonic()
        with cache_module.single_threaded():
            try:
                inner_fn = cache_module.schedule_function(sampling, scheduler, "euler")
                steps = spec.steps_per_outer(outer)
                start = denoise_start_sigma(inner_fn, sum(steps), denoise)
                outer_sigmas = build_outer_sigmas(sampling, scheduler, outer, start)
                build_inner_sigmas(inner_fn, spec, steps, outer_sigmas)
            except NestedDiffusionError:
                pass
        timings[(outer, inner, scheduler, denoise)] = round(time.monotonic() - started, 2)
    assert max(timings.values()) < 1.5, timings
    assert sum(timings.values()) < 5.0, timings
