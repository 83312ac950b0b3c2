"""nested_core's anytime pieces without ComfyUI: step presets, stop rules, the outer loop's stop and offsets."""
import pytest
import torch
from comfyui_nested_diffusion.nested_core import (
    NestedDiffusionError,
    OuterStepRule,
    RunHooks,
    StopRule,
    inner_steps_per_outer,
    preset_step_schedule,
    run_nested,
)
from hypothesis import given, settings
from hypothesis import strategies as st


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
    assert rule(0, 5) is None
    assert rule(1, 10) == "max_nfe"
    assert StopRule(nfe_per_outer=[5, 5], max_nfe=0)(0, 5) is None
    assert StopRule(nfe_per_outer=[5, 5])(1, 10) is None  # nothing follows the last step
    with pytest.raises(NestedDiffusionError, match="max_nfe 3 is below"):
        StopRule(nfe_per_outer=[5, 5], max_nfe=3)
    finish = StopRule(nfe_per_outer=[5, 5, 5], finish_requested=lambda: True)
    assert finish(0, 5) == "finish requested"


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


def test_a_run_stops_with_the_latest_inner_result_and_counts_nfes():
    target = torch.full((1, 2), 0.5)
    calls, seen = [], []
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    result = run_nested(toy_denoiser(target), torch.randn(1, 2) * 10, sigmas,
                        [torch.tensor([s, s / 2, 0.0]) for s in sigmas[:-1].tolist()], euler, hooks=RunHooks(on_model_call=calls.append, on_inner_result=lambda index, x, x0: seen.append(index), stop_rule=lambda index, nfe: "enough" if index == 1 else None))
    assert torch.allclose(result.x, target) and torch.equal(result.latest, result.x)
    assert result.stop_reason == "enough" and result.nfe == 4
    assert seen == [0, 1] and calls[-1] == 4


def test_a_run_is_told_its_start_and_its_end_even_when_it_raises():
    events = []
    hooks = RunHooks(on_start=lambda x: events.append(("start", tuple(x.shape))),
                     on_model_call=lambda n: events.append("call"), on_end=lambda result: events.append(("end", result)))
    sigmas = torch.tensor([2.0, 1.0, 0.0])
    result = run_nested(toy_denoiser(torch.zeros(1, 2)), torch.ones(1, 2), sigmas, _to_zero([2.0, 1.0]), euler, hooks=hooks)
    assert events == [("start", (1, 2)), "call", "call", ("end", result)]

    def failing(model, x, sigmas, extra_args=None, callback=None, disable=None):
        model(x, sigmas[0] * x.new_ones(x.shape[0]))
        raise RuntimeError("the model failed")

    events.clear()
    with pytest.raises(RuntimeError, match="the model failed"):
        run_nested(toy_denoiser(torch.zeros(1, 2)), torch.ones(1, 2), sigmas, _to_zero([2.0, 1.0]), failing, hooks=hooks)
    assert events == [("start", (1, 2)), "call", ("end", None)]


def _to_zero(sigmas: list) -> list:
    """One-step inner schedules: from each outer sigma straight to 0."""
    return [torch.tensor([sigma, 0.0]) for sigma in sigmas]


