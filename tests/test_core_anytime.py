"""nested_core's anytime pieces without ComfyUI: step presets, stop rules, the outer loop's stop and offsets."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nested_core import NestedDiffusionError, StopRule, inner_steps_per_outer, preset_step_schedule, sample_nested


@settings(max_examples=80, deadline=None)
@given(outer=st.integers(1, 40), inner=st.integers(1, 50), preset=st.sampled_from(["uniform", "front-loaded", "back-loaded"]))
def test_presets_keep_the_total_and_give_every_outer_step_a_step(outer, inner, preset):
    counts = preset_step_schedule(preset, outer, inner)
    assert len(counts) == outer and sum(counts) == outer * inner and min(counts) >= 1
    if preset == "front-loaded":
        assert counts == sorted(counts, reverse=True)
    if preset == "back-loaded":
        assert counts == sorted(counts)


def test_preset_names_are_accepted_in_step_schedule_text():
    assert inner_steps_per_outer(4, 10, "front-loaded") == [15, 12, 8, 5]
    assert inner_steps_per_outer(4, 10, " Back-Loaded ") == [5, 8, 12, 15]
    with pytest.raises(NestedDiffusionError, match="front-loaded"):
        inner_steps_per_outer(4, 10, "middle-loaded")


def test_stop_rule_budgets():
    rule = StopRule(nfe_per_outer=[5, 5, 5, 5], max_nfe=12)
    assert rule(0, 5) is False
    assert rule(1, 10) is True and rule.reason == "max_nfe"
    assert StopRule(nfe_per_outer=[5, 5], max_nfe=0)(0, 5) is False
    assert StopRule(nfe_per_outer=[5, 5])(1, 10) is False  # nothing follows the last step
    with pytest.raises(NestedDiffusionError, match="max_nfe 3 is below"):
        StopRule(nfe_per_outer=[5, 5], max_nfe=3)
    finish = StopRule(nfe_per_outer=[5, 5, 5], finish_requested=lambda: True)
    assert finish(0, 5) is True and finish.reason == "finish requested"


def toy_denoiser(target: torch.Tensor):
    """A model that always predicts ``target``: the inner result is exactly it."""
    def model(x, sigma, **kwargs):
        return target.expand_as(x)
    return model


def euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
    return x


def test_sample_nested_stops_with_the_latest_inner_result_and_counts_nfes():
    target = torch.full((1, 2), 0.5)
    calls, seen = [], []
    result = sample_nested(toy_denoiser(target), torch.randn(1, 2) * 10, torch.tensor([10.0, 5.0, 2.0, 0.0]),
                           inner_solver=euler, inner_schedule=lambda k, s: torch.tensor([s, s / 2, 0.0]),
                           on_model_call=calls.append, callback=lambda d: seen.append(d["i"]),
                           stop_after=lambda index, nfe: index == 1)
    assert torch.allclose(result, target)
    assert seen == [0, 1] and calls[-1] == 4


def test_sample_nested_seeds_follow_the_global_outer_index():
    seeds = []

    def solver(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seeds.append(extra_args["seed"])
        return torch.zeros_like(x)

    common = dict(inner_solver=solver, inner_schedule=lambda k, s: torch.tensor([s, 0.0]))
    sample_nested(toy_denoiser(torch.zeros(1)), torch.ones(1), torch.tensor([3.0, 2.0, 1.0, 0.0]), {"seed": 7}, **common)
    whole = list(seeds)
    seeds.clear()
    sample_nested(toy_denoiser(torch.zeros(1)), torch.ones(1), torch.tensor([1.0, 0.0]), {"seed": 7}, index_offset=2, **common)
    assert whole[0] == 7 and len(set(whole)) == 3
    assert seeds == [whole[2]]


def _gaussian_posterior_mean(flow: bool):
    """Exact denoiser of N(0, 1) data, k-diffusion signature."""
    def model(x, sigma, **kwargs):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * (1 - s) / ((1 - s) ** 2 + s**2) if flow else x / (1 + s**2)
    return model


def _deterministic_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, sigma * x.new_ones(x.shape[0]))
        x = denoised + (x - denoised) * (sigma_next / sigma)
    return x


@pytest.mark.parametrize("flow", [False, True])
def test_renoise_keeps_the_marginal_where_the_eta0_step_widens_it(flow):
    """N(0, 1) data, an exact ODE inside (50 Euler steps): the paper's step widens the spread at every outer step,
    the renoise step keeps it (issue 10's defect, without ComfyUI)."""
    outer = torch.tensor([0.95, 0.8, 0.5, 0.25, 0.0]) if flow else torch.tensor([14.6, 4.0, 1.6, 0.7, 0.0])
    model = _gaussian_posterior_mean(flow)

    def inner(index, sigma):
        ramp = torch.linspace(1, 0, 51)
        return sigma * ramp  # linear to 0: fine for an exact Gaussian denoiser with 50 steps

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=generator)
    x = noise * outer[0] if not flow else noise * outer[0] + torch.randn(20000, 1, generator=generator) * (1 - outer[0])
    std = {}
    for renoise in (False, True):
        out = sample_nested(model, x.clone(), outer, extra_args={"seed": 3}, inner_solver=_deterministic_euler,
                            inner_schedule=inner, flow=flow, renoise=renoise)
        std[renoise] = float(out.std())
    assert std[False] > 1.25
    assert abs(std[True] - 1.0) < 0.05


def test_renoise_step_is_the_forward_process():
    from nested_core import outer_step

    x0, noise = torch.full((3,), 2.0), torch.full((3,), -1.0)
    assert torch.allclose(outer_step(torch.zeros(3), x0, 4.0, 0.5, noise=noise, renoise=True), x0 + 0.5 * noise)
    assert torch.allclose(outer_step(torch.zeros(3), x0, 0.9, 0.5, noise=noise, flow=True, renoise=True), 0.5 * x0 + 0.5 * noise)
    assert torch.equal(outer_step(torch.zeros(3), x0, 0.9, 0.0, noise=noise, renoise=True), x0)  # the last step ends on x0
    with pytest.raises(NestedDiffusionError, match="needs noise"):
        outer_step(torch.zeros(3), x0, 4.0, 0.5, renoise=True)
