"""Does KSampler get better (or at least no worse) with more steps on the learned digits models?

A model whose samples get worse from 40 to 100 steps of a deterministic solver has a flawed denoiser at low noise,
and comparisons of samplers on it measure the model. This bench samples ComfyUI's KSampler path (euler, CFG 1,
the digit as positive, ``normal`` scheduler for eps and v, ``simple`` for flow) at 40 and at 100 steps on the
same noise and labels, for several seeds, and scores both with the protocol of ``bench/digits_quality.py``
(its features, Frechet distance, real-vs-real floor and bootstrap, imported, not copied): FID against the
held-out digits no network saw, mean over seeds, a paired-bootstrap 95% interval (the same generated indices
for both step counts of a seed, the reference resampled too) of each FID, of the difference FID(100) - FID(40)
and of the ratio.

PASS (per model): FID at 100 steps <= FID at 40 steps within the interval, i.e. the lower end of the
difference's interval is <= 0 (more steps do not make the samples resolvably worse).

    # sample (one thread; one process per model, side by side; --work defaults to /tmp/digits_steps)
    scripts/python.sh -m comfyui_nested_diffusion.bench.digits_steps sample --variants eps --seeds 1,2,3 --samples 200
    # score, print PASS/FAIL per model, write the json (with the commands that sampled and scored it)
    scripts/python.sh -m comfyui_nested_diffusion.bench.digits_steps analyse --out bench/results/digits_steps.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from comfyui_nested_diffusion.bench import digits_quality as protocol

STEP_COUNTS = (40, 100)
SOLVER = "euler"
CFG = 1.0
VARIANTS = protocol.VARIANTS
SAMPLES = 200
BOOTSTRAP = 500
DEFAULT_WORK = Path("/tmp/digits_steps")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def command_line() -> str:
    return "scripts/python.sh -m comfyui_nested_diffusion.bench.digits_steps " + shlex.join(sys.argv[1:])


# ---------------------------------------------------------------------------------------------------- sampling
def ksampler_final(model, steps: int, scheduler: str, positive, negative, count: int, seed: int) -> torch.Tensor:
    """KSampler's path (``sample_custom`` with the scheduler's sigmas, ``steps`` euler steps): final pixels."""
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(count, 3, 16, 16)
    noise = comfy.sample.prepare_noise(latent, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    out = comfy.sample.sample_custom(model, noise, CFG, protocol.sampler_for(SOLVER), sigmas, positive, negative,
                                     latent, disable_pbar=True, seed=seed)
    return out.cpu()


def sample_variant(variant: str, seed: int, count: int, work: Path) -> Path:
    """The final images of KSampler at every step count of ``STEP_COUNTS`` on one seed's noise, saved to ``work``."""
    from comfyui_nested_diffusion.bench.fid import digit_conditioning, labels_for
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model, weights_path

    model = load_digits_model(variant)
    scheduler = protocol.scheduler_for(variant)
    labels = labels_for(count)
    positive, negative = digit_conditioning(labels)
    store: dict[str, np.ndarray] = {"labels": labels.numpy()}
    info = {"variant": variant, "solver": SOLVER, "scheduler": scheduler, "cfg": CFG, "seed": seed,
            "samples": count, "commit": protocol.git_commit(), "torch": torch.__version__,
            "weights_sha256": hashlib.sha256(weights_path(variant).read_bytes()).hexdigest()[:16],
            "command": command_line()}
    for steps in STEP_COUNTS:
        t0 = time.time()
        store[f"steps_{steps}"] = protocol.gray16(ksampler_final(model, steps, scheduler, positive, negative, count, seed))
        info[f"seconds_{steps}"] = round(time.time() - t0, 1)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{variant}_seed{seed}_n{count}.npz"
    np.savez_compressed(path, **store, info=json.dumps(info))
    log(f"{path.name}: {info}")
    return path


