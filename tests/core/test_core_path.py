"""The "path" outer step: its schedules walk KSampler's own grid, and the outer chain is KSampler's path."""
import pytest
import torch
from comfyui_nested_diffusion.nested_core import (
    NestedDiffusionError,
    OuterStepRule,
    path_completion_steps,
    path_schedules,
    run_nested,
)


def karras(n: int, sigma_min: float = 0.03, sigma_max: float = 14.6, rho: float = 7.0) -> torch.Tensor:
    """A scheduler's schedule function: ``n`` Karras steps and a final 0."""
    ramp = torch.linspace(0, 1, n)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def euler_reporting(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """ComfyUI's euler: the callback sees the state before each step and its denoised estimate."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
    return x


def shrinking_denoiser(x, sigma, **kwargs):
    """A Gaussian data model's posterior mean (data variance 1): a denoised estimate that depends on the state."""
    return x / (1.0 + sigma.view(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("inner", [2, 4, 5, 10])
def test_completion_takes_a_quarter_of_the_inner_steps_and_leaves_at_least_one_on_the_path(inner):
    completion = path_completion_steps(inner)
    assert 1 <= completion < inner
    assert completion == -(-inner // 4)


def test_four_by_ten_walks_31_grid_steps_and_completes_each_anytime_image_in_3():
    outer, inner = path_schedules(karras, [10, 10, 10, 10])
    grid = karras(31)
    assert torch.equal(outer, torch.cat([grid[[0, 7, 14, 21]], torch.zeros(1)]))
    for k in range(3):
        assert inner[k].numel() == 11  # 10 steps each, as asked
        assert torch.equal(inner[k][:8], grid[7 * k:7 * k + 8])  # 7 steps on the grid down to the next outer sigma
        assert float(inner[k][-1]) == 0.0 and bool((inner[k][:-1] > inner[k][1:]).all())
    assert torch.equal(inner[3], grid[21:])


def test_one_outer_step_is_the_schedulers_own_schedule():
    outer, inner = path_schedules(karras, [12])
    assert torch.equal(inner[0], karras(12))
    assert torch.equal(outer, torch.tensor([float(karras(12)[0]), 0.0]))


def test_denoise_truncates_the_grid_as_ksampler_does():
    outer, inner = path_schedules(karras, [6, 6], denoise=0.5)
    walked = 6 - path_completion_steps(6)
    total = walked + 6
    grid = karras(int(total / 0.5))[-(total + 1):]
    assert float(outer[0]) == float(grid[0])
    assert torch.equal(inner[1], grid[walked:])


def test_uneven_inner_steps_and_single_steps_keep_every_schedule_decreasing():
    outer, inner = path_schedules(karras, [1, 3, 8, 2])
    assert [s.numel() - 1 for s in inner] == [1, 3, 8, 2]
    assert torch.equal(inner[0], torch.tensor([float(outer[0]), 0.0]))  # one step: to 0, the tap moves it on
    for schedule in inner:
        assert bool((schedule[:-1] > schedule[1:]).all()) and float(schedule[-1]) == 0.0
    assert bool((outer[:-1] > outer[1:]).all())


def test_a_scheduler_that_cannot_place_the_steps_is_a_clear_error():
    def coarse(n):
        return torch.cat([torch.linspace(10, 1, min(n, 5)), torch.zeros(1)])

    with pytest.raises(NestedDiffusionError, match="cannot place the path's"):
        path_schedules(coarse, [10, 10])


@pytest.mark.parametrize("steps", [[10, 10, 10, 10], [5, 5, 5, 5, 5, 5], [3, 8, 2]])
def test_the_outer_chain_ends_with_ksamplers_euler_on_the_whole_grid(steps):
    outer, inner = path_schedules(karras, steps)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0)) * float(outer[0])
    result = run_nested(shrinking_denoiser, x, outer, inner, euler_reporting, rule=OuterStepRule(trajectory=True))
    walked = sum(n - path_completion_steps(n) if n > 1 else 1 for n in steps[:-1]) + steps[-1]
    ksampler = euler_reporting(shrinking_denoiser, x, karras(walked))
    assert torch.allclose(result.x, ksampler, atol=1e-5)
    assert result.nfe == sum(steps)
