"""The fid part's targets and report (bench/fid.py): grouped per model and CFG, hand-set comparison runs left out,
and the saved 1000-sample result (bench/results/fid_1000.json) reported as docs/results.md states it."""
import json

from comfyui_nested_diffusion.bench import fid as bench
from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT


def run(cfg, boundaries, x0, final, ks_final, accuracy=0.9, ks_accuracy=0.9, auto=True, outer_step="renoise"):
    return {"variant": "eps", "cfg": cfg, "solver": "euler", "budget": 40, "outer": len(boundaries),
            "inner": 40 // len(boundaries), "outer_step": outer_step, "auto": auto, "fid_final": final,
            "accuracy": accuracy, "fid_boundaries": boundaries,
            "ksampler": {"fid_final": ks_final, "accuracy": ks_accuracy, "fid_x0": x0}}


def verdicts(results) -> dict:
    return {name: ok for name, ok, _ in bench.fid_checks(results)}


def test_targets_are_checked_per_model_and_cfg_without_the_hand_set_runs():
    good = run(1.0, {10: 10.0, 20: 5.0}, {10: 40.0, 20: 6.0}, final=5.0, ks_final=5.0)
    behind = run(2.0, {10: 30.0, 20: 9.0}, {10: 40.0, 20: 6.0}, final=9.0, ks_final=6.0, accuracy=0.8)
    hand_set = run(1.0, {10: 50.0, 20: 50.0}, {10: 40.0, 20: 6.0}, final=50.0, ks_final=5.0, auto=False,
                   outer_step="ddim")
    got = verdicts({"samples": 10, "variants": {"eps": {"runs": [good, behind, hand_set]}}})
    assert got == {
        "fid [eps, CFG 1]: nested at the first boundary <= 1/3 of KSampler x0's": True,
        "fid [eps, CFG 1]: nested <= KSampler x0 at every boundary": True,
        "fid [eps, CFG 1]: final FID <= 1.10x KSampler's": True,
        "fid [eps, CFG 1]: class accuracy >= KSampler's - 2 points": True,
        "fid [eps, CFG 2]: nested at the first boundary <= 1/3 of KSampler x0's": False,
        "fid [eps, CFG 2]: nested <= KSampler x0 at every boundary": False,
        "fid [eps, CFG 2]: final FID <= 1.10x KSampler's": False,
        "fid [eps, CFG 2]: class accuracy >= KSampler's - 2 points": False,
    }


def test_passes_are_also_counted_per_inner_solver():
    good = run(1.0, {10: 10.0, 20: 5.0}, {10: 40.0, 20: 6.0}, final=5.0, ks_final=5.0)
    behind = {**run(1.0, {10: 30.0, 20: 9.0}, {10: 40.0, 20: 6.0}, final=9.0, ks_final=6.0), "solver": "dpmpp_2m"}
    results = {"samples": 10, "variants": {"eps": {"runs": [good, behind]}}}
    assert sum(verdicts(results).values()) == 1  # the worst run over both solvers: only the accuracy target
    assert bench.passes_by_solver(results) == {"euler": (4, 4), "dpmpp_2m": (1, 4)}


def test_first_boundary_detail_counts_runs_where_ksampler_final_is_above_a_third_of_its_x0():
    early = run(1.0, {10: 10.0, 20: 5.0}, {10: 40.0, 20: 6.0}, final=5.0, ks_final=5.0)  # floor 5/40: reachable
    late = run(1.0, {20: 5.0, 40: 4.0}, {20: 6.0, 40: 4.5}, final=4.0, ks_final=4.5)  # floor 4.5/6: not without beating it
    assert bench.first_boundary_floor(early) == 5.0 / 40.0 and bench.first_boundary_floor(late) == 4.5 / 6.0
    checks = bench.fid_checks({"samples": 10, "variants": {"eps": {"runs": [early, late]}}})
    name, ok, detail = checks[0]
    assert name == "fid [eps, CFG 1]: nested at the first boundary <= 1/3 of KSampler x0's" and ok is False
    assert detail.startswith("worst ratio 0.833 over 2 runs; in 1 of them KSampler's own final FID is above 1/3")


