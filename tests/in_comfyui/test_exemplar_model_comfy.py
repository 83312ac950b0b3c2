"""The exemplar mixture as a real ComfyUI MODEL: sampled by ComfyUI's own KSampler."""
from __future__ import annotations

import importlib

import pytest
import torch
from comfyui_nested_diffusion.demo_models.exemplar.exemplars import (
    default_exemplars,
    distinct_exemplars,
    manifold_distance,
    posterior_mean_ve,
)

SPREAD = 0.05
CASES = [("eps", "normal"), ("v_prediction", "normal"), ("flow", "normal"), ("flow", "simple")]


@pytest.fixture(scope="module")
def em(pack):
    return importlib.import_module(f"{pack.__name__}.demo_models.exemplar.nodes")


@pytest.fixture(scope="module")
def exemplars() -> torch.Tensor:
    return default_exemplars(32)


@pytest.fixture(scope="module")
def diffusion_space(em, exemplars):
    """The exemplars and spread as the denoiser sees them: pixels times the model's latent scale."""
    scale = em.DEFAULT_LATENT_SCALE
    return exemplars * scale, SPREAD * scale


def ksample(model, seed, cfg, scheduler, positive, negative, batch=4, size=(32, 32)) -> torch.Tensor:
    import nodes

    latent = {"samples": torch.zeros(batch, 3, *size)}
    (out,) = nodes.KSampler().sample(model, seed, 30, cfg, "euler", scheduler, positive, negative, latent)
    return out["samples"]


@pytest.mark.parametrize("prediction,scheduler", CASES)
def test_ksampler_lands_on_exemplars(em, exemplars, prediction, scheduler):
    model = em.build_exemplar_model(exemplars, SPREAD, prediction)
    cond = em.empty_conditioning()
    results = [ksample(model, seed, cfg, scheduler, cond, cond) for seed, cfg in ((0, 1.0), (1, 4.0))]
    images = torch.cat(results)
    assert images.shape == (8, 3, 32, 32)
    assert torch.isfinite(images).all()
    distance, _ = manifold_distance(images, exemplars)
    assert distance.max() < 3 * SPREAD, distance.tolist()
    assert distinct_exemplars(images, exemplars, radius=3 * SPREAD) >= 2


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_cfg_with_any_conditioning_matches_unguided(em, exemplars, prediction):
    model = em.build_exemplar_model(exemplars, SPREAD, prediction)
    empty = em.empty_conditioning()
    clip_like = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]
    plain = ksample(model, 5, 1.0, "normal", empty, empty, batch=2)
    guided = ksample(model, 5, 4.0, "normal", empty, clip_like, batch=2)
    assert torch.isfinite(guided).all()
    assert torch.allclose(plain, guided, atol=1e-4)


@pytest.mark.parametrize("prediction", ["eps", "v_prediction", "flow"])
def test_denoised_inside_real_sampling_is_exact(em, exemplars, diffusion_space, prediction):
    """Every x0 the sampler sees (cond and uncond batched, cfg 4) is the posterior mean at its sigma."""
    import comfy.sample
    import comfy.samplers

    model = em.build_exemplar_model(exemplars, SPREAD, prediction, shift=3.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 12)
    mus, spread = diffusion_space
    errors = []

    def callback(step, x0, x, total_steps):
        s = sigmas[step].item()
        if prediction != "flow":
            errors.append((x0 - posterior_mean_ve(x, s, mus, spread)).abs().max().item())
        elif s < 1.0:  # VE-equivalent form of the flow latent
            errors.append((x0 - posterior_mean_ve(x / (1 - s), s / (1 - s), mus, spread)).abs().max().item())

    cond = em.empty_conditioning()
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    comfy.sample.sample_custom(model, noise, 4.0, comfy.samplers.sampler_object("euler"), sigmas, cond, cond,
                               torch.zeros(2, 3, 32, 32), callback=callback, disable_pbar=True, seed=3)
    assert len(errors) >= 11
    assert max(errors) < 1e-4, errors


def noisy_input(diffusion_space, sigma: float, flow: bool) -> torch.Tensor:
    mus, spread = diffusion_space
    gen = torch.Generator().manual_seed(11)
    x0 = mus[[1, 6]] + spread * torch.randn(2, 3, 32, 32, generator=gen)
    noise = torch.randn(2, 3, 32, 32, generator=gen)
    return (1 - sigma) * x0 + sigma * noise if flow else x0 + sigma * noise


