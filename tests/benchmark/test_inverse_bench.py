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
    assert lines[-1].startswith("ELSEWHERE FID targets") and "inverse_fid" in lines[-1]


def test_interval_is_a_t_interval_over_seeds(inverse_bench):
    values = [1.0, 2.0, 3.0]
    result = inverse_bench.interval(values)
    assert result["mean"] == 2.0
    assert result["high"] - result["mean"] == pytest.approx(4.303 * 1.0 / 3 ** 0.5)
    assert inverse_bench.interval([5.0])["low"] == 5.0


# ---------------------------------------------------------------------------------------------- FID per boundary
# bench/inverse_fid.py: the saved figures (bench/results/inverse_fid.json) mean what docs/inverse_problems.md says,
# and a small run re-done here lands where the saved check (bench/results/inverse_fid_check.json, one entry per
# ComfyUI engine) puts a single run: a broken projection, outer step or noise moves its PSNR and FID far outside.
FID_TASKS = {"super_resolution", "inpainting", "denoising"}


@pytest.fixture(scope="module")
def inverse_fid(pack):
    from comfyui_nested_diffusion.bench import inverse_fid

    return inverse_fid


def saved_json(name: str) -> dict:
    import json

    from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT

    return json.loads((REPO_ROOT / "bench" / "results" / name).read_text(encoding="utf-8"))


def test_saved_fid_figures_cover_every_task_boundary_and_target(inverse_fid):
    saved = saved_json("inverse_fid.json")
    assert saved["command"].startswith("scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid run")
    assert set(saved["tasks"]) == FID_TASKS
    assert saved["truth_floor"]["reference"] == 359  # the held-out split, all of it
    keys = {f"nested_{n}" for n in inverse_fid.boundaries()} | {"ksampler_final"} | {
        f"ksampler_x0_{n}" for n in inverse_fid.boundaries()[:-1]}
    for task, data in saved["tasks"].items():
        assert data["seeds"] and len(data["seeds"]) >= 3, task
        assert data["truths"] >= 200 and data["truths"] == saved["truth_floor"]["samples"], task
        assert set(data["fid"]) == keys, task
        for entry in list(data["fid"].values()) + list(data["ratios"].values()):
            low, high = entry["ci95"]
            assert low <= entry["value"] <= high, (task, entry)
        first = inverse_fid.boundaries()[0]
        ratio = data["fid"][f"nested_{first}"]["value"] / data["fid"][f"ksampler_x0_{first}"]["value"]
        assert ratio == pytest.approx(data["ratios"]["first_ratio"]["value"], rel=1e-3)
    lines = saved["verdicts"]
    assert lines == inverse_fid.verdicts(saved)  # the PASS/FAIL lines follow from the figures
    assert len(lines) == 2 * len(FID_TASKS) and all(line.startswith(("PASS ", "FAIL ")) for line in lines)


def test_bootstrap_ratios_see_a_worse_sampler(inverse_fid):
    """analyse_task on made-up features: a 'KSampler' whose features are shifted away from the reference gets the
    larger FID, the ratio below 1 with an interval that excludes 1; a copy of the reference scores near 0."""
    import numpy as np

    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 8))

    def run(seed):
        near = np.random.default_rng(seed).normal(size=(120, 8))
        far = near + 1.5
        images = {f"nested_{n}": near for n in inverse_fid.boundaries()}
        images.update({f"ksampler_x0_{n}": far for n in inverse_fid.boundaries()[:-1]})
        return {**images, "ksampler_final": far,
                "info": {"seed": seed, "factor": 4, "sigma_y": 0.0, "outer_step": "renoise", "nested_seconds": 1,
                         "ksampler_seconds": 1, "nested_psnr": [0.0] * 4, "ksampler_x0_psnr": [0.0] * 3,
                         "ksampler_final_psnr": 0.0}}

    data = inverse_fid.analyse_task([run(2), run(3)], reference, draws=40, rng=np.random.default_rng(0))
    for name in ("first_ratio", "final_ratio"):
        assert data["ratios"][name]["value"] < 0.5 and data["ratios"][name]["ci95"][1] < 1.0
    assert data["fid"]["nested_10"]["value"] < 0.5 < data["fid"]["ksampler_final"]["value"]


def test_saved_check_covers_both_engines():
    assert {"0.3.75", "0.33.0"} <= set(saved_json("inverse_fid_check.json")["engines"])


@pytest.fixture(scope="module")
def saved_check(inverse_fid):
    return saved_json("inverse_fid_check.json")["engines"][inverse_fid.comfy_version()]


@pytest.fixture(scope="module")
def check_scores(inverse_fid, saved_check):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, cond = inverse_fid.digits_model()
    scores = inverse_fid.check_scores(model, cond, seed=saved_check["seeds"][0], count=saved_check["truths"],
                                      task=saved_check["task"])
    torch.set_num_threads(threads)
    return scores


def test_saved_check_is_the_run_the_test_repeats(inverse_fid, saved_check):
    assert (saved_check["task"], saved_check["truths"]) == (inverse_fid.CHECK_TASK, inverse_fid.CHECK_TRUTHS)
    assert (saved_check["outer"], saved_check["inner"]) == (inverse_fid.OUTER, inverse_fid.INNER)
    assert len(saved_check["by_seed"]) >= 5 and "scripts/python.sh -m" in saved_check["command"]
    for key, (low, high) in saved_check["intervals"].items():
        assert low < sum(s[key] for s in saved_check["by_seed"]) / len(saved_check["by_seed"]) < high, key


@pytest.mark.parametrize("key", ["psnr_first", "psnr_final", "fid_first", "fid_final"])
def test_a_small_nested_inverse_run_scores_within_the_saved_interval(key, saved_check, check_scores):
    low, high = saved_check["intervals"][key]
    assert low <= check_scores[key] <= high, (key, check_scores, saved_check["intervals"])


def test_saved_vae_figures_cover_every_task_and_the_cost(pack):
    """bench/results/inverse_vae.json: every task on both kinds of truth, consistency through the VAE far better
    than without the patch, the cost measured at equal steps."""
    saved = saved_json("inverse_vae.json")
    assert saved["command"].startswith("scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_vae")
    assert set(saved["tasks"]) == {"super_resolution", "inpainting", "colorization", "denoising"}
    for task, data in saved["tasks"].items():
        for kind in ("block_flat", "smooth"):
            case = data[kind]
            assert len(case["per_seed"]) == len(saved["seeds"]) >= 3
            assert case["nested_worst_outer_step"] < case["ksampler_unpatched_best"], (task, kind)
    cost = saved["cost"]
    assert cost["median_ratio"] > 1.0 and cost["extra_seconds_per_call"] > 0