def test_saved_1000_sample_result_reports_what_the_docs_say(capsys):
    path = REPO_ROOT / "bench" / "results" / "fid_1000.json"
    saved = json.loads(path.read_text())
    assert saved["samples"] == 1000
    got = verdicts(saved)
    assert sum(got.values()) == 6 and len(got) == 16  # "6 of 16 PASS" in docs/results.md and the README
    assert got["fid [eps, CFG 1]: final FID <= 1.10x KSampler's"] is True
    assert got["fid [eps, CFG 2]: final FID <= 1.10x KSampler's"] is False  # 10 x 10 of 100 NFEs: 1.23x (session 6)
    assert got["fid [flow, CFG 1]: final FID <= 1.10x KSampler's"] is False  # euler, re-noised: 1.58x, 1.84x
    assert bench.report(str(path)) == 1  # a target fails: exit status 1
    printed = capsys.readouterr().out
    assert "| flow | 1 | euler | 40 | 4x10 | renoise | 10: 6.1/18.2," in printed
    assert "| eps | 1 | euler | 100 | 10x10 | renoise | 10: 42.7/160.9," in printed  # session 5's deterministic runs
    assert "| flow | 1 | euler | 100 | 10x10 | renoise | 10: 6.1/66.4," in printed
    assert "| flow | 2 | euler | 40 | 4x10 | trajectory | 10: 74.6/77.7, 20: 74.7/63.2," in printed  # session 6, by hand
    assert "| eps | 2 | euler_ancestral | 100 | 10x10 | renoise | 10: 73.6/151.5," in printed
    assert "| flow | 1 | dpmpp_2m | 40 | 4x10 | renoise | 10: 4.4/17.1, 20: 3.9/4.8, 30: 4.4/4.2," in printed  # session 7
    assert "| flow | 1 | dpmpp_2m | 40 | 2x20 | renoise | 20: 4.2/4.8, 40: 4.0/4.2 |" in printed
    assert "| flow | 2 | euler_ancestral | 100 | 10x10 | ddim | 10: 51.4/183.8," in printed  # session 7
    assert "| eps | 2 | euler_ancestral | 100 | 10x10 | ddim, outer_eta 0.5 | 10: 73.6/151.5," in printed  # by hand
    assert "| eps | 2 | euler_ancestral | 100 | 10x10 | ddim, outer_eta 0.75 | 10: 73.6/151.5, 20: 55.9/67.5," in printed
    assert "| 52.89 / 51.73 | 0.943 / 0.935 |" in printed  # session 8, by hand: meets the final and accuracy targets
    # session 9, by hand: the paper's step with outer_eta 1 after euler_ancestral on the flow model, CFG 1
    assert "| flow | 1 | euler_ancestral | 40 | 4x10 | ddim, outer_eta 1 | 10: 5.7/20.5, 20: 4.5/5.6, 30: 4.3/4.9," in printed
    assert "| 4.27 / 4.86 | 0.956 / 0.973 |" in printed  # meets all four targets for that run (auto: 0.919 accuracy)
    assert "| flow | 2 | euler_ancestral | 40 | 4x10 | ddim, outer_eta 1 | 10: 51.4/74.9," in printed
    # session 10, by hand: the same with CFG 2 at 100 NFEs (worse final images than eta 0's 0.74x and 0.72x)
    assert "| flow | 2 | euler_ancestral | 100 | 4x25 | ddim, outer_eta 1 | 25: 50.2/77.2," in printed
    assert "| 40.84 / 51.82 | 0.996 / 0.999 |" in printed and "| 41.94 / 51.82 | 1.000 / 0.999 |" in printed
    # session 11, by hand: the paper's step and the trajectory after euler with CFG 2 on the eps model (neither passes
    # NFE 20, where KSampler's guided x0 scores 49.2)
    assert "| eps | 2 | euler | 40 | 4x10 | ddim | 10: 58.5/77.2, 20: 62.6/49.2, 30: 69.1/55.2, 40: 74.3/60.3 |" in printed
    assert "| eps | 2 | euler | 40 | 4x10 | trajectory | 10: 58.5/77.2, 20: 58.8/49.2, 30: 59.2/55.2," in printed
    assert printed.count("PASS  ") == 6 and printed.count("FAIL  ") == 10
    assert "CFG 2]: nested at the first boundary <= 1/3 of KSampler x0's: worst ratio 1.290 over 8 runs; in 8 of them" in printed
    assert "| eps | 2 | euler | 100 | 10x10 | renoise | 10: 58.5/108.1, 20: 63.2/83.9," in printed  # session 8
    assert "| flow | 2 | euler | 100 | 10x10 | renoise | 10: 74.6/188.6," in printed
    assert "with euler's runs alone: 8 of 16 targets pass" in printed  # the per-solver counts in docs/results.md
    assert "with euler_ancestral's runs alone: 9 of 16 targets pass" in printed
    assert "with dpmpp_2m's runs alone: 8 of 16 targets pass" in printed
