"""FID of the inverse-problem solutions at every outer boundary, with the evidence protocol of digits_quality.py.

The learned digits UNet (eps) with the Inverse Problem node's patch solves super-resolution x4 (16x16 from 4x4),
inpainting (right half unknown) and denoising (sigma_y 0.1), as bench/inverse.py does; per task and sampling seed:
NestedKSampler's code path 4 x 10 (euler_ancestral, scheduler normal, outer_step auto), its anytime image after
every outer step, and KSampler's path with 40 steps of the same solver on the same patched model and noise: its x0
prediction after 10, 20, 30 model calls and its final image.

Which images are which (three disjoint roles, none seen twice):
* ground truths being degraded: a fixed random pick of scikit-learn digits' ``train`` split, the set the diffusion
  model was trained on (the same pick digits_quality.py uses for its real-vs-real floor);
* FID reference: the ``heldout`` split (359 digits), seen by no network and by no sampler (not measured);
* feature network: trained on MNIST digits (demo_models/digits/metrics.py).
So the reference stays unseen by the generator; the FID of the truths themselves against the reference is the
floor a perfect reconstruction would score. The bias that remains: the generator was trained on the truths, so it
may reconstruct them better than it would new digits (both samplers alike, since they share model, truths and
noise; it flatters absolute FIDs, not the comparison).

FID and paired-bootstrap 95% intervals as digits_quality.py computes them (its ``fid_of``, ``fids_at``,
``mean_over``, ``summarise``, ``floor_summary``): each draw resamples the reference and the truths (the same truth
indices for every sampler and seed: they are paired by the truth), FIDs averaged over the seeds.

    # sample (restartable: finished task-seed files in --work are kept) and analyse; about 20 single-thread CPU
    # minutes (80 model calls per truth, task and seed at ~8 ms per image and call)
    OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid run --truths 200 --out bench/results/inverse_fid.json
    # the small check the tests re-run (64 truths, super-resolution, 6 seeds), once per ComfyUI engine
    OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid check --out bench/results/inverse_fid_check.json
    NESTED_ENGINE=0.33.0 OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid check --out bench/results/inverse_fid_check.json
    scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid markdown bench/results/inverse_fid.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

OUTER, INNER = 4, 10
SEEDS = (0, 1, 2)
TRUTHS = 200  # the saved run's; 359 (the reference's size) did not fit the shared CPU's budget
BOOTSTRAP = 500
FINAL_RATIO, FINAL_UPPER = 1.10, 1.25
DEFAULT_WORK = Path("/tmp/inverse_fid")
CHECK_TASK, CHECK_TRUTHS, CHECK_SEEDS = "super_resolution", 64, tuple(range(6))


def command_line() -> str:
    import os

    engine = f"NESTED_ENGINE={os.environ['NESTED_ENGINE']} " if os.environ.get("NESTED_ENGINE") else ""
    return engine + "scripts/python.sh -m comfyui_nested_diffusion.bench.inverse_fid " + shlex.join(sys.argv[1:])


def boundaries() -> list[int]:
    return [INNER * (k + 1) for k in range(OUTER)]


def truth_pick(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [count, 3, 16, 16] in [-1, 1], labels): training-split digits in digits_quality's floor order."""
    from comfyui_nested_diffusion.demo_models.digits.data import load_digits

    images, labels = load_digits("train")
    pick = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))[:count]
    return images[pick], labels[pick]


def digits_model():
    from comfyui_nested_diffusion.demo_models.digits.data import ANY, digit_context
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    return load_digits_model("eps"), [[digit_context([ANY]), {}]]