def test_inner_seeds_follow_the_global_outer_index():
    seeds = []

    def solver(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seeds.append(extra_args["seed"])
        return torch.zeros_like(x)

    run_nested(toy_denoiser(torch.zeros(1)), torch.ones(1), torch.tensor([3.0, 2.0, 1.0, 0.0]), _to_zero([3.0, 2.0, 1.0]),
               solver, {"seed": 7})
    whole = list(seeds)
    seeds.clear()
    run_nested(toy_denoiser(torch.zeros(1)), torch.ones(1), torch.tensor([1.0, 0.0]), _to_zero([1.0]), solver, {"seed": 7},
               index_offset=2)
    assert whole[0] == 7 and len(set(whole)) == 3
    assert seeds == [whole[2]]


def _gaussian_posterior_mean(flow: bool):
    """Exact denoiser of N(0, 1) data, k-diffusion signature."""
    def model(x, sigma, **kwargs):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return x * (1 - s) / ((1 - s) ** 2 + s**2) if flow else x / (1 + s**2)
    return model


def _deterministic_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = model(x, sigma * x.new_ones(x.shape[0]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = denoised + (x - denoised) * (sigma_next / sigma)
    return x


def _silent(solver):
    """``solver`` without its callbacks (a third-party solver that reports nothing)."""
    return lambda model, x, sigmas, extra_args=None, callback=None, disable=None: solver(model, x, sigmas, extra_args)


def _stale_reports(solver):
    """``solver`` naming its input as the state of every step (what ComfyUI's deis and ipndm report)."""
    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        report = None if callback is None else lambda info: callback({**info, "x": x})
        return solver(model, x, sigmas, extra_args, callback=report)
    return run


@pytest.mark.parametrize("flow", [False, True])
def test_renoise_keeps_the_marginal_where_the_eta0_step_widens_it(flow):
    """N(0, 1) data, an exact ODE inside (50 Euler steps): the paper's step widens the spread at every outer step,
    the renoise step keeps it (without ComfyUI)."""
    outer = torch.tensor([0.95, 0.8, 0.5, 0.25, 0.0]) if flow else torch.tensor([14.6, 4.0, 1.6, 0.7, 0.0])
    model = _gaussian_posterior_mean(flow)

    inner = [sigma * torch.linspace(1, 0, 51) for sigma in outer[:-1]]  # linear to 0: fine for an exact Gaussian denoiser

    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=generator)
    x = noise * outer[0] if not flow else noise * outer[0] + torch.randn(20000, 1, generator=generator) * (1 - outer[0])
    std = {}
    for step, rule in {"ddim": OuterStepRule(flow=flow), "renoise": OuterStepRule(flow=flow, renoise=True),
                       "trajectory": OuterStepRule(flow=flow, trajectory=True)}.items():
        out = run_nested(model, x.clone(), outer, inner, _deterministic_euler, {"seed": 3}, rule=rule).x
        std[step] = float(out.std())
    assert std["ddim"] > 1.25
    assert abs(std["renoise"] - 1.0) < 0.05
    assert abs(std["trajectory"] - 1.0) < 0.05


def _states_seen(solver, outer, inner, x, rule, replan=None):
    """The outer state at every outer step of a run on N(0, 1) data (eps)."""
    states = []
    run_nested(_gaussian_posterior_mean(False), x.clone(), outer, inner, solver, {"seed": 3}, rule=rule,
               hooks=RunHooks(on_inner_result=lambda index, state, x0: states.append(state), replan=replan))
    return states


def test_the_trajectory_step_continues_from_the_inner_solvers_own_state():
    """On the inner grid the next outer state is the inner solver's state there; between grid points, an Euler step
    from the last state above with that step's denoised estimate."""
    model = _gaussian_posterior_mean(False)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(2)) * 10.0
    inner = [torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])]
    on_grid = _states_seen(_deterministic_euler, torch.tensor([10.0, 3.0, 0.0]), inner, x, OuterStepRule(trajectory=True))
    assert torch.allclose(on_grid[1], _deterministic_euler(model, x, torch.tensor([10.0, 6.0, 3.0])))
    inner = [torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]), torch.tensor([4.0, 1.0, 0.0])]
    between = _states_seen(_deterministic_euler, torch.tensor([10.0, 4.0, 0.0]), inner, x, OuterStepRule(trajectory=True))
    assert torch.allclose(between[1], _deterministic_euler(model, x, torch.tensor([10.0, 6.0, 4.0])))


@pytest.mark.parametrize("replanned, from_path", [(2.0, True), (8.0, False)])
def test_a_replanned_trajectory_step_steps_down_from_the_kept_state_or_re_noises(replanned, from_path):
    """update_seconds may move the next outer sigma after the inner diffusion: below the kept state (sigma 6 here) the
    same Euler step goes on to it; above it the path was not kept, and the step re-noises."""
    model = _gaussian_posterior_mean(False)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(6)) * 10.0
    schedules = [torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]), torch.tensor([replanned, 1.0, 0.0])]
    states = _states_seen(_deterministic_euler, torch.tensor([10.0, 4.0, 0.0]), schedules, x,
                          OuterStepRule(trajectory=True), replan=lambda index, nfe, seconds: [replanned, 0.0])
    expected = _deterministic_euler(model, x, torch.tensor([10.0, 6.0, replanned]))
    assert torch.allclose(states[1], expected) is from_path


