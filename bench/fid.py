"""Part 5: the paper's Figures 3 and 4 on the learned digits models (eps and rectified flow), one seed.

For every variant, CFG (1: the model's own conditional distribution; 2), inner solver (stochastic: the paper's
euler_ancestral with eta 0.85, deterministic: euler) and total budget N (40 and 100 NFEs), ``SAMPLES``
class-conditional samples (digits 0-9 in turn, guided against "any") are drawn by KSampler with N steps (its x0
prediction kept after every step) and by NestedKSampler with several outer x inner splits of N (``outer_step``
auto: what it picks is in each run's ``outer_step``). The FID-like score (``demo_models.digits.metrics``) of the
nested anytime image at every outer boundary is compared with KSampler's x0 at the same NFEs; the final images' FID
and class accuracy with KSampler's final images. ``FidSettings`` (``scripts/bench.sh --parts fid --fid-cfg 1
--fid-budgets 40 ...``) runs a subset. One seed and point estimates: a quick look. The figures that decide
settings come from ``bench/digits_quality.py`` (seeds, paired-bootstrap intervals, the real-vs-real floor).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

SAMPLES = 1000
QUICK_SAMPLES = 100
CFGS = (1.0, 2.0)  # without guidance (the model's own distribution) and with (class accuracy means more)
SEED = 3
BUDGETS = {40: [(4, 10), (2, 20)], 100: [(4, 25), (10, 10)]}
QUICK_BUDGETS = {40: [(4, 10)]}
SOLVERS = ("euler_ancestral", "euler")  # stochastic (the paper's inner DDIM eta 0.85), deterministic
VARIANTS = ("eps", "flow")


@dataclass(frozen=True)
class FidSettings:
    """What the fid part runs: every variant x CFG x solver x budget, KSampler with N steps and each split of N."""
    samples: int = SAMPLES
    cfgs: tuple = CFGS
    budgets: dict = field(default_factory=lambda: dict(BUDGETS))
    solvers: tuple = SOLVERS
    variants: tuple = VARIANTS
    seed: int = SEED

    @classmethod
    def quick(cls) -> "FidSettings":
        return cls(samples=QUICK_SAMPLES, budgets=dict(QUICK_BUDGETS))


def labels_for(count: int) -> torch.Tensor:
    return torch.arange(count) % 10


def digit_conditioning(labels: torch.Tensor) -> tuple[list, list]:
    """(positive: one digit per batch item, negative: "any") as ComfyUI CONDITIONING."""
    from comfyui_nested_diffusion.demo_models.digits.data import ANY, digit_context

    return [[digit_context(labels), {}]], [[digit_context([ANY] * len(labels)), {}]]


def empty_latent(count: int) -> dict:
    from comfyui_nested_diffusion.demo_models.digits.data import IMAGE_SIZE

    return {"samples": torch.zeros(count, 3, IMAGE_SIZE, IMAGE_SIZE)}


def inner_spec(solver: str, steps: int, scheduler: str):
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    eta = 0.85 if solver == "euler_ancestral" else None
    return InnerSolverSpec(solver, scheduler, steps, eta=eta, s_noise=1.0)


def ksampler_with_x0(model, solver: str, steps: int, scheduler: str, positive, negative, count: int,
                     cfg: float, seed: int = SEED):
    """KSampler's final images and the FID of its x0 prediction after every step."""
    import comfy.sample
    import comfy.samplers
    from comfyui_nested_diffusion.demo_models.digits.metrics import fid

    latent = empty_latent(count)["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    fid_by_step = {}

    def keep_x0(step, x0, x, total):
        fid_by_step[step + 1] = fid(model.model.process_latent_out(x0.detach().cpu()))

    options = {"eta": 0.85} if solver == "euler_ancestral" else {}
    sampler = comfy.samplers.ksampler(solver, options) if options else comfy.samplers.sampler_object(solver)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    out = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                     callback=keep_x0, disable_pbar=True, seed=seed)
    return out.cpu(), fid_by_step  # sample_custom already returns process_latent_out-ed latents


def nested_with_previews(model, solver: str, outer: int, inner: int, scheduler: str, positive, negative, count: int,
                         cfg: float, seed: int = SEED, outer_step: str = "auto", outer_eta: float = 0.0):
    """NestedKSampler's sampler on the same noise: final images, the FID of its anytime image at every outer
    boundary ({nfe: fid}, computed as the images arrive: outer_previews keeps a bounded subset) and its outer step.
    ``outer_step`` and ``outer_eta``: the node's inputs (the hand-set rows of the report)."""
    import comfy.sample
    from comfyui_nested_diffusion.demo_models.digits.metrics import fid
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = inner_spec(solver, inner, scheduler)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer, scheduler)
    boundaries = {inner * (step + 1): step for step in range(outer)}  # one-call solvers: NFEs at each boundary
    fid_by_nfe = {}

    def keep_x0(step, x0, x, total):
        fid_by_nfe[inner * (step + 1)] = fid(model.model.process_latent_out(x0.detach().cpu()))

    sampler = NestedDiffusionSampler(NestedSettings(spec, outer_eta=outer_eta, outer_step=outer_step), plan)
    latent = empty_latent(count)["samples"]
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample_custom(model, noise, cfg, sampler, plan.outer_sigmas, positive, negative, latent,
                                     callback=keep_x0, disable_pbar=True, seed=seed)
    assert set(fid_by_nfe) == set(boundaries), "a boundary without an anytime image"
    return out.cpu(), fid_by_nfe, sampler.reporter.outer_step_mode


