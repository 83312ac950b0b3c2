"""update_seconds in nested_core, without ComfyUI: the inner length for an interval, the split of the steps left,
the re-placed outer sigmas, the pacer on a simulated clock, and run_nested's replan hook."""
import pytest
import torch
from comfyui_nested_diffusion.nested_core import (
    IntervalPacer,
    NestedDiffusionError,
    RunHooks,
    check_schedule,
    check_update_seconds,
    outer_schedule,
    paced_outer_sigmas,
    run_nested,
    split_steps,
    steps_for_interval,
    truncated_schedule,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core_anytime import euler, toy_denoiser
from test_core_schedules import SCHEDULES, karras


def test_steps_for_interval():
    assert steps_for_interval(0.4, 0.02, 1.0) == 20
    assert steps_for_interval(0.4, 0.02, 1.0, overhead_seconds=0.1) == 15
    assert steps_for_interval(0.4, 0.02, 2.0) == 10  # heun: two calls a step
    assert steps_for_interval(0.01, 0.02, 1.0) == 1  # never below one step
    assert steps_for_interval(0.4, 0.0, 1.0) == 1  # nothing measured: the shortest
    assert steps_for_interval(0.4, 0.02, 1.0, overhead_seconds=1.0) == 1


def test_update_seconds_is_checked():
    assert check_update_seconds(0) == 0.0 and check_update_seconds(2.5) == 2.5
    for bad in (-1.0, float("nan"), float("inf"), 3601.0, True, "1"):
        with pytest.raises(NestedDiffusionError, match="update_seconds"):
            check_update_seconds(bad)


@settings(max_examples=200, deadline=None)
@given(remaining=st.integers(1, 2000), steps=st.integers(1, 300))
def test_split_steps_spends_the_budget_near_the_chosen_length(remaining, steps):
    counts = split_steps(remaining, min(steps, remaining))
    n = min(steps, remaining)
    assert sum(counts) == remaining and min(counts) >= 1
    assert counts == sorted(counts, reverse=True) and max(counts) - min(counts) <= 1
    assert all(2 * n / 3 - 1 <= c <= 1.5 * n + 1 for c in counts)


def test_split_steps_edges():
    assert split_steps(0, 5) == []
    assert split_steps(10, 5) == [5, 5]
    assert split_steps(10, 4) == [5, 5]
    assert split_steps(11, 4) == [4, 4, 3]
    assert split_steps(3, 10) == [3]


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("outer_steps", [2, 4, 7])
def test_paced_outer_sigmas_give_back_the_plan_with_the_planned_counts(name, outer_steps):
    """Re-placing the outer steps left with the planned count reproduces the planned outer sigmas."""
    schedule_fn = SCHEDULES[name]
    planned = outer_schedule(schedule_fn, outer_steps)
    for k in range(outer_steps - 1):
        tail = paced_outer_sigmas(schedule_fn, float(planned[k]), outer_steps - 1 - k)
        assert torch.allclose(tail, planned[k + 1:], rtol=1e-5, atol=0)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), position=st.floats(0.0, 0.95), outer_steps=st.integers(1, 60))
def test_paced_outer_sigmas_are_valid_below_any_sigma(name, position, outer_steps):
    schedule_fn = SCHEDULES[name]
    full = schedule_fn(100)
    sigma = float(full[int(position * 99)])
    tail = paced_outer_sigmas(schedule_fn, sigma, outer_steps)
    assert tail.numel() == outer_steps + 1
    check_schedule(torch.cat([torch.tensor([sigma]), tail]))


def simulate(pacer: IntervalPacer, first_steps: int, seconds_per_call, overhead: float = 0.01):
    """A run on a simulated clock: (the steps of every inner process, the intervals between their ends)."""
    now = [0.0]
    pacer.clock = lambda: now[0]
    steps, done, ends = [first_steps], 0, []
    while True:
        k = len(steps) - 1
        inner = steps[k] * seconds_per_call(k)
        now[0] += inner
        ends.append(now[0])
        done += steps[k]
        following = pacer.update(done, steps[k], steps[k], inner)
        if not following:
            break
        now[0] += overhead
        steps.append(following[0])
    return steps, [b - a for a, b in zip(ends, ends[1:])]


@pytest.mark.parametrize("seconds_per_call", [0.02, 0.05, 0.003])
def test_a_steady_model_gets_its_images_at_the_interval(seconds_per_call):
    steps, intervals = simulate(IntervalPacer(0.4, 100), 25, lambda k: seconds_per_call)
    assert sum(steps) == 100 and steps[0] == 25
    for interval in intervals[:-2]:  # the last two may share what is left of the budget
        assert abs(interval - 0.4) <= 0.25 * 0.4
    assert all(abs(i - 0.4) <= 0.5 * 0.4 for i in intervals)


