"""Helpers for tests that run inside ComfyUI on the exact exemplar-mixture model."""
from __future__ import annotations

import torch
from comfyui_nested_diffusion.tools.models import counting_clone, exemplar_model, node_with_hidden  # noqa: F401

# (counting_clone: the tests' NFE counter, and node_with_hidden, are defined with the models because the benchmark
# uses them too)

SPREAD = 0.05
IMAGE_SIZE = 32


def exemplar_setup(pack, prediction: str, shift: float = 1.0):
    """(model, conditioning, exemplars) for one model family."""
    return exemplar_model(prediction, SPREAD, IMAGE_SIZE, shift=shift)


def empty_latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE)}


def ksampler(model, cond, latent, seed, steps, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0,
             x0_at_step=None):
    """ComfyUI's own KSampler path; optionally also returns its x0 prediction after step ``x0_at_step``."""
    import comfy.sample
    import latent_preview  # noqa: F401

    import nodes

    if x0_at_step is None:
        return nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, cond, cond, latent, denoise=denoise)[0]["samples"]
    captured = {}

    def callback(step, x0, x, total):
        if step == x0_at_step:
            captured["x0"] = model.model.process_latent_out(x0.cpu().clone())

    latent_image = comfy.sample.fix_empty_latent_channels(model=model, latent_image=latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed)
    out = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, cond, cond, latent_image,
                              denoise=denoise, callback=callback, disable_pbar=True, seed=seed)
    return out, captured["x0"]


def nested(pack, model, cond, latent, seed, outer_steps, inner_steps, cfg=1.0, sampler_name="euler",
           scheduler="normal", denoise=1.0, inner_solver=None, outer_eta=0.0, outer_step="auto"):
    """NestedKSampler's own code path; returns (samples LATENT, outer_previews LATENT)."""
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    spec = solver_spec(sampler_name, scheduler, inner_steps, inner_solver)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, scheduler, denoise)
    return run_plan(model, plan, spec, seed, cond, latent, cfg=cfg, outer_eta=outer_eta, outer_step=outer_step)


def run_plan(model, plan, spec, seed, cond, latent, cfg=1.0, outer_eta=0.0, outer_step="auto", max_nfe=0):
    """A planned run as the NestedKSampler nodes make it (their sampler with its plan, through sample_custom)."""
    from comfyui_nested_diffusion.nodes.nested_run import NestedDiffusionSampler, NestedSettings, RunLimits, sample_latent

    settings = NestedSettings(spec, outer_eta, outer_step, RunLimits(max_nfe=max_nfe))
    return sample_latent(model, NestedDiffusionSampler(settings, plan, own_progress=True), seed, cfg, cond, cond, latent)


def run_node(node_cls, unique_id: str = "test", **inputs):
    """Execute a V3 node the way ComfyUI's executor does (a class clone holding the hidden inputs); returns its outputs."""
    return node_with_hidden(node_cls, unique_id=unique_id).execute(**inputs).args


def advanced_inputs(model, cond, latent, seed, outer_steps, inner_steps, start, end, leftover, add_noise=True,
                    sampler_name="euler", scheduler="normal", **optional):
    """NestedKSamplerAdvanced's inputs, for run_node."""
    return dict(model=model, add_noise="enable" if add_noise else "disable", noise_seed=seed, outer_steps=outer_steps,
                inner_steps=inner_steps, cfg=1.0, sampler_name=sampler_name, scheduler=scheduler, positive=cond,
                negative=cond, latent_image=latent, start_at_outer_step=start, end_at_outer_step=end,
                return_with_leftover_noise="enable" if leftover else "disable", **optional)