# ---------------------------------------------------------------------------------------------------- analysis
def load_runs(work: Path, count: int | None = None) -> dict[str, list[dict]]:
    """{variant: [run per seed]}: the metric's features of each step count's images, and the digit read in each.
    ``count``: only runs of that many samples; None: each model's largest sample count in ``work``."""
    from comfyui_nested_diffusion.demo_models.digits.metrics import features, predict

    paths = sorted(work.glob("*_seed*_n*.npz"))
    if count is None:
        largest: dict[str, int] = {}
        for path in paths:
            variant, size = path.stem.split("_seed")[0], int(path.stem.rsplit("_n", 1)[1])
            largest[variant] = max(largest.get(variant, 0), size)
        paths = [path for path in paths if int(path.stem.rsplit("_n", 1)[1]) == largest[path.stem.split("_seed")[0]]]
    else:
        paths = [path for path in paths if path.stem.endswith(f"_n{count}")]
    runs: dict[str, list[dict]] = {}
    for path in paths:
        with np.load(path) as handle:
            run = {"labels": handle["labels"], "info": json.loads(str(handle["info"]))}
            for steps in STEP_COUNTS:
                images = torch.from_numpy(handle[f"steps_{steps}"].astype(np.float32))[:, None]
                run[steps] = features(images).float().numpy()
                run[f"pred_{steps}"] = predict(images).numpy()
        runs.setdefault(run["info"]["variant"], []).append(run)
    return runs


def statistics(runs: list[dict], ref: np.ndarray, rows=None, ref_rows=None) -> dict:
    """FID (mean over seeds) and class accuracy of each step count, their difference and ratio. ``rows``: one
    index array per seed (shared by both step counts: they share noise and labels); ``ref_rows``: the reference's."""
    reference = ref if ref_rows is None else ref[ref_rows]
    out = {}
    for steps in STEP_COUNTS:
        fids, accs = [], []
        for index, run in enumerate(runs):
            pick = slice(None) if rows is None else rows[index]
            fids.append(protocol.fid_of(run[steps][pick], reference))
            accs.append(float((run[f"pred_{steps}"][pick] == run["labels"][pick]).mean()))
        out[f"fid_{steps}"], out[f"accuracy_{steps}"] = float(np.mean(fids)), float(np.mean(accs))
    low, high = STEP_COUNTS
    out["fid_difference"] = out[f"fid_{high}"] - out[f"fid_{low}"]
    out["fid_ratio"] = out[f"fid_{high}"] / out[f"fid_{low}"]
    return out


def analyse_variant(runs: list[dict], ref: np.ndarray, draws: int, rng) -> dict:
    point = statistics(runs, ref)
    samples = [statistics(runs, ref, [rng.integers(0, len(run["labels"]), len(run["labels"])) for run in runs],
                          rng.integers(0, ref.shape[0], ref.shape[0])) for _ in range(draws)]
    summary = {key: protocol.summarise(point[key], [draw[key] for draw in samples]) for key in point}
    low, high = STEP_COUNTS
    difference = summary["fid_difference"]
    return {
        "seeds": [run["info"]["seed"] for run in runs],
        "samples": int(runs[0]["labels"].shape[0]),
        "scheduler": runs[0]["info"]["scheduler"],
        "weights_sha256": sorted({run["info"]["weights_sha256"] for run in runs}),
        "fid_by_seed": {str(steps): [round(protocol.fid_of(run[steps], ref), 3) for run in runs] for steps in STEP_COUNTS},
        **summary,
        "pass": difference["ci95"][0] <= 0.0,
        "rule": f"FID at {high} steps <= FID at {low} steps within the interval: lower end of the 95% interval of "
                f"FID({high}) - FID({low}) <= 0",
        "commands": sorted({run["info"]["command"] for run in runs}),
        "commit": sorted({run["info"]["commit"] for run in runs}),
        "seconds": {str(steps): float(np.mean([run["info"][f"seconds_{steps}"] for run in runs])) for steps in STEP_COUNTS},
    }


def analyse(work: Path, count: int | None, draws: int, out: Path | None) -> dict:
    from comfyui_nested_diffusion.demo_models.digits.metrics import CLASSIFIER_PATH

    runs_by_model = load_runs(work, count)
    counts = sorted({int(runs[0]["labels"].shape[0]) for runs in runs_by_model.values()})
    ref = protocol.reference_and_floor(1)[0]
    result = {
        "command": command_line(),
        "protocol": {
            "sampler": f"KSampler path (sample_custom), {SOLVER}, CFG {CFG}, the digit as positive, 'any' as negative, "
                       f"{' and '.join(map(str, STEP_COUNTS))} steps on the same noise and labels",
            "schedulers": {variant: protocol.scheduler_for(variant) for variant in VARIANTS},
            "reference_set": "scikit-learn digits, held-out split (359), seen by no network",
            "floor": "as many real training-split digits as each generated set against the reference",
            "bootstrap": "paired: generated indices shared by both step counts of a seed, reference resampled too; "
                         "percentile 95% interval of the mean over seeds, re-centred on the estimate",
        },
        "classifier_sha256": hashlib.sha256(CLASSIFIER_PATH.read_bytes()).hexdigest()[:16],
        # the real-vs-real floor at each sample count the models were measured with (FID's small-set bias)
        "floor": {str(size): protocol.floor_summary(ref, protocol.reference_and_floor(size)[1], draws,
                                                    np.random.default_rng(0)) for size in counts},
        "models": {},
    }
    for variant, runs in sorted(runs_by_model.items()):
        log(f"analysing {variant} ({len(runs)} seeds)")
        rng = np.random.default_rng(protocol.derived_seed("steps", variant) % 2**32)
        result["models"][variant] = analyse_variant(runs, ref, draws, rng)
    if out:
        out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def ci(entry: dict, digits: int = 2) -> str:
    return f"{entry['value']:.{digits}f} [{entry['ci95'][0]:.{digits}f}, {entry['ci95'][1]:.{digits}f}]"