def test_a_model_that_slows_down_is_followed():
    steps, intervals = simulate(IntervalPacer(0.4, 400), 10, lambda k: 0.01 if k < 5 else 0.04)
    assert sum(steps) == 400
    # 0.4 s less 0.01 s overhead at 0.01 s a call, then at 0.04 s (the split of what is left may add one)
    assert steps[3] == 39 and abs(steps[8] - 10) <= 1
    assert all(abs(i - 0.4) <= 0.25 * 0.4 for i in intervals[:4] + intervals[6:-2])


def test_one_slow_inner_process_does_not_shorten_the_next():
    steps, intervals = simulate(IntervalPacer(0.4, 400), 10, lambda k: 0.06 if k == 4 else 0.02)
    # (the even split of what is left may add one step to the next process)
    assert abs(steps[5] - 20) <= 1 and abs(steps[3] - 20) <= 1  # 0.39 s at 0.02 s a call: the slow one is outvoted
    steps, _ = simulate(IntervalPacer(0.4, 400, window=1), 10, lambda k: 0.06 if k == 4 else 0.02)
    assert abs(steps[5] - 6) <= 2  # measured from the latest alone, the next one would be short


def test_the_first_inner_process_counts_only_until_another_is_measured():
    """Its time may carry a warm-up: a first process three times slower shortens only the second."""
    steps, intervals = simulate(IntervalPacer(0.4, 200), 10, lambda k: 0.06 if k == 0 else 0.02)
    assert abs(steps[1] - 7) <= 1 and abs(steps[2] - 20) <= 1 and abs(steps[3] - 20) <= 1


def test_run_nested_follows_a_replan():
    target = torch.ones(1, 1, 2, 2)
    planned = outer_schedule(karras, 3)
    inner = [truncated_schedule(karras, 4, float(s)) for s in planned[:-1]]
    seen = []

    def replan(index, nfe_done, seconds):
        assert seconds >= 0
        if index == 0:  # four outer steps left instead of two, with one step each
            tail = paced_outer_sigmas(karras, float(planned[0]), 4)
            inner[1:] = [truncated_schedule(karras, 1, float(s)) for s in tail[:-1]]
            return tail.tolist()
        return None

    result = run_nested(toy_denoiser(target), torch.randn(1, 1, 2, 2) * 14.6, planned, inner, euler, hooks=RunHooks(on_inner_result=lambda k, x, x0: seen.append(k), replan=replan))
    assert seen == [0, 1, 2, 3, 4] and result.nfe == 4 + 4 * 1
    assert torch.allclose(result.x, target)


def test_run_nested_without_replan_or_keeping_the_plan_is_unchanged():
    target = torch.ones(2, 1, 2, 2) * 0.5
    planned = outer_schedule(karras, 3)
    inner = [truncated_schedule(karras, 4, float(s)) for s in planned[:-1]]
    x = torch.randn(2, 1, 2, 2) * 14.6
    plain = run_nested(toy_denoiser(target), x, planned, inner, euler)
    kept = run_nested(toy_denoiser(target), x, planned, inner, euler, hooks=RunHooks(replan=lambda *_: None))
    assert torch.equal(plain.x, kept.x) and plain.nfe == kept.nfe == 12


def test_a_bad_replan_is_refused():
    planned = outer_schedule(karras, 3)
    inner = [truncated_schedule(karras, 4, float(s)) for s in planned[:-1]]
    for bad in ([float(planned[0]) + 1, 0.0], [1.0, 2.0, 0.0], [1.0, 0.5], []):
        with pytest.raises(NestedDiffusionError, match="re-planned"):
            run_nested(toy_denoiser(torch.zeros(1, 1, 2, 2)), torch.randn(1, 1, 2, 2), planned, inner, euler, hooks=RunHooks(replan=lambda *_: bad))


def test_a_pick_and_a_replan_go_together():
    """A pick at an outer boundary keeps one item; the re-planned outer steps then run on it alone."""
    targets = torch.stack([torch.full((1, 2, 2), float(i)) for i in range(3)])
    planned = outer_schedule(karras, 2)
    inner = [truncated_schedule(karras, 3, float(s)) for s in planned[:-1]]
    picks, seen = [1], []

    def replan(index, nfe_done, seconds):
        if index == 0:
            tail = paced_outer_sigmas(karras, float(planned[0]), 3)
            inner[1:] = [truncated_schedule(karras, 2, float(s)) for s in tail[:-1]]
            return tail.tolist()
        return None

    result = run_nested(lambda x, sigma, **kw: targets[:x.shape[0]] if x.shape[0] == 3 else targets[1:2].expand_as(x),
                        torch.randn(3, 1, 2, 2) * 14.6, planned, inner, euler, hooks=RunHooks(replan=replan, take_pick=lambda batch: picks.pop() if picks and seen else None, on_inner_result=lambda k, x, x0: seen.append((k, x.shape[0]))))
    assert seen == [(0, 3), (1, 1), (2, 1), (3, 1)] and result.kept == 1
    assert result.nfe == 3 + 3 * 2 and torch.allclose(result.x, targets[1:2])
