"""Part: keep one candidate mid-run, counted inside a real ComfyUI.

A batch of 4 on the exact exemplar model, 4 outer x 10 inner steps; a pick of batch position 1 requested at the last
model call of the first inner diffusion (it is taken at the next model call, the first of outer step 2, as a click
on the filmstrip after outer step 1 is). ComfyUI's unet wrapper counts the batch items the model evaluates; the picked run must evaluate at most 45%
of the unpicked run's, and its final image must be the kept item's final image in the unpicked run: to 1e-5 where the
pack draws all noise per item (a deterministic inner solver; ``auto`` re-noises per item), not for solvers whose own
noise ComfyUI draws for the whole batch (ancestral / SDE inner solvers), where it is another sample of the same item.
"""
from __future__ import annotations

import torch

BATCH = 4
OUTER, INNER = 4, 10
KEEP = 1
ITEMS_TARGET = 0.45
SOLVERS = ("euler", "dpmpp_2m", "euler_ancestral")
SAME_AS_FULL_BATCH = {"euler", "dpmpp_2m"}  # the pack draws all their noise per item


def nested_run(model, sampler_name: str, prompt_id: str, pick: bool) -> tuple[dict, dict, dict]:
    """NestedKSampler's code path, as node "1" of prompt ``prompt_id``; with ``pick`` the pick is requested over the
    registry the HTTP route uses. Returns (samples, outer_previews, counter)."""
    from comfy_execution.utils import CurrentNodeContext
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import default_exemplars
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import build_exemplar_model, empty_conditioning
    from comfyui_nested_diffusion.nodes.nested_ksampler import nested_settings
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, sample_latent
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run
    from comfyui_nested_diffusion.nodes.steering import request_pick
    from comfyui_nested_diffusion.tools.models import counting_clone

    answers = []

    def pick_as_outer_step_1_ends(calls: dict) -> None:
        if pick and calls["n"] == INNER:
            answers.append(request_pick(prompt_id, "1", KEEP, None))

    model, counter = counting_clone(build_exemplar_model(default_exemplars(32), 0.05, "eps"),
                                    on_call=pick_as_outer_step_1_ends)
    settings = nested_settings(sampler_name, "normal", INNER, None, 0.0, 0, 0.0, "auto")
    plan = plan_nested_run(model.get_model_object("model_sampling"), settings.spec, OUTER, "normal")
    cond = empty_conditioning()
    with CurrentNodeContext(prompt_id, "1"):
        samples, previews = sample_latent(model, NestedDiffusionSampler(settings, plan), 7, 1.0, cond, cond,
                                          {"samples": torch.zeros(BATCH, 3, 32, 32)})
    if pick:
        assert answers and answers[0][0] == 200, f"the pick was refused: {answers}"
    return samples, previews, counter


def pick_row(sampler_name: str) -> dict:
    full, _, full_counter = nested_run(sampler_name, sampler_name, f"bench-full-{sampler_name}", pick=False)
    kept, previews, counter = nested_run(sampler_name, sampler_name, f"bench-pick-{sampler_name}", pick=True)
    difference = float((kept["samples"] - full["samples"][KEEP:KEEP + 1]).abs().max())
    return {
        "sampler": sampler_name,
        "items_full": full_counter["items"],
        "items_picked": counter["items"],
        "items_ratio": counter["items"] / full_counter["items"],
        "kept_shape": list(kept["samples"].shape),
        "kept_batch_index": kept.get("batch_index"),
        "max_difference_to_full_batch": difference,
        "same_as_full_batch_expected": sampler_name in SAME_AS_FULL_BATCH,
        "previews_per_step": previews["nested_step_batch_sizes"],
    }


def run_pick(quick: bool, log) -> dict:
    rows = []
    for name in SOLVERS[:1] if quick else SOLVERS:
        row = pick_row(name)
        log(f"  pick [{name}]: items {row['items_picked']} / {row['items_full']} ({row['items_ratio']:.1%}), "
            f"kept item vs full batch max |diff| {row['max_difference_to_full_batch']:.2e}")
        rows.append(row)
    return {"batch": BATCH, "outer": OUTER, "inner": INNER, "keep": KEEP, "rows": rows}


def pick_checks(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for row in results["rows"]:
        name = row["sampler"]
        checks.append((f"pick [{name}]: batch items evaluated <= 45% of the unpicked run's",
                       row["items_ratio"] <= ITEMS_TARGET, f"{row['items_picked']} / {row['items_full']}"))
        if row["same_as_full_batch_expected"]:
            checks.append((f"pick [{name}]: the kept item's final image = its image in the full batch (1e-5)",
                           row["max_difference_to_full_batch"] <= 1e-5, f"{row['max_difference_to_full_batch']:.2e}"))
    return checks
