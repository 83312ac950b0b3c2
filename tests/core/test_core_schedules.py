"""nested_core schedules and step bookkeeping, without ComfyUI."""
import math

import pytest
import torch
from comfyui_nested_diffusion.nested_core import (
    NestedDiffusionError,
    check_schedule,
    denoise_start_sigma,
    inner_steps_per_outer,
    outer_schedule,
    parse_step_schedule,
    truncated_schedule,
)
from hypothesis import given, settings
from hypothesis import strategies as st


def karras(steps: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, steps)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def shifted_flow(steps: int, shift: float = 3.0) -> torch.Tensor:
    t = torch.linspace(1, 1 / 1000, steps)
    sigmas = shift * t / (1 + (shift - 1) * t)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SCHEDULES = {"karras": karras, "flow": shifted_flow}


@pytest.mark.parametrize("name", SCHEDULES)
def test_truncated_schedule_starts_exactly_at_the_outer_sigma(name):
    schedule = SCHEDULES[name]
    start = float(schedule(9)[3])
    tail = truncated_schedule(schedule, 10, start)
    assert tail.numel() == 11
    assert float(tail[0]) == pytest.approx(start, rel=0, abs=0)
    check_schedule(tail)
    assert int((tail == 0).sum()) == 1


@pytest.mark.parametrize("name", SCHEDULES)
def test_truncated_schedule_at_the_schedule_start_is_the_plain_schedule(name):
    schedule = SCHEDULES[name]
    full = schedule(12)
    assert torch.equal(truncated_schedule(schedule, 12, float(full[0])), full)


def test_truncated_schedule_reproduces_ksampler_denoise_truncation():
    steps, denoise = 8, 0.6
    expected = karras(int(steps / denoise))[-(steps + 1):]
    start = denoise_start_sigma(karras, steps, denoise)
    assert torch.equal(truncated_schedule(karras, steps, start), expected)


def test_truncated_schedule_keeps_the_scheduler_spacing():
    start = float(karras(40)[20])
    tail = truncated_schedule(karras, 20, start)
    assert torch.allclose(tail[1:], karras(40)[21:])


def test_truncated_schedule_beyond_resolution_is_a_clear_error():
    def coarse(steps: int) -> torch.Tensor:
        if steps > 50:
            raise ValueError("too many steps")
        return karras(steps)

    with pytest.raises(NestedDiffusionError, match="resolution"):
        truncated_schedule(coarse, 45, float(karras(50)[45]))


def test_outer_schedule_drops_the_last_nonzero_sigma():
    sigmas = outer_schedule(karras, 4)
    full = karras(5)
    assert sigmas.tolist() == pytest.approx(torch.cat([full[:4], full[-1:]]).tolist())
    assert outer_schedule(karras, 1).tolist() == pytest.approx([float(full[0]), 0.0])


def test_outer_schedule_with_denoise_starts_at_the_given_sigma():
    start = denoise_start_sigma(karras, 40, 0.5)
    sigmas = outer_schedule(karras, 4, start)
    assert float(sigmas[0]) == start and sigmas.numel() == 5
    check_schedule(sigmas)


@pytest.mark.parametrize("denoise", [0.0, -0.1, 1.5, float("nan")])
def test_denoise_out_of_range_is_refused(denoise):
    with pytest.raises(NestedDiffusionError, match="denoise"):
        denoise_start_sigma(karras, 10, denoise)


@pytest.mark.parametrize("value", [0, -3, 10001, 2.5, True])
def test_outer_steps_out_of_range_is_refused(value):
    with pytest.raises(NestedDiffusionError, match="outer_steps"):
        outer_schedule(karras, value)


def test_parse_step_schedule():
    assert parse_step_schedule("20,10,5,5", 4) == [20, 10, 5, 5]
    assert parse_step_schedule(" 3, 2 ,1 ", 3) == [3, 2, 1]
    assert inner_steps_per_outer(3, 7) == [7, 7, 7]
    assert inner_steps_per_outer(2, 7, "4,9") == [4, 9]


@pytest.mark.parametrize("text,message", [
    ("20,ten", "comma-separated"), ("", "comma-separated"), ("5,-1", "comma-separated"), ("1.5,2", "comma-separated"),
    ("5,5,5", "outer_steps is 4"), ("5,0,5,5", "entry 2"),
])
def test_bad_step_schedule_names_the_problem(text, message):
    with pytest.raises(NestedDiffusionError, match=message):
        parse_step_schedule(text, 4)


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 60), position=st.floats(0.0, 0.97), name=st.sampled_from(sorted(SCHEDULES)))
def test_any_valid_inner_schedule_is_well_formed(steps, position, name):
    schedule = SCHEDULES[name]
    full = schedule(100)
    start = float(full[int(position * 99)])
    tail = truncated_schedule(schedule, steps, start)
    assert float(tail[0]) == start
    assert tail.numel() == steps + 1
    check_schedule(tail)


@settings(max_examples=40, deadline=None)
@given(outer=st.integers(1, 60), denoise=st.floats(0.05, 1.0), name=st.sampled_from(sorted(SCHEDULES)))
def test_any_valid_outer_schedule_is_well_formed(outer, denoise, name):
    schedule = SCHEDULES[name]
    start = denoise_start_sigma(schedule, outer * 4, denoise)
    sigmas = outer_schedule(schedule, outer, start)
    assert sigmas.numel() == outer + 1
    check_schedule(sigmas)
    if start is not None:
        assert math.isclose(float(sigmas[0]), start)


@settings(max_examples=40, deadline=None)
@given(steps=st.integers(-5, 0) | st.integers(10001, 20000), start=st.floats(allow_nan=True, allow_infinity=True))
def test_any_invalid_input_raises_the_project_error(steps, start):
    with pytest.raises(NestedDiffusionError):
        truncated_schedule(karras, steps, start)