def sample_task(model, cond, truth: torch.Tensor, task: str, seed: int) -> dict:
    """The images (grey, float16) at every boundary of nested and KSampler for one task and seed, and their PSNR."""
    from comfyui_nested_diffusion.bench import inverse
    from comfyui_nested_diffusion.bench.digits_quality import gray16

    factor, sigma_y = inverse.TASKS["digits"][task]
    patched, latent, operator, y = inverse.setup_task(model, truth, task, factor, sigma_y)
    started = time.perf_counter()
    _, previews, mode = inverse.nested_run(patched, cond, latent, seed, OUTER, INNER)
    nested_seconds = time.perf_counter() - started
    started = time.perf_counter()
    final_k, x0 = inverse.ksampler_run(patched, cond, latent, seed, OUTER * INNER, boundaries())
    ksampler_seconds = time.perf_counter() - started
    store = {f"nested_{n}": gray16(previews[k]) for k, n in enumerate(boundaries())}
    store.update({f"ksampler_x0_{n}": gray16(x0[n]) for n in boundaries()[:-1]})
    store["ksampler_final"] = gray16(final_k)
    info = {"task": task, "factor": factor, "sigma_y": sigma_y, "seed": seed, "truths": int(truth.shape[0]),
            "outer_step": mode, "nested_seconds": round(nested_seconds, 1),
            "ksampler_seconds": round(ksampler_seconds, 1),
            "nested_psnr": [inverse.psnr(p, truth) for p in previews],
            "ksampler_x0_psnr": [inverse.psnr(x0[n], truth) for n in boundaries()[:-1]],
            "ksampler_final_psnr": inverse.psnr(final_k, truth)}
    return {"images": store, "info": info}


def sample(work: Path, count: int, tasks, seeds) -> None:
    from comfyui_nested_diffusion.bench import digits_quality

    model, cond = digits_model()
    truth, _ = truth_pick(count)
    work.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        for seed in seeds:
            path = work / f"{task}_seed{seed}_n{count}.npz"
            if path.exists():
                continue
            run = sample_task(model, cond, truth, task, seed)
            info = {**run["info"], "command": command_line(), "commit": digits_quality.git_commit()}
            np.savez_compressed(path, **run["images"], info=json.dumps(info))
            digits_quality.log(f"{path.name}: {info}")


def load_features(work: Path, count: int) -> dict:
    """{task: [run per seed]}, each run {key: the metric's features} plus ``info``."""
    from comfyui_nested_diffusion.demo_models.digits.metrics import features

    runs: dict = {}
    for path in sorted(work.glob(f"*_n{count}.npz")):
        with np.load(path) as handle:
            run = {"info": json.loads(str(handle["info"]))}
            for key in handle.files:
                if key != "info":
                    run[key] = features(torch.from_numpy(handle[key].astype(np.float32))[:, None]).float().numpy()
        runs.setdefault(run["info"]["task"], []).append(run)
    return runs


def ratios(fids: dict) -> dict:
    first = boundaries()[0]
    return {"first_ratio": fids[f"nested_{first}"] / fids[f"ksampler_x0_{first}"],
            "final_ratio": fids[f"nested_{boundaries()[-1]}"] / fids["ksampler_final"]}


def analyse_task(runs: list[dict], ref: np.ndarray, draws: int, rng) -> dict:
    """Mean FID over seeds per key, the ratios, and paired-bootstrap intervals (truths shared by all runs)."""
    from comfyui_nested_diffusion.bench.digits_quality import fids_at, mean_over, summarise

    point = mean_over([fids_at(run, ref) for run in runs])
    count = runs[0]["ksampler_final"].shape[0]
    fid_draws, ratio_draws = [], []
    for _ in range(draws):
        jr, ir = rng.integers(0, ref.shape[0], ref.shape[0]), rng.integers(0, count, count)
        fids = mean_over([fids_at(run, ref, ir, jr) for run in runs])
        fid_draws.append(fids)
        ratio_draws.append(ratios(fids))
    point_ratios = ratios(point)
    info = [run["info"] for run in runs]
    psnr = {"nested": [float(np.mean([i["nested_psnr"][k] for i in info])) for k in range(OUTER)],
            "ksampler_x0": [float(np.mean([i["ksampler_x0_psnr"][k] for i in info])) for k in range(OUTER - 1)],
            "ksampler_final": float(np.mean([i["ksampler_final_psnr"] for i in info]))}
    return {
        "seeds": [i["seed"] for i in info], "truths": count, "factor": info[0]["factor"],
        "sigma_y": info[0]["sigma_y"], "outer_step": sorted({i["outer_step"] for i in info}),
        "fid": {key: summarise(point[key], [d[key] for d in fid_draws]) for key in sorted(point)},
        "ratios": {key: summarise(point_ratios[key], [d[key] for d in ratio_draws]) for key in point_ratios},
        "psnr_mean_over_seeds": psnr,
        "seconds": {"nested": sum(i["nested_seconds"] for i in info), "ksampler": sum(i["ksampler_seconds"] for i in info)},
        "commands": sorted({i.get("command", "") for i in info} - {""}),
        "commits": sorted({i.get("commit", "") for i in info} - {""}),
    }


