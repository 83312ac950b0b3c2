"""The quality protocol's arithmetic (bench/digits_quality.py): KID, the bootstrap's statistics and targets, the
restart baseline's re-noising and schedules. Pure numpy/torch: no ComfyUI, no sampling."""
import numpy as np
import pytest
import torch
from comfyui_nested_diffusion.bench import digits_quality as dq


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_for_another():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 16)), rng.normal(size=(300, 16))
    shifted = rng.normal(size=(400, 16)) + 0.5
    same = dq.kid_from_kernels(dq.kernel(a, a), dq.kernel(b, b), dq.kernel(a, b))
    other = dq.kid_from_kernels(dq.kernel(shifted, shifted), dq.kernel(b, b), dq.kernel(shifted, b))
    assert abs(same) < 0.02 * other and other > 0


def test_fid_of_two_samples_of_one_gaussian_is_small_and_a_shift_shows():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert dq.fid_of(a, b) < 0.1
    assert dq.fid_of(a + 1.0, b) == pytest.approx(8.0, rel=0.1)  # |mu1 - mu2|^2 = 8


def stats(values: dict) -> dict:
    return {key: {"value": v, "ci95": [v - 0.01, v + 0.01]} for key, v in values.items()}


def test_targets_read_the_statistics_and_their_intervals():
    good = {"stats": stats({"t1_gap_closed": 0.8, "t1_excess": -2.0, "t2_ratio_20": 0.9, "t2_ratio_30": 1.0, "t2_ratio_40": 1.04,
                            "t3_final_ratio": 1.05, "t4_accuracy_difference": -0.01})}
    assert [ok for _, ok, _ in dq.targets(good)] == [True, True, True, True]
    wide = {"stats": {**good["stats"], "t3_final_ratio": {"value": 1.05, "ci95": [0.9, 1.3]},
                      "t2_ratio_30": {"value": 1.04, "ci95": [1.0, 1.12]}}}
    assert [ok for _, ok, _ in dq.targets(wide)] == [True, False, False, True]  # upper ends over 1.10 and 1.25
    bad = {"stats": {**good["stats"], "t1_excess": {"value": 0.3, "ci95": [-0.5, 1.0]},
                     "t4_accuracy_difference": {"value": -0.03, "ci95": [-0.05, 0.0]}}}
    names = [ok for _, ok, _ in dq.targets(bad)]
    assert names == [False, True, True, False]


def test_derived_statistics_from_fids():
    fids = {"ksampler_x0_10": 40.0, "ksampler_final": 10.0, "nested_10": 20.0, "nested_20": 15.0, "nested_30": 15.0,
            "nested_40": 16.5, "nested_final": 16.5, "restart_final": 11.0}
    out = dq.derived(fids, {"nested": 0.9, "ksampler": 0.95})
    assert out["t1_gap_closed"] == pytest.approx((40 - 20) / 30)
    assert out["t1_excess"] == pytest.approx(20 - (10 + 15))
    assert out["t2_ratio_20"] == pytest.approx(0.75) and out["t2_ratio_40"] == pytest.approx(1.1)
    assert out["t3_final_ratio"] == pytest.approx(1.65) and out["t4_accuracy_difference"] == pytest.approx(-0.05)
    assert out["nested_over_restart"] == pytest.approx(1.5)


def test_the_first_image_target_holds_where_ksamplers_x0_is_already_as_good_as_its_final():
    """The gap closed is undefined there (no gap); the target itself, first <= final + half the gap, is not."""
    fids = {"ksampler_x0_10": 9.0, "ksampler_final": 10.0, "nested_10": 9.4, "nested_20": 9.3, "nested_30": 9.2,
            "nested_40": 9.2, "nested_final": 9.2}
    out = dq.derived(fids, {"nested": 0.9, "ksampler": 0.9})
    assert out["t1_excess"] == pytest.approx(9.4 - 9.5) and out["t1_excess"] < 0


def test_another_shape_changes_the_boundaries_and_the_file_names(tmp_path):
    try:
        assert dq.set_shape("10x10") == "10x10" and dq.BUDGET == 100
        assert dq.run_file(tmp_path, "flow", "euler", 1, 500, "path").name == "flow_euler_path_10x10_seed1_n500.npz"
    finally:
        dq.set_shape("4x10")
    assert dq.run_file(tmp_path, "flow", "euler", 1, 500).name == "flow_euler_seed1_n500.npz"


@pytest.mark.parametrize("flow", [False, True])
def test_renoise_gives_the_marginal_at_the_higher_sigma(flow):
    low, high = (0.2, 0.6) if flow else (0.1, 2.0)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.zeros(200_000)
    state = (1 - low) * x0 + low * torch.randn(x0.shape, generator=generator) if flow else \
        x0 + low * torch.randn(x0.shape, generator=generator)
    up = dq._renoise(state, low, high, flow, generator)
    assert float(up.std()) == pytest.approx(high, rel=0.01)  # x0 = 0: only the noise part, of std sigma


@pytest.mark.parametrize("flow", [False, True])
def test_restart_schedule_falls_from_top_to_bottom_in_its_steps(flow):
    top = dq._to_model_sigma(dq.RESTART_SIGMA_MAX, flow)
    sigmas = dq._restart_sigmas(top, 0.05, dq.RESTART_STEPS, flow)
    assert len(sigmas) == dq.RESTART_STEPS + 1 and float(sigmas[0]) == pytest.approx(top)
    assert float(sigmas[-1]) == pytest.approx(0.05) and bool((sigmas[1:] < sigmas[:-1]).all())


def test_restart_baseline_spends_the_same_nfes_as_the_nested_run():
    assert dq.restart_nfes() == dq.OUTER * dq.INNER


def test_interval_is_recentred_on_the_estimate_with_the_draws_width():
    draws = np.linspace(10.0, 14.0, 401)  # median 12, 2.5th / 97.5th percentiles 10.1 / 13.9
    low, high = dq.interval(5.0, draws)
    assert low == pytest.approx(5.0 - 1.9) and high == pytest.approx(5.0 + 1.9)


def test_a_baseline_run_for_some_seeds_only_is_left_out_of_the_mean():
    seeds = [{"nested_final": 10.0, "restart_final": 12.0}, {"nested_final": 14.0}]
    assert dq.mean_over(seeds) == {"nested_final": 12.0}