def test_a_trajectory_step_without_usable_reports_re_noises():
    outer, x = torch.tensor([10.0, 3.0, 0.0]), torch.randn(8, 2, generator=torch.Generator().manual_seed(4)) * 10.0
    inner = [torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])]
    silent = _states_seen(_silent(_deterministic_euler), outer, inner, x, OuterStepRule(trajectory=True))
    renoised = _states_seen(_deterministic_euler, outer, inner, x, OuterStepRule(renoise=True))
    assert torch.equal(silent[1], renoised[1])
    stale = _states_seen(_stale_reports(_deterministic_euler), outer, inner, x, OuterStepRule(trajectory=True))
    assert torch.equal(stale[1], renoised[1])


def test_renoise_step_is_the_forward_process():
    from comfyui_nested_diffusion.nested_core import outer_step

    x0, noise = torch.full((3,), 2.0), torch.full((3,), -1.0)
    assert torch.allclose(outer_step(torch.zeros(3), x0, 4.0, 0.5, noise=noise, renoise=True), x0 + 0.5 * noise)
    assert torch.allclose(outer_step(torch.zeros(3), x0, 0.9, 0.5, noise=noise, flow=True, renoise=True), 0.5 * x0 + 0.5 * noise)
    assert torch.equal(outer_step(torch.zeros(3), x0, 0.9, 0.0, noise=noise, renoise=True), x0)  # the last step ends on x0
    with pytest.raises(NestedDiffusionError, match="needs noise"):
        outer_step(torch.zeros(3), x0, 4.0, 0.5, renoise=True)


def test_projected_costs_follow_what_inner_processes_really_spent():
    from comfyui_nested_diffusion.nested_core import projected_costs, spent_per_inner_process

    assert projected_costs([8, 8, 8], []) == [8, 8, 8]
    assert projected_costs([8, 8, 8], [8]) == [8, 8, 8]  # a solver whose calls do not depend on the model
    assert projected_costs([10, 20, 30], [15]) == [15, 30, 45]  # spent 1.5x the measured cost: the rest will too
    assert projected_costs([10, 20, 30], [5, 10]) == [5, 10, 15]
    assert spent_per_inner_process([5, 7], 20) == [5, 7, 8]


def test_stop_rule_budget_uses_what_was_really_spent():
    """An adaptive solver that spends more than measured must not take the run past max_nfe."""
    rule = StopRule(nfe_per_outer=[10, 10, 10, 10], max_nfe=40)
    assert rule(0, 14) is None  # 14 spent: the next is projected at 14 too, 28 fits
    assert rule(1, 28) == "max_nfe"  # a third at 14 would end at 42
    rule = StopRule(nfe_per_outer=[10, 10, 10, 10], max_nfe=40)
    assert rule(0, 10) is None and rule(1, 20) is None and rule(2, 30) is None  # exact costs: all 4 fit
    rule = StopRule(nfe_per_outer=[10, 10, 10, 10], max_nfe=40)
    assert rule(0, 12) is None  # 12 + 12 <= 40
    assert rule(1, 30) == "max_nfe"  # the second spent 18: the third is projected at 18, 48 > 40


def _adaptive_toy_solver(costs):
    """An inner solver spending ``costs[k]`` model calls in its k-th inner process (more than any plan said)."""
    runs = []

    def solver(model, x, sigmas, extra_args=None, callback=None, disable=None):
        n = costs[len(runs)]
        runs.append(n)
        for _ in range(n):
            denoised = model(x, sigmas[0] * x.new_ones(x.shape[0]))
        return denoised

    return solver, runs


