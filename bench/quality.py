"""Part 1: anytime quality on the exact-denoiser model (eps, v-prediction, flow), nested vs KSampler at equal NFEs.

For every model family and budget N, one KSampler run (euler, the family's scheduler) records its x0
prediction after every model call, and NestedKSampler runs with several outer x inner splits of the same N
(euler inside). Distances are RMS (per pixel and channel, pixel units in [-1, 1]) from each image to its
nearest exemplar, averaged over the batch; the latents are ``process_latent_out``-ed first.
"""
from __future__ import annotations

import math

import torch
from comfyui_nested_diffusion.tools.models import counting_clone

from .models import ON_MANIFOLD, PREDICTIONS, SPREAD, exact_model, exact_model_config, scheduler_for

SAMPLER = "euler"
SEED = 1

AUC_CONVENTION = (
    "Anytime curve d(n): the mean manifold distance of the latest image available after n model calls; for "
    "nested the last completed inner result (a step function that changes at outer boundaries), for KSampler its "
    "x0 prediction after n calls. auc = integral of log10 d(n) dn over n in [first outer boundary, N] (unit-width "
    "steps: sum over n = n1 .. N-1), the same window for both; auc_mean = auc / (N - n1), the mean log10 distance "
    "over the window. Lower is better; the analogue of the paper's area under log-FID per NFE. "
    f"auc_mean_resolved: the same with d floored at the data's spread ({SPREAD}), so that sitting closer to an "
    "exemplar than the data's own samples do (KSampler's late x0, a posterior mean at low noise) earns nothing; "
    f"its best possible value is log10({SPREAD}) = {math.log10(SPREAD):.3f}."
)
BOUNDARY_RULE = (
    f"nested <= KSampler at a boundary means d_nested <= max(d_ksampler, spread = {SPREAD}): an image within the "
    "data's own spread of an exemplar is on the manifold, and a distance below that only says how close to the "
    "cloud's centre it sits (KSampler's x0 late in a run is a posterior mean at low noise, closer to the exemplar "
    "than any sample of the data, including KSampler's own final image). The strict comparison is recorded too."
)


def splits(budget: int, quick: bool) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(gated, extended) outer x inner splits of ``budget``.

    Gated (targets apply): at least 3 outer steps (the first image within a third of the budget) and at least
    8 inner euler steps (an inner process long enough to be a sample). Extended (reported, no targets): the
    two ways to break that, 2 outer steps (the first image only at half the budget) and 4-step inner processes.
    """
    divisors = [outer for outer in range(2, budget + 1) if budget % outer == 0]
    gated = [(o, budget // o) for o in divisors if o >= 3 and budget // o >= 8]
    if quick:
        gated = gated[:2]
    extended = [(o, budget // o) for o in divisors if o == 2 or budget // o == 4]
    return gated, ([] if quick else extended)


def _distances(images: torch.Tensor, exemplars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    return manifold_distance(images.float().cpu(), exemplars)


def _distinct(images: torch.Tensor, exemplars: torch.Tensor) -> int:
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import distinct_exemplars

    return distinct_exemplars(images.float().cpu(), exemplars, ON_MANIFOLD)


def vanilla_run(model, cond, exemplars, prediction: str, budget: int, batch: int) -> dict:
    """KSampler's path (comfy.sample.sample, as nodes.common_ksampler) recording x0 after every model call."""
    import comfy.sample

    counted, calls = counting_clone(model)
    latent = torch.zeros(batch, 3, exemplars.shape[-2], exemplars.shape[-1])
    curve: dict[int, float] = {}

    def callback(step, x0, x, total_steps):
        images = counted.model.process_latent_out(x0.detach().cpu().clone())
        curve[calls["n"]] = float(_distances(images, exemplars)[0].mean())

    noise = comfy.sample.prepare_noise(latent, SEED)
    out = comfy.sample.sample(counted, noise, budget, 1.0, SAMPLER, scheduler_for(prediction), cond, cond, latent,
                              callback=callback, disable_pbar=True, seed=SEED)
    final = out.float().cpu()  # comfy.sample.sample returns process_latent_out-ed samples
    distance, index = _distances(final, exemplars)
    return {
        "nfe_counted": calls["n"],
        "curve": {int(n): d for n, d in sorted(curve.items())},
        "final_distance": float(distance.mean()),
        "final_distance_max": float(distance.max()),
        "distinct_exemplars": _distinct(final, exemplars),
        "exemplar_index": index.tolist(),
    }


