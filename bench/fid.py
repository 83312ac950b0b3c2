"""Part 5: the paper's Figures 3 and 4 on the learned digits models (eps and rectified flow), issue 10.

For every variant, total budget N (40 and 100 NFEs) and inner solver (stochastic: the paper's euler_ancestral
with eta 0.85, deterministic: euler), ``SAMPLES`` class-conditional samples (digits 0-9 in turn, CFG ``CFG`` against
"any") are drawn by KSampler with N steps (its x0 prediction kept after every step) and by NestedKSampler with
several outer x inner splits of N (outer_step auto: ddim after euler_ancestral, renoise after euler). The FID-like
score (``demo_models.digits.metrics``) of the nested anytime image at every outer boundary is compared with
KSampler's x0 at the same NFEs; the final images' FID and class accuracy with KSampler's final images.
"""
from __future__ import annotations

import time

import torch

SAMPLES = 1000
QUICK_SAMPLES = 100
CFG = 2.0
SEED = 3
BUDGETS = {40: [(4, 10), (2, 20)], 100: [(4, 25), (10, 10)]}
QUICK_BUDGETS = {40: [(4, 10)]}
SOLVERS = ("euler_ancestral", "euler")  # stochastic (the paper's inner DDIM eta 0.85), deterministic
VARIANTS = ("eps", "flow")


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


def ksampler_with_x0(model, solver: str, steps: int, scheduler: str, positive, negative, count: int):
    """KSampler's final images and the FID of its x0 prediction after every step."""
    import comfy.sample
    import comfy.samplers
    from comfyui_nested_diffusion.demo_models.digits.metrics import fid

    latent = empty_latent(count)["samples"]
    noise = comfy.sample.prepare_noise(latent, SEED)
    fid_by_step = {}

    def keep_x0(step, x0, x, total):
        fid_by_step[step + 1] = fid(model.model.process_latent_out(x0.detach().cpu()))

    options = {"eta": 0.85} if solver == "euler_ancestral" else {}
    sampler = comfy.samplers.ksampler(solver, options) if options else comfy.samplers.sampler_object(solver)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
    out = comfy.sample.sample_custom(model, noise, CFG, sampler, sigmas, positive, negative, latent,
                                     callback=keep_x0, disable_pbar=True, seed=SEED)
    return out.cpu(), fid_by_step  # sample_custom already returns process_latent_out-ed latents


def nested_with_previews(model, solver: str, outer: int, inner: int, scheduler: str, positive, negative, count: int):
    """NestedKSampler's sampler on the same noise: final images, the FID of its anytime image at every outer
    boundary ({nfe: fid}, computed as the images arrive: outer_previews keeps a bounded subset) and its outer step."""
    import comfy.sample
    from comfyui_nested_diffusion.demo_models.digits.metrics import fid
    from comfyui_nested_diffusion.nodes.nested_run import NestedKSAMPLER, NestedSettings
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = inner_spec(solver, inner, scheduler)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer, scheduler)
    boundaries = {inner * (step + 1): step for step in range(outer)}  # one-call solvers: NFEs at each boundary
    fid_by_nfe = {}

    def keep_x0(step, x0, x, total):
        fid_by_nfe[inner * (step + 1)] = fid(model.model.process_latent_out(x0.detach().cpu()))

    sampler = NestedKSAMPLER(NestedSettings(spec), plan)
    latent = empty_latent(count)["samples"]
    noise = comfy.sample.prepare_noise(latent, SEED)
    out = comfy.sample.sample_custom(model, noise, CFG, sampler, plan.outer_sigmas, positive, negative, latent,
                                     callback=keep_x0, disable_pbar=True, seed=SEED)
    assert set(fid_by_nfe) == set(boundaries), "a boundary without an anytime image"
    return out.cpu(), fid_by_nfe, sampler.reporter.outer_step_mode


def run_variant(variant: str, count: int, budgets: dict, log) -> dict:
    import comfy.samplers  # noqa: F401
    from comfyui_nested_diffusion.demo_models.digits.metrics import class_accuracy, fid
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model(variant)
    scheduler = "simple" if variant == "flow" else "normal"
    labels = labels_for(count)
    positive, negative = digit_conditioning(labels)
    results = {"scheduler": scheduler, "runs": []}
    for solver in SOLVERS:
        for budget, splits in budgets.items():
            t0 = time.time()
            final, fid_x0 = ksampler_with_x0(model, solver, budget, scheduler, positive, negative, count)
            vanilla = {"fid_final": fid(final), "accuracy": class_accuracy(final, labels), "fid_x0": fid_x0}
            log(f"  fid {variant} {solver} N={budget} KSampler: final {vanilla['fid_final']:.2f} acc {vanilla['accuracy']:.3f} "
                f"({time.time() - t0:.0f} s)")
            for outer, inner in splits:
                t0 = time.time()
                final, boundaries, mode = nested_with_previews(model, solver, outer, inner, scheduler, positive, negative, count)
                run = {"variant": variant, "solver": solver, "budget": budget, "outer": outer, "inner": inner,
                       "outer_step": mode, "fid_final": fid(final), "accuracy": class_accuracy(final, labels),
                       "fid_boundaries": boundaries, "ksampler": vanilla}
                results["runs"].append(run)
                log(f"  fid {variant} {solver} N={budget} {outer}x{inner} ({mode}): boundaries "
                    + ", ".join(f"{n}: {v:.2f} vs {vanilla['fid_x0'].get(n, float('nan')):.2f}"
                                for n, v in run["fid_boundaries"].items())
                    + f"; final {run['fid_final']:.2f} acc {run['accuracy']:.3f} ({time.time() - t0:.0f} s)")
    return results


