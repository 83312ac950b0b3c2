"""The API-format graph the tests, the fuzzer and the load test queue: this pack's exact exemplar model, one sampler,
its images decoded and saved, optionally OuterStepPreview and an InnerSolverSelect (no model weights needed).

Node ids are fixed, so callers can find the nodes' events and outputs: ``EXEMPLAR`` "1" (NestedExemplarModel),
``LATENT`` "2", ``SAMPLER`` "3", ``VAE`` "4" (``pixel_space``), ``DECODE`` "5", ``SAVE`` "6", ``PREVIEW`` "7"
(OuterStepPreview), ``INNER_SOLVER`` "8"; in ``custom_sampler_graph`` ``SAMPLER`` is SamplerCustomAdvanced, fed by
``NESTED_SAMPLER`` "9" (NestedSampler), ``SIGMAS`` "10" (BasicScheduler), ``GUIDER`` "11" (CFGGuider) and ``NOISE``
"12" (RandomNoise).
"""
from __future__ import annotations

from typing import Any, Optional

EXEMPLAR, LATENT, SAMPLER, VAE, DECODE, SAVE, PREVIEW, INNER_SOLVER = "1", "2", "3", "4", "5", "6", "7", "8"
NESTED_SAMPLER, SIGMAS, GUIDER, NOISE = "9", "10", "11", "12"
SPREAD = 0.05


def exemplar_graph(sampler_type: str, sampler_inputs: dict[str, Any], *, size: int = 32, batch: int = 1,
                   prediction: str = "eps", exemplar_defaults: Optional[dict] = None, prefix: str = "nested_api",
                   outer_step_preview: bool = False, inner_solver: Optional[dict] = None) -> dict:
    """Exemplar model -> empty latent -> ``sampler_type`` -> VAEDecode (pixel_space) -> SaveImage.

    ``sampler_inputs``: the sampler's widget values (its model, conditioning and latent links are added).
    ``exemplar_defaults``: NestedExemplarModel's widget defaults from ``/object_info`` (the node may gain inputs).
    ``inner_solver``: InnerSolverSelect's inputs, linked to the sampler's ``inner_solver``.
    ComfyUI caches node outputs between prompts: give every prompt that must really sample its own seed.
    """
    links = {"model": [EXEMPLAR, 0], "positive": [EXEMPLAR, 1], "negative": [EXEMPLAR, 1], "latent_image": [LATENT, 0]}
    prompt = {
        EXEMPLAR: {"class_type": "NestedExemplarModel",
                   "inputs": {**(exemplar_defaults or {}), "prediction": prediction, "spread": SPREAD,
                              "image_size": size, "shift": 1.0}},
        LATENT: {"class_type": "EmptyChromaRadianceLatentImage",
                 "inputs": {"width": size, "height": size, "batch_size": batch}},
        SAMPLER: {"class_type": sampler_type, "inputs": {**links, **sampler_inputs}},
        VAE: {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [VAE, 0]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": prefix}},
    }
    if outer_step_preview:
        prompt[PREVIEW] = {"class_type": "OuterStepPreview", "inputs": {"previews": [SAMPLER, 1], "vae": [VAE, 0]}}
    if inner_solver is not None:
        prompt[INNER_SOLVER] = {"class_type": "InnerSolverSelect", "inputs": dict(inner_solver)}
        prompt[SAMPLER]["inputs"]["inner_solver"] = [INNER_SOLVER, 0]
    return prompt


def custom_sampler_graph(nested_inputs: dict[str, Any], *, steps: int, scheduler: str, denoise: float, cfg: float,
                         noise_seed: int, **graph_options: Any) -> dict:
    """``exemplar_graph`` with SamplerCustomAdvanced as the sampler: NestedSampler (``nested_inputs``: its widget
    values) on BasicScheduler's sigmas (``steps``, ``scheduler``, ``denoise``), CFGGuider (``cfg``) and RandomNoise
    (``noise_seed``). ``graph_options``: exemplar_graph's keywords but ``outer_step_preview`` (SamplerCustomAdvanced
    has no outer_previews output); an ``inner_solver`` links to NestedSampler."""
    prompt = exemplar_graph("SamplerCustomAdvanced", {}, **graph_options)
    sampler = prompt[SAMPLER]["inputs"]
    inner_solver = sampler.pop("inner_solver", None)
    for name in ("model", "positive", "negative"):
        del sampler[name]
    sampler.update(noise=[NOISE, 0], guider=[GUIDER, 0], sampler=[NESTED_SAMPLER, 0], sigmas=[SIGMAS, 0])
    prompt[NESTED_SAMPLER] = {"class_type": "NestedSampler",
                              "inputs": {**nested_inputs, **({"inner_solver": inner_solver} if inner_solver else {})}}
    prompt[SIGMAS] = {"class_type": "BasicScheduler",
                      "inputs": {"model": [EXEMPLAR, 0], "scheduler": scheduler, "steps": steps, "denoise": denoise}}
    prompt[GUIDER] = {"class_type": "CFGGuider",
                      "inputs": {"model": [EXEMPLAR, 0], "positive": [EXEMPLAR, 1], "negative": [EXEMPLAR, 1], "cfg": cfg}}
    prompt[NOISE] = {"class_type": "RandomNoise", "inputs": {"noise_seed": noise_seed}}
    return prompt