def nested_run(model, cond, exemplars, prediction: str, outer: int, inner: int, batch: int) -> dict:
    """What NestedKSampler.execute runs (its settings and plan from the node's inputs at their defaults, then
    ``sample_latent``), with every outer step's image recorded as it arrives: ``outer_previews`` keeps at most 64
    images (a batch of 32 fits two outer steps), the benchmark needs every boundary."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import nested_settings
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, sample_latent
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    counted, calls = counting_clone(model)
    latent = {"samples": torch.zeros(batch, 3, exemplars.shape[-2], exemplars.shape[-1])}
    scheduler = scheduler_for(prediction)
    settings = nested_settings(SAMPLER, scheduler, inner, inner_solver=None, outer_eta=0.0, max_nfe=0, max_seconds=0.0,
                               outer_step="auto")
    plan = plan_nested_run(counted.get_model_object("model_sampling"), settings.spec, outer, scheduler, 1.0)
    recorded, counted_at = [], []

    class RecordingSampler(NestedDiffusionSampler):
        def report_outer_step(self, step, x0, x, total_steps):
            recorded.append(counted.model.process_latent_out(x0.detach().float().cpu()))
            counted_at.append(calls["n"])
            super().report_outer_step(step, x0, x, total_steps)

    samples, previews = sample_latent(counted, RecordingSampler(settings, plan, own_progress=True), SEED, 1.0, cond,
                                      cond, latent)
    images = torch.stack(recorded)
    boundaries = [float(_distances(images[k], exemplars)[0].mean()) for k in range(outer)]
    final = samples["samples"].float().cpu()
    distance, index = _distances(final, exemplars)
    return {
        "outer_steps": outer,
        "inner_steps": inner,
        "nfe_counted": calls["n"],
        "nfe_at_boundary": counted_at,  # model calls counted when each outer step's image arrived
        "nfe_reported": list(previews["nested_nfe"]),  # for the outer steps outer_previews kept:
        "nfe_reported_steps": list(previews["nested_outer_step_numbers"]),
        "nfe_total_reported": int(previews["nested_nfe_total"]),
        "boundary_distance": boundaries,
        "final_distance": float(distance.mean()),
        "final_distance_max": float(distance.max()),
        "final_equals_last_preview": bool(torch.equal(final, images[-1])),
        "distinct_exemplars": _distinct(final, exemplars),
        "exemplar_index": index.tolist(),
    }


def anytime_auc(points: dict[int, float], start: int, budget: int, floor: float = 0.0) -> tuple[float, float]:
    """(auc, auc_mean) of log10 max(d, floor) for the step function ``points`` (NFE -> d) over [start, budget]."""
    known = sorted(points)
    total, latest = 0.0, None
    for n in range(start, budget):
        candidates = [m for m in known if m <= n]
        if candidates:
            latest = points[candidates[-1]]
        total += math.log10(max(latest, floor))
    return total, total / max(budget - start, 1)


def reported_as_counted(nested: dict) -> bool:
    """The NFEs outer_previews reports for the outer steps it kept equal the model calls counted at those steps."""
    counted = nested["nfe_at_boundary"]
    return all(counted[step - 1] == nfe for step, nfe in zip(nested["nfe_reported_steps"], nested["nfe_reported"]))


def compare(vanilla: dict, nested: dict, budget: int, batch: int) -> dict:
    boundaries = nested["nfe_at_boundary"]
    vanilla_at = [vanilla["curve"][n] for n in boundaries]
    n1 = boundaries[0]
    nested_points = dict(zip(boundaries, nested["boundary_distance"]))
    auc_nested, mean_nested = anytime_auc(nested_points, n1, budget)
    auc_vanilla, mean_vanilla = anytime_auc(vanilla["curve"], n1, budget)
    _, resolved_nested = anytime_auc(nested_points, n1, budget, floor=SPREAD)
    _, resolved_vanilla = anytime_auc(vanilla["curve"], n1, budget, floor=SPREAD)
    same = sum(a == b for a, b in zip(nested["exemplar_index"], vanilla["exemplar_index"]))
    at_most = [d <= max(v, SPREAD) for d, v in zip(nested["boundary_distance"], vanilla_at)]
    strict = [d <= v for d, v in zip(nested["boundary_distance"], vanilla_at)]
    return {
        "boundary_nfe": boundaries,
        "nested_distance": nested["boundary_distance"],
        "ksampler_x0_distance": vanilla_at,
        "first_boundary_ratio": nested["boundary_distance"][0] / vanilla_at[0],
        "nested_at_most_ksampler": at_most,
        "nested_at_most_ksampler_strict": strict,
        "final_distance_ratio": nested["final_distance"] / vanilla["final_distance"],
        "distinct_ratio": nested["distinct_exemplars"] / max(vanilla["distinct_exemplars"], 1),
        "same_exemplar_as_ksampler": same / batch,
        "auc_window": [n1, budget],
        "auc_nested": auc_nested,
        "auc_ksampler": auc_vanilla,
        "auc_mean_nested": mean_nested,
        "auc_mean_ksampler": mean_vanilla,
        "auc_mean_resolved_nested": resolved_nested,
        "auc_mean_resolved_ksampler": resolved_vanilla,
        "nfe_identical": nested["nfe_counted"] == vanilla["nfe_counted"] == budget == boundaries[-1]
        and nested["nfe_total_reported"] == budget and reported_as_counted(nested),
    }


def run_quality(quick: bool, log=print) -> dict:
    budgets = [24, 48] if quick else [24, 48, 96]
    batch = 16 if quick else 32
    results = {
        "sampler": SAMPLER,
        "seed": SEED,
        "batch": batch,
        "cfg": 1.0,
        "distance": "RMS (per pixel and channel) to the nearest exemplar, pixel units in [-1, 1], mean over the batch",
        "distinct_exemplars": f"number of different exemplars the batch's final images landed on within {ON_MANIFOLD} RMS",
        "auc_convention": AUC_CONVENTION,
        "boundary_rule": BOUNDARY_RULE,
        "gated_splits": "outer >= 3 and inner >= 8: targets apply",
        "extended_splits": "outer == 2 or inner == 4: reported, no targets (they show where the targets stop holding)",
        "models": {},
    }
    for prediction in PREDICTIONS:
        model, cond, exemplars = exact_model(prediction)
        family = {"config": exact_model_config(prediction), "budgets": {}}
        for budget in budgets:
            vanilla = vanilla_run(model, cond, exemplars, prediction, budget, batch)
            gated, extended = splits(budget, quick)
            runs = []
            for outer, inner in gated + extended:
                nested = nested_run(model, cond, exemplars, prediction, outer, inner, batch)
                runs.append({
                    "split": f"{outer}x{inner}",
                    "gated": (outer, inner) in gated,
                    "nested": nested,
                    "comparison": compare(vanilla, nested, budget, batch),
                })
            family["budgets"][str(budget)] = {"ksampler": vanilla, "nested": runs}
            log(f"  quality {prediction:12s} N={budget:3d}: " + ", ".join(
                f"{r['split']} first {r['comparison']['nested_distance'][0]:.4f} vs {r['comparison']['ksampler_x0_distance'][0]:.4f}"
                for r in runs))
        results["models"][prediction] = family
    return results


def quality_checks(results: dict) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) for every quality target, over the gated splits."""
    rows = {"nfe": [], "first": [], "every": [], "final": [], "diverse": []}
    strict_misses = []
    for prediction, family in results["models"].items():
        for budget, entry in family["budgets"].items():
            vanilla = entry["ksampler"]
            for run in entry["nested"]:
                if not run["gated"]:
                    continue
                c, tag = run["comparison"], f"{prediction} N={budget} {run['split']}"
                rows["nfe"].append((c["nfe_identical"], tag, f"{run['nested']['nfe_counted']} vs {vanilla['nfe_counted']}"))
                rows["first"].append((c["first_boundary_ratio"] <= 1 / 20, tag, f"{c['first_boundary_ratio']:.4f}"))
                worst = max(range(len(c["nested_distance"])), key=lambda k: c["nested_distance"][k] / max(c["ksampler_x0_distance"][k], SPREAD))
                rows["every"].append((all(c["nested_at_most_ksampler"]), tag,
                                      f"NFE {c['boundary_nfe'][worst]}: {c['nested_distance'][worst]:.4f} vs {c['ksampler_x0_distance'][worst]:.4f}"))
                rows["final"].append((c["final_distance_ratio"] <= 1.5, tag, f"{c['final_distance_ratio']:.3f}"))
                rows["diverse"].append((c["distinct_ratio"] >= 0.9, tag,
                                        f"{run['nested']['distinct_exemplars']} vs {vanilla['distinct_exemplars']}"))
                strict_misses += [f"{tag} NFE {n}" for n, ok in zip(c["boundary_nfe"], c["nested_at_most_ksampler_strict"]) if not ok]

    def summary(name, entries, worst_key=None):
        failed = [f"{tag} ({detail})" for ok, tag, detail in entries if not ok]
        if failed:
            return name, False, "failed: " + "; ".join(failed)
        return name, True, f"{len(entries)} runs" + (f", worst {worst_key(entries)}" if worst_key else "")

    def worst_ratio(entries):
        ok, tag, detail = max(entries, key=lambda e: float(e[2]))
        return f"{detail} ({tag})"

    def lowest_ratio(entries):
        ok, tag, detail = min(entries, key=lambda e: float(e[2]))
        return f"{detail} ({tag})"

    checks = [
        summary("quality: NFEs identical (counted nested = counted KSampler = N = reported)", rows["nfe"]),
        summary("quality: first outer boundary, nested distance <= 1/20 of KSampler x0's", rows["first"], worst_ratio),
        summary("quality: every outer boundary, nested distance <= KSampler x0's (to the data's spread)", rows["every"]),
        summary("quality: final distance <= 1.5x KSampler's", rows["final"], worst_ratio),
        summary("quality: distinct exemplars >= 90% of KSampler's", rows["diverse"]),
    ]
    results["strict_boundary_misses"] = strict_misses
    return checks