def run_variant(variant: str, settings: FidSettings, log) -> dict:
    import comfy.samplers  # noqa: F401
    from comfyui_nested_diffusion.demo_models.digits.metrics import class_accuracy, fid
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model(variant)
    scheduler = "simple" if variant == "flow" else "normal"
    count = settings.samples
    labels = labels_for(count)
    positive, negative = digit_conditioning(labels)
    results = {"scheduler": scheduler, "runs": []}
    for cfg in settings.cfgs:
        for solver in settings.solvers:
            for budget, splits in settings.budgets.items():
                t0 = time.time()
                final, fid_x0 = ksampler_with_x0(model, solver, budget, scheduler, positive, negative, count, cfg,
                                                 settings.seed)
                vanilla = {"fid_final": fid(final), "accuracy": class_accuracy(final, labels), "fid_x0": fid_x0}
                name = f"{variant} CFG {cfg:g} {solver} N={budget}"
                log(f"  fid {name} KSampler: final {vanilla['fid_final']:.2f} acc {vanilla['accuracy']:.3f} "
                    f"({time.time() - t0:.0f} s)")
                for outer, inner in splits:
                    t0 = time.time()
                    final, boundaries, mode = nested_with_previews(model, solver, outer, inner, scheduler, positive,
                                                                   negative, count, cfg, settings.seed)
                    run = {"variant": variant, "cfg": cfg, "solver": solver, "budget": budget, "outer": outer,
                           "inner": inner, "outer_step": mode, "fid_final": fid(final),
                           "accuracy": class_accuracy(final, labels), "fid_boundaries": boundaries, "ksampler": vanilla}
                    results["runs"].append(run)
                    log(f"  fid {name} {outer}x{inner} ({mode}): boundaries "
                        + ", ".join(f"{n}: {v:.2f} vs {vanilla['fid_x0'].get(n, float('nan')):.2f}"
                                    for n, v in run["fid_boundaries"].items())
                        + f"; final {run['fid_final']:.2f} acc {run['accuracy']:.3f} ({time.time() - t0:.0f} s)")
    return results


def run_fid(quick: bool, log, settings: FidSettings | None = None) -> dict:
    settings = settings or (FidSettings.quick() if quick else FidSettings())
    return {"samples": settings.samples, "cfgs": list(settings.cfgs), "seed": settings.seed,
            "variants": {variant: run_variant(variant, settings, log) for variant in settings.variants}}


def first_boundary(run: dict) -> str:
    """The run's first outer boundary (its NFEs, a key of ``fid_boundaries`` and of KSampler's ``fid_x0``)."""
    return min(run["fid_boundaries"], key=int)


def fid_checks(results: dict) -> list[tuple[str, bool, str]]:
    """The targets T1-T4 per model and CFG, over every solver, budget and split (with ``outer_step`` auto), on the
    point estimates of one seed. ``bench/digits_quality.py`` checks the same targets with seeds and intervals.

    T1 anytime: the first boundary's FID <= KSampler's final + 0.5 x (KSampler's x0 there - its final);
    T2 never worse: every boundary <= 1.05x the previous one; T3 final: nested / KSampler <= 1.10;
    T4: class accuracy >= KSampler's - 2 points."""
    checks = []
    for variant, data in results["variants"].items():
        measured = [r for r in data["runs"] if r.get("auto", True)]  # not the hand-set comparison runs
        for cfg in sorted({r["cfg"] for r in measured}):
            runs = [r for r in measured if r["cfg"] == cfg]
            where = f"fid [{variant}, CFG {cfg:g}]"
            closed = []
            for r in runs:
                n = first_boundary(r)
                gap = r["ksampler"]["fid_x0"][n] - r["ksampler"]["fid_final"]
                closed.append((r["ksampler"]["fid_x0"][n] - r["fid_boundaries"][n]) / gap if gap > 0 else float("nan"))
            worst_closed = min(closed)
            checks.append((f"{where}: T1 the first image closes at least half of KSampler's x0-to-final gap",
                           worst_closed >= 0.5, f"smallest fraction closed {worst_closed:.3f} over {len(runs)} runs"))
            ratios = []
            for r in runs:
                values = [v for _, v in sorted(r["fid_boundaries"].items(), key=lambda item: int(item[0]))]
                ratios += [b / max(a, 1e-9) for a, b in zip(values, values[1:])]
            worst_step = max(ratios, default=1.0)
            checks.append((f"{where}: T2 no boundary worse than 1.05x the previous", worst_step <= 1.05,
                           f"worst ratio {worst_step:.3f}"))
            final = max(r["fid_final"] / max(r["ksampler"]["fid_final"], 1e-9) for r in runs)
            checks.append((f"{where}: T3 final FID <= 1.10x KSampler's", final <= 1.10, f"worst ratio {final:.3f}"))
            accuracy = min(r["accuracy"] - r["ksampler"]["accuracy"] for r in runs)
            checks.append((f"{where}: T4 class accuracy >= KSampler's - 2 points", accuracy >= -0.02,
                           f"worst difference {100 * accuracy:+.1f} points"))
    return checks