def print_report(result: dict) -> int:
    low, high = STEP_COUNTS
    for floor in result["floor"].values():
        print(f"real-vs-real floor: FID {ci(floor['fid'])} ({floor['samples']} real training digits vs "
              f"{floor['reference']} held-out)")
    failed = 0
    for variant, model in result["models"].items():
        failed += not model["pass"]
        print(f"{'PASS' if model['pass'] else 'FAIL'}  {variant} ({model['scheduler']}, {len(model['seeds'])} seeds x "
              f"{model['samples']}): FID {low} steps {ci(model[f'fid_{low}'])}, {high} steps {ci(model[f'fid_{high}'])}, "
              f"difference {ci(model['fid_difference'])}, ratio {ci(model['fid_ratio'], 3)}; accuracy "
              f"{model[f'accuracy_{low}']['value']:.3f} -> {model[f'accuracy_{high}']['value']:.3f}")
    return int(failed > 0)


def markdown(result: dict) -> list[str]:
    low, high = STEP_COUNTS
    lines = [f"| model (scheduler) | seeds x samples | FID, {low} steps | FID, {high} steps | {high} - {low} | "
             f"ratio | accuracy {low} / {high} | {high} <= {low} |", "|---|---|---|---|---|---|---|---|"]
    for variant, model in result["models"].items():
        lines.append(f"| {variant} ({model['scheduler']}) | {len(model['seeds'])} x {model['samples']} | "
                     f"{ci(model[f'fid_{low}'], 1)} | {ci(model[f'fid_{high}'], 1)} | {ci(model['fid_difference'], 1)} | "
                     f"{ci(model['fid_ratio'], 2)} | {model[f'accuracy_{low}']['value']:.3f} / "
                     f"{model[f'accuracy_{high}']['value']:.3f} | {'PASS' if model['pass'] else 'FAIL'} |")
    for floor in result["floor"].values():
        lines.append(f"| real-vs-real floor | {floor['samples']} | {ci(floor['fid'], 1)} | | | | | |")
    return lines


# ---------------------------------------------------------------------------------------------------- the CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    sample = sub.add_parser("sample", help="sample KSampler at 40 and 100 steps, keep the images")
    sample.add_argument("--variants", default=",".join(VARIANTS))
    sample.add_argument("--seeds", default="1,2,3")
    sample.add_argument("--samples", type=int, default=SAMPLES)
    sample.add_argument("--work", type=Path, default=DEFAULT_WORK)
    report = sub.add_parser("analyse", help="FID with intervals, PASS/FAIL per model, json")
    report.add_argument("--work", type=Path, default=DEFAULT_WORK)
    report.add_argument("--samples", type=int, default=None,
                        help="only runs of this many samples (default: each model's largest count in --work)")
    report.add_argument("--draws", type=int, default=BOOTSTRAP)
    report.add_argument("--out", type=Path)
    table = sub.add_parser("markdown", help="print the docs' table from a saved json")
    table.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.what == "markdown":
        print("\n".join(markdown(json.loads(args.results.read_text()))))
        return 0
    torch.set_num_threads(1)
    if args.what == "sample":
        import logging

        from comfyui_nested_diffusion.tools.comfy_env import import_comfy, import_pack

        import_comfy(force_cpu=True)
        import_pack()
        logging.getLogger().setLevel(logging.WARNING)
        for seed in [int(s) for s in args.seeds.split(",")]:
            for variant in args.variants.split(","):
                sample_variant(variant, seed, args.samples, args.work)
        return 0
    result = analyse(args.work, args.samples, args.draws, args.out)
    if args.out:
        log(f"wrote {args.out}")
    return print_report(result)


if __name__ == "__main__":
    sys.exit(main())