@pytest.mark.parametrize("max_calls, spent, reason", [
    (10, 6, "max_nfe"),  # 6 + a projected 6 > 10: the rule stops before the second inner diffusion
    (15, 15, "max_nfe"),  # projected 6, the second spends 14: cut at the limit, the first's result is kept
    (30, 20, "max_nfe"),  # after 6 + 14 the third is projected at 14: 34 > 30
    (45, 40, None),  # everything fits
])
def test_a_hard_call_limit_cuts_an_inner_diffusion_and_keeps_the_previous_result(max_calls, spent, reason):
    calls, seen = [], []
    solver, runs = _adaptive_toy_solver([6, 14, 20])
    rule = StopRule(nfe_per_outer=[6, 6, 6], max_nfe=max_calls)
    x = torch.randn(1, 2)
    result = run_nested(toy_denoiser(torch.full((1, 2), 0.5)), x, torch.tensor([3.0, 2.0, 1.0, 0.0]),
                        _to_zero([3.0, 2.0, 1.0]), solver,
                        max_calls=max_calls, hooks=RunHooks(on_model_call=calls.append, stop_rule=rule, on_inner_result=lambda index, state, x0: seen.append(index)))
    assert calls[-1] == spent <= max_calls
    assert result.stop_reason == reason
    assert torch.allclose(result.x, torch.full((1, 2), 0.5))
    assert len(seen) == len([n for n in [6, 20, 40] if n <= spent])  # a cut inner diffusion shows no image


def test_a_first_inner_diffusion_past_the_call_limit_is_a_clear_error():
    solver, _ = _adaptive_toy_solver([6])
    with pytest.raises(NestedDiffusionError, match="max_nfe 5 was used up before the first inner diffusion ended"):
        run_nested(toy_denoiser(torch.zeros(1, 2)), torch.randn(1, 2), torch.tensor([3.0, 0.0]), _to_zero([3.0]), solver,
                   max_calls=5)


@pytest.mark.parametrize("renoise, eta", [(False, 1.0), (False, 0.5), (True, 0.0), (False, 0.0)])
@pytest.mark.parametrize("noise_scale", [1.0, 8.0])
def test_flow_outer_steps_keep_a_scaled_noise_scaled(renoise, eta, noise_scale):
    """ComfyUI's model_sampling.noise_scale (flow models, 0.21.1 on): x = (1 - s) x0 + s * noise_scale * eps.
    Every outer step must land on that form at sigma_next: the fresh noise it adds is scaled too."""
    from comfyui_nested_diffusion.nested_core import outer_step

    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(200000, generator=generator)
    sigma, sigma_next = 0.8, 0.5
    x = (1 - sigma) * x0 + sigma * noise_scale * torch.randn(200000, generator=generator)
    noise = torch.randn(200000, generator=generator)
    out = outer_step(x, x0, sigma, sigma_next, eta=eta, noise=noise, flow=True, renoise=renoise, noise_scale=noise_scale)
    residual = out - (1 - sigma_next) * x0
    assert abs(float(residual.std()) / (sigma_next * noise_scale) - 1) < 0.01


def test_outer_noise_of_an_item_does_not_depend_on_its_batch():
    from comfyui_nested_diffusion.nested_core import seeded_outer_noise

    x4, x1 = torch.zeros(4, 3, 2, 2), torch.zeros(1, 3, 2, 2)
    batch = seeded_outer_noise(11)(2, x4, range(4))
    assert torch.equal(seeded_outer_noise(11)(2, x1, [0])[0], batch[0])
    assert torch.equal(seeded_outer_noise(11)(2, x1, [2])[0], batch[2])  # LatentFromBatch(2)
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(seeded_outer_noise(11)(3, x4, range(4)), batch)
    assert torch.equal(seeded_outer_noise(11, stream=2)(2, x4, range(4)), seeded_outer_noise(11, stream=2)(2, x4, range(4)))


@pytest.mark.parametrize("renoise, eta, trajectory", [(True, 0.0, False), (False, 0.5, False), (False, 0.0, False),
                                                      (False, 0.0, True)])
