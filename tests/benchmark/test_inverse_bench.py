"""bench/inverse.py on a tiny case (exact exemplar model, 2 images, 1 seed, 2 x 3): what it records and the
PASS/FAIL lines it derives, so that the benchmark's json means what docs/inverse_problems.md says."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def inverse_bench(pack):
    from comfyui_nested_diffusion.bench import inverse

    return inverse


def test_a_case_records_every_boundary_and_its_verdicts(inverse_bench):
    model, cond, truth = inverse_bench.load_model("exemplar", 2)
    case = inverse_bench.run_case(model, cond, truth, "super_resolution", 4, 0.0, seeds=(0,), splits=((2, 3),))
    summary = case["splits"]["2x3"]["summary"]
    assert summary["nfe_at_boundaries"] == [3, 6]
    assert len(summary["nested_psnr"]) == len(summary["ksampler_x0_psnr"]) == 2
    assert summary["nested_consistency_max"] <= inverse_bench.CONSISTENT
    assert summary["ksampler_x0_consistency_max"] <= inverse_bench.CONSISTENT  # KSampler's x0 is patched too
    assert case["outer_steps_1_equals_ksampler"] is True
    per_seed = case["splits"]["2x3"]["per_seed"][0]
    assert per_seed["nested_final_psnr"] == pytest.approx(per_seed["nested_psnr"][-1])  # the last image is the result
    lines = inverse_bench.verdicts({"models": {"exemplar": {"super_resolution": case}}})
    assert [line.split(" ", 1)[0] for line in lines][:1] == ["PASS"]  # consistency
    assert sum(line.startswith(("PASS", "FAIL")) for line in lines) == 4
    assert lines[-1].startswith("NOT MEASURED FID")


def test_interval_is_a_t_interval_over_seeds(inverse_bench):
    values = [1.0, 2.0, 3.0]
    result = inverse_bench.interval(values)
    assert result["mean"] == 2.0
    assert result["high"] - result["mean"] == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert inverse_bench.interval([5.0])["low"] == 5.0