@pytest.mark.parametrize("prediction", ["eps", "v_prediction"])
def test_denoised_equals_posterior_mean_eps_v(em, exemplars, diffusion_space, prediction):
    model = em.build_exemplar_model(exemplars, SPREAD, prediction).model
    mus, spread = diffusion_space
    on_grid = model.model_sampling.sigmas[400].item()  # timestep(sigma) is exact on the schedule
    x = noisy_input(diffusion_space, on_grid, flow=False)
    sigma = torch.full((2,), on_grid)
    got = model.apply_model(x, sigma)
    assert torch.allclose(got, posterior_mean_ve(x, on_grid, mus, spread), atol=1e-4)
    # Off the grid the timestep is rounded; the sigma ComfyUI's sampler passes along keeps it exact.
    off_grid = 0.8 * on_grid + 0.2 * model.model_sampling.sigmas[401].item()
    x = noisy_input(diffusion_space, off_grid, flow=False)
    sigma = torch.full((2,), off_grid)
    got = model.apply_model(x, sigma, transformer_options={"sigmas": sigma})
    assert torch.allclose(got, posterior_mean_ve(x, off_grid, mus, spread), atol=1e-4)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_denoised_equals_posterior_mean_flow(em, exemplars, diffusion_space, shift):
    model = em.build_exemplar_model(exemplars, SPREAD, "flow", shift=shift).model
    mus, spread = diffusion_space
    assert model.model_sampling.shift == shift
    s = 0.6
    x = noisy_input(diffusion_space, s, flow=True)
    got = model.apply_model(x, torch.full((2,), s))
    expected = posterior_mean_ve(x / (1 - s), s / (1 - s), mus, spread)  # VE-equivalent form
    assert torch.allclose(got, expected, atol=1e-4)
    at_max = model.apply_model(x, torch.ones(2))  # flow schedules start at sigma = 1
    assert torch.allclose(at_max, mus.mean(0, keepdim=True).expand_as(at_max), atol=1e-4)


def test_wrong_latent_size_is_a_clear_error(em, exemplars):
    model = em.build_exemplar_model(exemplars, SPREAD, "eps")
    cond = em.empty_conditioning()
    with pytest.raises(ValueError, match="does not match"):
        ksample(model, 0, 1.0, "normal", cond, cond, batch=1, size=(16, 16))


def test_node_schema_and_outputs(em, exemplars):
    node = em.NestedExemplarModel
    schema = node.define_schema()
    assert schema.node_id == "NestedExemplarModel"
    assert [i.id for i in schema.inputs] == ["prediction", "spread", "image_size", "shift", "latent_scale", "exemplars"]
    assert schema.inputs[-1].optional
    out = node.execute(prediction="v_prediction", spread=0.1, image_size=48, shift=1.0, latent_scale=0.125)
    model, conditioning = out.result
    assert model.model.diffusion_model.exemplars.shape == (8, 3, 48, 48)
    assert model.model.model_type.name == "V_PREDICTION"
    assert model.get_model_object("latent_format").latent_channels == 3
    assert conditioning[0][0].shape == (1, 1, 8)
    assert model.model.process_latent_in(torch.ones(1)).item() == pytest.approx(0.125)


def test_node_exemplar_image_overrides_builtins(em):
    image = torch.rand(3, 24, 40, 3)  # ComfyUI IMAGE: [B, H, W, C] in [0, 1]
    model, _ = em.NestedExemplarModel.execute(
        prediction="flow", spread=0.05, image_size=32, shift=2.0, exemplars=image
    ).result
    pixels = model.model.diffusion_model.exemplars / em.DEFAULT_LATENT_SCALE
    assert torch.allclose(pixels, image.permute(0, 3, 1, 2) * 2 - 1, atol=1e-6)
    cond = em.empty_conditioning()
    images = ksample(model, 0, 1.0, "simple", cond, cond, batch=2, size=(24, 40))
    distance, _ = manifold_distance(images, pixels)
    assert distance.max() < 3 * 0.05


def test_rgba_image_drops_alpha(em):
    image = torch.rand(2, 16, 16, 4)
    assert torch.allclose(em.image_to_exemplars(image), image[..., :3].permute(0, 3, 1, 2) * 2 - 1)


def test_pixel_space_vae_shows_the_exemplars(em, exemplars):
    import comfy.sd

    vae = comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})  # what VAELoader's "pixel_space" builds
    image = vae.decode(exemplars)
    assert image.shape == (8, 32, 32, 3)
    assert torch.allclose(em.image_to_exemplars(image), exemplars, atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "flow"])
def test_exemplar_prompt_samples_only_the_named_exemplars(em, exemplars, prediction):
    model, _ = em.NestedExemplarModel.execute(prediction=prediction, spread=SPREAD, image_size=32,
                                              shift=1.0, latent_scale=0.125).result
    (wanted,) = em.NestedExemplarPrompt.execute(model=model, text="Red Disc, 8").result
    anything = em.empty_conditioning()
    images = ksample(model, 3, 1.0, "normal", wanted, anything, batch=8)
    distance, nearest = manifold_distance(images, exemplars)
    assert distance.max() < 3 * SPREAD
    assert set(nearest.tolist()) <= {0, 7} and len(set(nearest.tolist())) == 2
    unconditional = ksample(model, 3, 1.0, "normal", anything, anything, batch=8)
    assert len(set(manifold_distance(unconditional, exemplars)[1].tolist())) > 2
    guided = ksample(model, 3, 3.0, "normal", wanted, anything, batch=8)  # CFG towards the prompt still lands on it
    assert set(manifold_distance(guided, exemplars)[1].tolist()) <= {0, 7}


def test_exemplar_prompt_rejects_unknown_names(em):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    model, _ = em.NestedExemplarModel.execute(prediction="eps", spread=SPREAD, image_size=32).result
    with pytest.raises(NestedDiffusionError, match="purple elephant.*red disc"):
        em.NestedExemplarPrompt.execute(model=model, text="red disc, purple elephant")
    with pytest.raises(NestedDiffusionError, match="numbers 1 to 8"):
        em.NestedExemplarPrompt.execute(model=model, text="9")
