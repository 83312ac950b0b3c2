"""Part 3: NFE truth. Model calls counted by a wrapper on the model, for every inner solver in SAMPLER_NAMES.

The count comes from ComfyUI's own unet function wrapper (``ModelPatcher.set_model_unet_function_wrapper``),
which sees every evaluation of the diffusion model, whatever the sampler does. For every sampler and every model
family it is compared with what NestedKSampler reported (``nested_nfe`` at each outer boundary, read at the
moment the boundary's preview reached the progress hook, and ``nested_nfe_total``), with the plan, and with
KSampler's own count for the same total number of steps.
"""
from __future__ import annotations

import traceback

import torch
from comfyui_nested_diffusion.tools.models import counting_clone, node_with_hidden

from .measure import ServerLikeProgressHook, comfy_session
from .models import PREDICTIONS, exact_model, scheduler_for

OUTER, INNER, SEED = 3, 4, 2


def _nested(model, cond, prediction, sampler_name, hook: ServerLikeProgressHook):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler, solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    counted, calls = counting_clone(model)
    at_boundary: list[int] = []
    hook.on_preview = lambda: at_boundary.append(calls["n"])
    node = node_with_hidden(NestedKSampler, unique_id="bench")
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    output = node.execute(model=counted, seed=SEED, outer_steps=OUTER, inner_steps=INNER, cfg=1.0,
                          sampler_name=sampler_name, scheduler=scheduler_for(prediction), positive=cond, negative=cond,
                          latent_image=latent, denoise=1.0)
    hook.on_preview = None
    _, previews = output.args
    spec = solver_spec(sampler_name, scheduler_for(prediction), INNER)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, OUTER, scheduler_for(prediction), 1.0)
    return {
        "counted": calls["n"],
        "counted_at_boundaries": at_boundary,
        "reported_at_boundaries": list(previews["nested_nfe"]),
        "reported_total": int(previews["nested_nfe_total"]),
        "planned": sum(plan.nfe_per_outer),  # measured before the run on the counting stand-in
        "exact_plan": plan.nfe_exact,  # False where the calls depend on the model (dpm_adaptive)
        "calls_per_inner_process": plan.nfe_per_outer[0],
    }


def _ksampler_count(model, cond, prediction, sampler_name) -> int:
    import nodes

    counted, calls = counting_clone(model)
    latent = {"samples": torch.zeros(1, 3, 32, 32)}
    nodes.KSampler().sample(counted, SEED, OUTER * INNER, 1.0, sampler_name, scheduler_for(prediction), cond, cond, latent)
    return calls["n"]


def run_nfe(quick: bool, log=print) -> dict:
    import comfy.samplers

    predictions = ("eps",) if quick else PREDICTIONS
    results = {
        "outer_steps": OUTER,
        "inner_steps": INNER,
        "counter": "ComfyUI's unet function wrapper on a clone of the MODEL (every diffusion-model evaluation)",
        "preview_method": "auto (Latent2RGB), so every outer boundary reaches the progress hook with its preview",
        "samplers": list(comfy.samplers.SAMPLER_NAMES),
        "runs": {},
    }
    hook = ServerLikeProgressHook()
    with comfy_session("auto", hook):
        for prediction in predictions:
            model, cond, _ = exact_model(prediction)
            rows = {}
            for name in comfy.samplers.SAMPLER_NAMES:
                try:
                    row = _nested(model, cond, prediction, name, hook)
                    row["ksampler_same_steps"] = _ksampler_count(model, cond, prediction, name)
                except Exception as error:  # recorded and reported as a failed check
                    row = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
                else:
                    row["ok"] = (
                        row["counted"] == row["reported_at_boundaries"][-1]
                        and row["counted_at_boundaries"] == row["reported_at_boundaries"]
                        and (not row["exact_plan"] or row["counted"] == row["planned"] == row["reported_total"])
                    )
                rows[name] = row
            bad = [n for n, r in rows.items() if not r.get("ok")]
            log(f"  nfe     {prediction:12s}: {len(rows)} samplers, {len(rows) - len(bad)} exact" + (f", mismatched: {bad}" if bad else ""))
            results["runs"][prediction] = rows
    return results


def nfe_checks(results: dict) -> list[tuple[str, bool, str]]:
    failed, multi = [], set()
    total = 0
    for prediction, rows in results["runs"].items():
        for name, row in rows.items():
            total += 1
            if "error" in row:
                failed.append(f"{prediction}/{name}: {row['error']}")
            elif not row["ok"]:
                failed.append(f"{prediction}/{name}: counted {row['counted']} at {row['counted_at_boundaries']}, "
                              f"reported {row['reported_at_boundaries']} / total {row['reported_total']}, planned {row['planned']}")
            elif row["calls_per_inner_process"] != INNER:
                multi.add(name)
    ok = not failed
    detail = (f"{total} runs ({len(results['runs'])} model families x {total // max(len(results['runs']), 1)} samplers, "
              f"{len(multi)} of them multi-call solvers)") if ok else "failed: " + "; ".join(failed)
    return [("nfe: counted model calls = node-reported NFEs (per boundary and total) for every sampler", ok, detail)]