def verdicts(result: dict) -> list[str]:
    lines = []
    first, last = boundaries()[0], boundaries()[-1]
    for task, data in result["tasks"].items():
        fid, ratio = data["fid"], data["ratios"]

        def show(entry, digits=2):
            return f"{entry['value']:.{digits}f} [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]"

        where = f"digits {task} {OUTER}x{INNER}"
        ok = fid[f"nested_{first}"]["value"] <= fid[f"ksampler_x0_{first}"]["value"]
        lines.append(f"{'PASS' if ok else 'FAIL'} first boundary FID <= KSampler x0's: {where}: nested "
                     f"{show(fid[f'nested_{first}'])} vs KSampler x0 {show(fid[f'ksampler_x0_{first}'])} at NFE "
                     f"{first} (ratio {show(ratio['first_ratio'], 3)})")
        final = ratio["final_ratio"]
        ok = final["value"] <= FINAL_RATIO and final["ci95"][1] <= FINAL_UPPER
        lines.append(f"{'PASS' if ok else 'FAIL'} final FID <= {FINAL_RATIO:.2f}x KSampler's (upper <= "
                     f"{FINAL_UPPER:.2f}): {where}: nested {show(fid[f'nested_{last}'])} vs KSampler "
                     f"{show(fid['ksampler_final'])} at NFE {last}, ratio {show(final, 3)}")
    return lines


def analyse(work: Path, count: int, draws: int, out: Path | None) -> dict:
    from comfyui_nested_diffusion.bench import digits_quality
    from comfyui_nested_diffusion.demo_models.digits import data
    from comfyui_nested_diffusion.demo_models.digits.metrics import features

    rng = np.random.default_rng(0)
    reference = features(data.load_digits("heldout")[0]).float().numpy()
    truth = features(truth_pick(count)[0]).float().numpy()
    result = {
        "command": command_line(), "split": f"{OUTER}x{INNER}", "sampler": "euler_ancestral", "scheduler": "normal",
        "outer_step": "auto", "model": "digits UNet (eps)", "bootstrap_draws": draws,
        "protocol": {
            "truths": f"{count} digits of the training split (the diffusion model's training set), a fixed random "
                      "pick (digits_quality.py's floor pick)",
            "reference": "scikit-learn digits, held-out split (359), seen by no network",
            "feature_network": "trained on MNIST digits (demo_models/digits/metrics.py)",
            "bootstrap": "paired: reference and truths resampled together, the same truth indices for every sampler "
                         "and seed; percentile 95% interval of the mean over seeds, re-centred on the estimate",
            "remaining_bias": "the generator was trained on the truths: it may reconstruct them better than new "
                              "digits (both samplers alike)",
        },
        "truth_floor": digits_quality.floor_summary(reference, truth, draws, rng),
        "tasks": {},
    }
    for task, runs in load_features(work, count).items():
        digits_quality.log(f"analysing {task} ({len(runs)} seeds)")
        result["tasks"][task] = analyse_task(runs, reference, draws,
                                             np.random.default_rng(digits_quality.derived_seed("inverse", task) % 2 ** 32))
    result["verdicts"] = verdicts(result)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def markdown(result: dict) -> list[str]:
    def ci(entry, digits=1):
        return f"{entry['value']:.{digits}f} [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]"

    floor = result["truth_floor"]["fid"]
    lines = [f"The truths themselves against the reference (a perfect reconstruction): FID {ci(floor)}.", "",
             "| task | sampler | " + " | ".join(f"NFE {n}" for n in boundaries()) + " | first ratio | final ratio |",
             "|---|---|" + "---|" * (OUTER + 2)]
    for task, data in result["tasks"].items():
        fid, ratio = data["fid"], data["ratios"]
        name = task.replace("_", " ") + (f" x{data['factor']}" if data["factor"] > 1 else "") + \
            (f", sigma_y {data['sigma_y']:g}" if data["sigma_y"] else "")
        lines.append(f"| {name} | nested | " + " | ".join(ci(fid[f"nested_{n}"]) for n in boundaries()) +
                     f" | {ci(ratio['first_ratio'], 2)} | {ci(ratio['final_ratio'], 2)} |")
        lines.append(f"| {name} | KSampler x0 | " + " | ".join(
            ci(fid[f"ksampler_x0_{n}"]) for n in boundaries()[:-1]) + f" | {ci(fid['ksampler_final'])} (final) | | |")
    return lines


