"""The fid part's targets (bench/fid.py): T1-T4 per model and CFG on one seed's point estimates, hand-set
comparison runs left out."""
from comfyui_nested_diffusion.bench import fid as bench


def run(cfg, boundaries, x0, final, ks_final, accuracy=0.9, ks_accuracy=0.9, auto=True, outer_step="renoise"):
    return {"variant": "eps", "cfg": cfg, "solver": "euler", "budget": 40, "outer": len(boundaries),
            "inner": 40 // len(boundaries), "outer_step": outer_step, "auto": auto, "fid_final": final,
            "accuracy": accuracy, "fid_boundaries": boundaries,
            "ksampler": {"fid_final": ks_final, "accuracy": ks_accuracy, "fid_x0": x0}}


def verdicts(results) -> dict:
    return {name.split(": ", 1)[1].split(" ", 1)[0] + " " + name.split("]")[0].split(", ")[1]: ok
            for name, ok, _ in bench.fid_checks(results)}


def test_targets_are_checked_per_model_and_cfg_without_the_hand_set_runs():
    good = run(1.0, {10: 10.0, 20: 5.0}, {10: 40.0, 20: 6.0}, final=5.0, ks_final=5.0)
    behind = run(2.0, {10: 30.0, 20: 33.0}, {10: 40.0, 20: 6.0}, final=33.0, ks_final=6.0, accuracy=0.8)
    hand_set = run(1.0, {10: 50.0, 20: 60.0}, {10: 40.0, 20: 6.0}, final=60.0, ks_final=5.0, auto=False,
                   outer_step="ddim")
    got = verdicts({"samples": 10, "variants": {"eps": {"runs": [good, behind, hand_set]}}})
    assert got == {"T1 CFG 1": True, "T2 CFG 1": True, "T3 CFG 1": True, "T4 CFG 1": True,
                   "T1 CFG 2": False, "T2 CFG 2": False, "T3 CFG 2": False, "T4 CFG 2": False}


def test_first_image_target_is_half_of_ksamplers_gap():
    # KSampler: x0 40 at the first boundary, final 10: the gap is 30, half of it closed means <= 25
    at_half = run(1.0, {10: 25.0, 20: 10.0}, {10: 40.0, 20: 12.0}, final=10.0, ks_final=10.0)
    short = run(1.0, {10: 25.5, 20: 10.0}, {10: 40.0, 20: 12.0}, final=10.0, ks_final=10.0)
    assert verdicts({"samples": 10, "variants": {"eps": {"runs": [at_half]}}})["T1 CFG 1"] is True
    checks = bench.fid_checks({"samples": 10, "variants": {"eps": {"runs": [short]}}})
    assert checks[0][1] is False and checks[0][2].startswith("smallest fraction closed 0.483")


def test_a_later_image_worse_than_1_05x_the_previous_fails_never_worse():
    drifting = run(1.0, {10: 10.0, 20: 10.4, 30: 11.0}, {10: 40.0, 20: 12.0, 30: 11.0}, final=11.0, ks_final=11.0)
    got = verdicts({"samples": 10, "variants": {"eps": {"runs": [drifting]}}})
    assert got["T2 CFG 1"] is False and got["T3 CFG 1"] is True  # 11.0 / 10.4 = 1.058


def test_passes_are_also_counted_per_inner_solver():
    good = run(1.0, {10: 10.0, 20: 5.0}, {10: 40.0, 20: 6.0}, final=5.0, ks_final=5.0)
    behind = {**run(1.0, {10: 30.0, 20: 9.0}, {10: 40.0, 20: 6.0}, final=9.0, ks_final=6.0), "solver": "dpmpp_2m"}
    results = {"samples": 10, "variants": {"eps": {"runs": [good, behind]}}}
    assert sum(verdicts(results).values()) == 2  # the worst run over both solvers: T2 and T4 still hold
    assert bench.passes_by_solver(results) == {"euler": (4, 4), "dpmpp_2m": (2, 4)}