def test_a_pick_continues_the_kept_item_as_the_full_batch_would(renoise, eta, trajectory):
    """A pick posted once outer step 1 has ended is taken at the next model call: the rest runs on that item alone
    (1/B of the model work) and gives what the full batch gives that item: the pack's outer noise is drawn per item."""
    sigmas = torch.tensor([14.6, 4.0, 1.6, 0.7, 0.0])
    inner = [sigma * torch.linspace(1, 0, 6) for sigma in sigmas[:-1]]
    model = _gaussian_posterior_mean(flow=False)
    x = torch.randn(3, 2, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    common = dict(extra_args={"seed": 5}, rule=OuterStepRule(eta=eta, renoise=renoise, trajectory=trajectory),
                  batch_indices=[4, 7, 9])
    full = run_nested(model, x.clone(), sigmas, inner, _deterministic_euler, **common)
    seen, picked, calls = [], [], []
    hooks = RunHooks(on_inner_result=lambda index, state, x0: seen.append(x0.shape[0]),
                     take_pick=lambda batch: 1 if seen else None, on_pick=lambda *args: picked.append(args),
                     on_model_call=calls.append)
    result = run_nested(model, x.clone(), sigmas, inner, _deterministic_euler, **common, hooks=hooks)
    assert result.kept == 1 and picked == [(0, 1, 7)]
    assert seen == [3, 1, 1, 1] and result.x.shape == (1, 2)
    assert torch.allclose(result.x, full.x[1:2], atol=1e-5)


def test_a_pick_during_an_inner_diffusion_evaluates_only_the_kept_item_from_the_next_call():
    """The running inner diffusion goes on with the kept item alone: each later call evaluates one item, and the
    kept item ends where the full batch would have taken it."""
    sigmas = torch.tensor([14.6, 4.0, 0.0])
    inner = [sigma * torch.linspace(1, 0, 6) for sigma in sigmas[:-1]]
    model = _gaussian_posterior_mean(flow=False)
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(2)) * sigmas[0]
    full = run_nested(model, x.clone(), sigmas, inner, _deterministic_euler, {"seed": 1}, rule=OuterStepRule(renoise=True))
    evaluated, seen, picked = [], [], []

    def counting(x, sigma, **kwargs):
        evaluated.append(x.shape[0])
        return model(x, sigma, **kwargs)

    hooks = RunHooks(take_pick=lambda batch: 2 if len(evaluated) >= 2 else None, on_pick=lambda *args: picked.append(args),
                     on_inner_result=lambda index, state, x0: seen.append(x0.shape[0]))
    result = run_nested(counting, x.clone(), sigmas, inner, _deterministic_euler, {"seed": 1},
                        rule=OuterStepRule(renoise=True), hooks=hooks)
    assert evaluated == [4, 4] + [1] * 8 and picked == [(-1, 2, 2)] and seen == [1, 1]
    assert result.kept == 2 and torch.allclose(result.x, full.x[2:3], atol=1e-5)


def test_finish_now_ends_the_run_at_the_next_model_call_with_the_latest_image():
    """Finish now during an inner diffusion drops it at its next model call and returns the latest finished image;
    during the first one (no image yet) that inner diffusion ends first."""
    sigmas = torch.tensor([14.6, 4.0, 1.6, 0.0])
    inner = [sigma * torch.linspace(1, 0, 6) for sigma in sigmas[:-1]]
    model = _gaussian_posterior_mean(flow=False)
    x = torch.randn(2, 2, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    for asked_at, calls_run, images in [(7, 7, 1), (2, 5, 1), (12, 12, 2)]:
        calls, results = [], []
        hooks = RunHooks(on_model_call=calls.append, finish_now=lambda: len(calls) >= asked_at,
                         stop_rule=lambda index, nfe: "finish requested" if len(calls) >= asked_at else None,
                         on_inner_result=lambda index, state, x0: results.append(x0.clone()))
        result = run_nested(model, x.clone(), sigmas, inner, _deterministic_euler, {"seed": 1}, hooks=hooks)
        assert result.stop_reason == "finish requested" and result.nfe == calls_run == len(calls), (asked_at, result)
        assert len(results) == images and torch.equal(result.x, results[-1]) and torch.equal(result.latest, results[-1])


def test_a_pick_is_taken_once_at_the_next_model_call():
    sigmas = torch.tensor([3.0, 2.0, 0.0])
    asked = []

    def take_pick(batch):
        asked.append(batch)
        return 0

    result = run_nested(toy_denoiser(torch.zeros(1, 2)), torch.randn(2, 2), sigmas, _to_zero([3.0, 2.0]), euler,
                        hooks=RunHooks(take_pick=take_pick))
    assert asked == [2] and result.kept == 0 and result.x.shape == (1, 2)
    out_of_range = run_nested(toy_denoiser(torch.zeros(1, 2)), torch.randn(2, 2), sigmas, _to_zero([3.0, 2.0]), euler,
                              hooks=RunHooks(take_pick=lambda batch: 5))
    assert out_of_range.kept is None and out_of_range.x.shape == (2, 2)
