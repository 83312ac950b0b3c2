"""Part: a new image every ``update_seconds``, timed inside a real ComfyUI.

The exact exemplar model, batch 1, behind ComfyUI's unet function wrapper that makes every call take at least
CALL_SECONDS more (a model whose call time is steady, slow enough that the pack's own work per outer step is small
beside it, as on a real model). NestedKSampler's sampler and plan with ``update_seconds`` run through
``sample_custom``; the times between its outer-step callbacks after the first are the intervals. Target: their
median within 25% of ``update_seconds``, and the budget of outer_steps x inner_steps steps spent exactly.
"""
from __future__ import annotations

import statistics
import time

import torch

CALL_SECONDS = 0.04
OUTER, INNER = 4, 25
TARGETS = (0.5, 1.0)
TOLERANCE = 0.25


def paced_run(update_seconds: float, outer: int, inner: int) -> dict:
    import comfy.sample
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import default_exemplars, manifold_distance
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import build_exemplar_model, empty_conditioning
    from comfyui_nested_diffusion.nodes.nested_ksampler import nested_settings
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run
    from comfyui_nested_diffusion.tools.models import counting_clone

    exemplars = default_exemplars(32)
    model, calls = counting_clone(build_exemplar_model(exemplars, 0.05, "eps"), seconds_per_call=CALL_SECONDS)
    settings = nested_settings("euler_ancestral", "normal", inner, None, 0.0, 0, 0.0, "auto", update_seconds)
    plan = plan_nested_run(model.get_model_object("model_sampling"), settings.spec, outer, "normal")
    sampler = NestedDiffusionSampler(settings, plan)
    cond = empty_conditioning()
    latent = torch.zeros(1, 3, 32, 32)
    arrivals = []
    started = time.monotonic()
    samples = comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 3), 1.0, sampler, plan.outer_sigmas,
                                         cond, cond, latent, callback=lambda *_: arrivals.append(time.monotonic()),
                                         disable_pbar=True, seed=3)
    intervals = [b - a for a, b in zip(arrivals, arrivals[1:])]
    steps = sampler.reporter.paced.steps
    return {
        "update_seconds": update_seconds,
        "budget_steps": outer * inner,
        "inner_steps": list(steps),
        "calls": calls["n"],
        "first_image_seconds": arrivals[0] - started,
        "intervals": intervals,
        "median_interval": statistics.median(intervals) if intervals else None,
        "within_tolerance": sum(abs(i - update_seconds) <= TOLERANCE * update_seconds for i in intervals),
        "final_distance": float(manifold_distance(samples, exemplars)[0].max()),
    }


def run_update_seconds(quick: bool, log) -> dict:
    rows = []
    for target in TARGETS[:1] if quick else TARGETS:
        row = paced_run(target, OUTER, 15 if quick else INNER)
        log(f"  update_seconds {target:g}: median interval {row['median_interval']:.3f} s, "
            f"{row['within_tolerance']}/{len(row['intervals'])} within {TOLERANCE:.0%}, inner steps {row['inner_steps']}")
        rows.append(row)
    return {"call_seconds": CALL_SECONDS, "outer": OUTER, "tolerance": TOLERANCE, "rows": rows}


def update_seconds_checks(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for row in results["rows"]:
        target, median = row["update_seconds"], row["median_interval"]
        checks.append((f"update_seconds {target:g}: median interval after the first within 25%",
                       median is not None and abs(median - target) <= TOLERANCE * target,
                       f"{median:.3f} s ({row['within_tolerance']}/{len(row['intervals'])} intervals within)"))
        checks.append((f"update_seconds {target:g}: the step budget spent exactly",
                       sum(row["inner_steps"]) == row["budget_steps"],
                       f"{sum(row['inner_steps'])} of {row['budget_steps']} steps"))
    return checks