def run_fid(quick: bool, log) -> dict:
    count = QUICK_SAMPLES if quick else SAMPLES
    budgets = QUICK_BUDGETS if quick else BUDGETS
    return {"samples": count, "cfg": CFG, "seed": SEED,
            "variants": {variant: run_variant(variant, count, budgets, log) for variant in VARIANTS}}


def fid_checks(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for variant, data in results["variants"].items():
        runs = data["runs"]
        first = [(r, min(r["fid_boundaries"], key=int)) for r in runs]
        ratios = [r["fid_boundaries"][n] / max(r["ksampler"]["fid_x0"][n], 1e-9) for r, n in first]
        worst = max(ratios)
        checks.append((f"fid [{variant}]: nested at the first boundary <= 1/3 of KSampler x0's", worst <= 1 / 3,
                       f"worst ratio {worst:.3f} over {len(runs)} runs"))
        behind = [f"{r['solver']} {r['outer']}x{r['inner']} @{n}" for r in runs for n, v in r["fid_boundaries"].items()
                  if v > r["ksampler"]["fid_x0"][n]]
        checks.append((f"fid [{variant}]: nested <= KSampler x0 at every boundary", not behind,
                       "; ".join(behind) or "all boundaries"))
        final = max(r["fid_final"] / max(r["ksampler"]["fid_final"], 1e-9) for r in runs)
        checks.append((f"fid [{variant}]: final FID <= 1.10x KSampler's", final <= 1.10, f"worst ratio {final:.3f}"))
        accuracy = min(r["accuracy"] - r["ksampler"]["accuracy"] for r in runs)
        checks.append((f"fid [{variant}]: class accuracy >= KSampler's - 2 points", accuracy >= -0.02,
                       f"worst difference {100 * accuracy:+.1f} points"))
    return checks


def fid_table(results: dict) -> list[str]:
    lines = [f"FID-like score ({results['samples']} samples, CFG {results['cfg']}): nested anytime image at each outer "
             "boundary vs KSampler's x0 at the same NFEs; final FID and class accuracy",
             "| model | solver | N | split | outer step | boundaries (nested / KSampler x0) | final nested / KSampler | accuracy nested / KSampler |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, data in results["variants"].items():
        for r in data["runs"]:
            bounds = ", ".join(f"{n}: {v:.1f}/{r['ksampler']['fid_x0'][n]:.1f}" for n, v in r["fid_boundaries"].items())
            lines.append(f"| {variant} | {r['solver']} | {r['budget']} | {r['outer']}x{r['inner']} | {r['outer_step']} | "
                         f"{bounds} | {r['fid_final']:.2f} / {r['ksampler']['fid_final']:.2f} | "
                         f"{r['accuracy']:.3f} / {r['ksampler']['accuracy']:.3f} |")
    return lines


def plot_fid(results: dict, path) -> None:
    """FID vs NFEs, one panel per model and budget: KSampler's x0 after every step, nested at its boundaries."""
    from comfyui_nested_diffusion.bench.plots import _plt

    plt = _plt()
    variants = list(results["variants"])
    budgets = sorted({r["budget"] for data in results["variants"].values() for r in data["runs"]})
    fig, axes = plt.subplots(len(variants), len(budgets), figsize=(5.2 * len(budgets), 3.6 * len(variants)), squeeze=False)
    for row, variant in enumerate(variants):
        for col, budget in enumerate(budgets):
            ax = axes[row][col]
            runs = [r for r in results["variants"][variant]["runs"] if r["budget"] == budget]
            for style, solver in zip(("-", "--"), SOLVERS):
                vanilla = next((r["ksampler"]["fid_x0"] for r in runs if r["solver"] == solver), None)
                if vanilla:
                    steps = sorted(vanilla, key=int)
                    ax.plot([int(n) for n in steps], [vanilla[n] for n in steps], style, color="#222222",
                            label=f"KSampler x0 ({solver})")
                for index, r in enumerate(run for run in runs if run["solver"] == solver):
                    points = sorted(r["fid_boundaries"].items(), key=lambda item: int(item[0]))
                    ax.plot([int(n) for n, _ in points], [v for _, v in points], style, marker="os^Dv"[index % 5],
                            label=f"nested {r['outer']}x{r['inner']} ({solver})")
            ax.set_yscale("log")
            ax.set_xlabel("NFEs")
            ax.set_ylabel("FID-like score (log)")
            ax.set_title(f"digits {variant}, {budget} NFEs")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
