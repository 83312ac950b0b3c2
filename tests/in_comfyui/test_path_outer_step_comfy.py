"""outer_step = path inside a real ComfyUI: the outer chain is KSampler's own path, every anytime image a short
completion of it (exact denoiser, eps / v / flow; N(0, I) data for the spread)."""
import pytest
import torch
from comfy_helpers import SPREAD, empty_latent, exemplar_setup, ksampler, run_node
from comfyui_nested_diffusion.nested_core import NestedDiffusionError, path_completion_steps

PREDICTIONS = ["eps", "v_prediction", "flow"]


@pytest.fixture(scope="module", params=PREDICTIONS)
def family(request, pack):
    model, cond, exemplars = exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)
    return request.param, model, cond, exemplars


def scheduler_for(prediction: str) -> str:
    return "simple" if prediction == "flow" else "normal"


def path_steps(outer: int, inner: int) -> int:
    return (outer - 1) * (inner - path_completion_steps(inner)) + inner


def nested_node(model, cond, latent, seed, outer, inner, scheduler, **options):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    return run_node(NestedKSampler, model=model, seed=seed, outer_steps=outer, inner_steps=inner, cfg=1.0,
                    sampler_name=options.pop("sampler_name", "euler"), scheduler=scheduler, positive=cond,
                    negative=cond, latent_image=latent, denoise=options.pop("denoise", 1.0), outer_step="path",
                    **options)


@pytest.mark.parametrize("outer,inner", [(4, 10), (3, 6)])
def test_the_final_image_is_ksamplers_euler_on_the_path_grid(family, pack, outer, inner):
    prediction, model, cond, _ = family
    scheduler = scheduler_for(prediction)
    samples, previews = nested_node(model, cond, empty_latent(3), 11, outer, inner, scheduler)
    reference = ksampler(model, cond, empty_latent(3), 11, path_steps(outer, inner), scheduler=scheduler)
    assert torch.allclose(samples["samples"], reference, atol=1e-4), float((samples["samples"] - reference).abs().max())
    assert previews["nested_outer_step_mode"] == "path"
    assert previews["nested_nfe"] == [inner * (k + 1) for k in range(outer)]


def test_denoise_walks_ksamplers_truncated_grid(family, pack):
    prediction, model, cond, _ = family
    scheduler = scheduler_for(prediction)
    start = ksampler(model, cond, empty_latent(2), 3, 8, scheduler=scheduler)
    latent = {"samples": start}
    samples, _ = nested_node(model, cond, latent, 5, 3, 4, scheduler, denoise=0.5)
    reference = ksampler(model, cond, latent, 5, path_steps(3, 4), scheduler=scheduler, denoise=0.5)
    assert torch.allclose(samples["samples"], reference, atol=1e-4)


def test_every_anytime_image_is_on_the_data_and_the_last_is_the_final(family, pack):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    prediction, model, cond, exemplars = family
    samples, previews = nested_node(model, cond, empty_latent(4), 2, 4, 10, scheduler_for(prediction))
    for k, image in enumerate(previews["samples"].split(4)):
        distance = manifold_distance(image, exemplars)[0]
        assert float(distance.max()) <= 3 * SPREAD, (k, distance)
    assert torch.equal(previews["samples"][-4:], samples["samples"])


@pytest.mark.parametrize("prediction,shift", [("eps", 1.0), ("flow", 3.0)])
def test_the_spread_of_wide_data_is_ksamplers(pack, prediction, shift):
    """N(0, I) data: the final spread is the spread of KSampler on the same grid (no outer step widens or drifts it)."""
    from comfyui_nested_diffusion.bench.spread import gaussian_latent, gaussian_model
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import empty_conditioning

    model, cond = gaussian_model(prediction, shift), empty_conditioning()
    samples, _ = nested_node(model, cond, gaussian_latent(256), 0, 4, 10, "normal")
    reference = ksampler(model, cond, gaussian_latent(256), 0, path_steps(4, 10), scheduler="normal")
    assert abs(float(samples["samples"].std()) - float(reference.std())) <= 1e-3
    assert abs(float(samples["samples"].std()) - 1.0) <= 0.1


def test_path_with_update_seconds_or_connected_sigmas_is_a_clear_error(pack):
    import comfy.sample
    import comfy.samplers
    from comfyui_nested_diffusion.bench.spread import gaussian_latent, gaussian_model
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import empty_conditioning
    from comfyui_nested_diffusion.nodes.nested_sampler import NestedSampler

    model, cond = gaussian_model("eps", 1.0), empty_conditioning()
    with pytest.raises(NestedDiffusionError, match="outer_step path .* update_seconds"):
        nested_node(model, cond, gaussian_latent(2), 0, 4, 10, "normal", update_seconds=1.0)
    (sampler,) = run_node(NestedSampler, outer_step="path")
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 5)
    latent = gaussian_latent(2)["samples"]
    with pytest.raises(NestedDiffusionError, match="outer_step path walks KSampler's own grid.*use trajectory"):
        comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 1.0, sampler, sigmas, cond, cond,
                                   latent, disable_pbar=True, seed=0)