def passes_by_solver(results: dict) -> dict[str, tuple[int, int]]:
    """{inner solver: (targets passed, targets checked)} with only that solver's runs: which solver a target's
    failure comes from (``fid_checks`` takes the worst run over every solver)."""
    solvers = dict.fromkeys(r["solver"] for data in results["variants"].values() for r in data["runs"])
    counts = {}
    for solver in solvers:
        only = {**results, "variants": {variant: {**data, "runs": [r for r in data["runs"] if r["solver"] == solver]}
                                        for variant, data in results["variants"].items()}}
        checks = fid_checks(only)
        counts[solver] = (sum(ok for _, ok, _ in checks), len(checks))
    return counts


def fid_table(results: dict) -> list[str]:
    lines = [f"FID-like score ({results['samples']} samples): nested anytime image at each outer boundary vs KSampler's "
             "x0 at the same NFEs; final FID and class accuracy",
             "| model | CFG | solver | N | split | outer step | boundaries (nested / KSampler x0) | final nested / KSampler | accuracy nested / KSampler |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, data in results["variants"].items():
        for r in data["runs"]:
            bounds = ", ".join(f"{n}: {v:.1f}/{r['ksampler']['fid_x0'][n]:.1f}" for n, v in r["fid_boundaries"].items())
            lines.append(f"| {variant} | {r['cfg']:g} | {r['solver']} | {r['budget']} | {r['outer']}x{r['inner']} | {r['outer_step']} | "
                         f"{bounds} | {r['fid_final']:.2f} / {r['ksampler']['fid_final']:.2f} | "
                         f"{r['accuracy']:.3f} / {r['ksampler']['accuracy']:.3f} |")
    return lines


def plot_fid(results: dict, path) -> None:
    """FID vs NFEs, one panel per model, CFG and budget: KSampler's x0 after every step, nested at its boundaries."""
    from comfyui_nested_diffusion.bench.plots import _plt

    plt = _plt()
    rows = [(variant, cfg) for variant, data in results["variants"].items()
            for cfg in sorted({r["cfg"] for r in data["runs"]})]
    budgets = sorted({r["budget"] for data in results["variants"].values() for r in data["runs"]})
    fig, axes = plt.subplots(len(rows), len(budgets), figsize=(5.2 * len(budgets), 3.6 * len(rows)), squeeze=False)
    for row, (variant, cfg) in enumerate(rows):
        for col, budget in enumerate(budgets):
            ax = axes[row][col]
            runs = [r for r in results["variants"][variant]["runs"] if r["budget"] == budget and r["cfg"] == cfg]
            if not runs:  # a subset was run
                ax.axis("off")
                ax.text(0.5, 0.5, f"digits {variant}, CFG {cfg:g}, {budget} NFEs: not run", ha="center",
                        va="center", transform=ax.transAxes, color="#777777")
                continue
            solvers = list(dict.fromkeys(r["solver"] for r in runs))
            for style, solver in zip(("-", "--", ":"), solvers):
                vanilla = next(r["ksampler"]["fid_x0"] for r in runs if r["solver"] == solver)
                steps = sorted(vanilla, key=int)
                ax.plot([int(n) for n in steps], [vanilla[n] for n in steps], style, color="#222222",
                        label=f"KSampler x0 ({solver})")
                for index, r in enumerate(run for run in runs if run["solver"] == solver):
                    points = sorted(r["fid_boundaries"].items(), key=lambda item: int(item[0]))
                    ax.plot([int(n) for n, _ in points], [v for _, v in points], style, marker="os^Dv"[index % 5],
                            label=f"nested {r['outer']}x{r['inner']} ({solver}, {r['outer_step']})")
            ax.set_yscale("log")
            ax.set_xlabel("NFEs")
            ax.set_ylabel("FID-like score (log)")
            ax.set_title(f"digits {variant}, CFG {cfg:g}, {budget} NFEs")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(path: str, plot: str | None = None) -> int:
    """Print the table and the targets of a saved fid result (``bench/results/fid.json``);
    ``plot``: also draw it. 1 if a target fails."""
    import json

    results = json.loads(open(path, encoding="utf-8").read())
    for line in fid_table(results):
        print(line)
    checks = fid_checks(results)
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    for solver, (passed, checked) in passes_by_solver(results).items():
        print(f"with {solver}'s runs alone: {passed} of {checked} targets pass")
    if plot:
        plot_fid(results, plot)
    return int(not all(ok for _, ok, _ in checks))


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Report a saved fid result: its table, targets and plot.")
    parser.add_argument("results", help="a fid part's JSON (bench/results/fid.json)")
    parser.add_argument("--plot", help="write the FID-vs-NFE plot here (PNG)")
    args = parser.parse_args()
    sys.exit(report(args.results, args.plot))