def check_scores(model, cond, seed: int, count: int = CHECK_TRUTHS, task: str = CHECK_TASK) -> dict:
    """FID and PSNR of one small nested run (its final and first anytime images): the saved check's quantities."""
    from comfyui_nested_diffusion.bench import inverse
    from comfyui_nested_diffusion.demo_models.digits import data
    from comfyui_nested_diffusion.demo_models.digits.metrics import fid

    truth, _ = truth_pick(count)
    factor, sigma_y = inverse.TASKS["digits"][task]
    patched, latent, _, _ = inverse.setup_task(model, truth, task, factor, sigma_y)
    _, previews, _ = inverse.nested_run(patched, cond, latent, seed, OUTER, INNER)
    reference = data.load_digits("heldout")[0]
    return {"fid_first": fid(previews[0], reference), "fid_final": fid(previews[-1], reference),
            "psnr_first": inverse.psnr(previews[0], truth), "psnr_final": inverse.psnr(previews[-1], truth)}


def comfy_version() -> str:
    import comfyui_version

    return comfyui_version.__version__


def check(out: Path | None) -> dict:
    """The check on this ComfyUI, saved under its version in ``out`` (the other engines' entries are kept: their
    samplers differ enough to move the first image's PSNR by about a dB)."""
    model, cond = digits_model()
    scores = [check_scores(model, cond, seed) for seed in CHECK_SEEDS]
    result = {"command": command_line(), "task": CHECK_TASK, "truths": CHECK_TRUTHS, "outer": OUTER, "inner": INNER,
              "seeds": list(CHECK_SEEDS), "by_seed": scores,
              "note": "a single run's score lies within mean +- 4 sd of the seeds' spread", "intervals": {}}
    for key in scores[0]:
        values = np.array([s[key] for s in scores])
        result["intervals"][key] = [round(float(values.mean() - 4 * values.std(ddof=1)), 4),
                                    round(float(values.mean() + 4 * values.std(ddof=1)), 4)]
    if out:
        saved = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
        engines = saved.get("engines", {})
        engines[comfy_version()] = result
        out.write_text(json.dumps({"engines": engines}, indent=1) + "\n", encoding="utf-8")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run", help="sample what is missing in --work, then analyse")
    report = sub.add_parser("analyse", help="analyse what was sampled")
    for command in (run, report):
        command.add_argument("--work", type=Path, default=DEFAULT_WORK)
        command.add_argument("--truths", type=int, default=TRUTHS)
        command.add_argument("--draws", type=int, default=BOOTSTRAP)
        command.add_argument("--out", type=Path)
    run.add_argument("--tasks", default="super_resolution,inpainting,denoising")
    run.add_argument("--seeds", default=",".join(str(s) for s in SEEDS))
    small = sub.add_parser("check", help="the small check the tests re-run")
    small.add_argument("--out", type=Path)
    table = sub.add_parser("markdown", help="the docs' table from a saved json")
    table.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.what == "markdown":
        print("\n".join(markdown(json.loads(args.results.read_text()))))
        return 0
    import logging

    from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

    import_comfy(force_cpu=True)
    import_pack()
    logging.getLogger().setLevel(logging.WARNING)
    torch.set_num_threads(1)
    if args.what == "check":
        print(json.dumps(check(args.out), indent=1))
        return 0
    if args.what == "run":
        sample(args.work, args.truths, args.tasks.split(","), [int(s) for s in args.seeds.split(",")])
    result = analyse(args.work, args.truths, args.draws, args.out)
    print("\n".join(markdown(result)))
    print("\n".join(result["verdicts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
