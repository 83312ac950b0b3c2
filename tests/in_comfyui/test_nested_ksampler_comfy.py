"""NestedKSampler inside a real ComfyUI, on the exact exemplar-mixture model (eps, v-prediction, flow)."""
import pytest
import torch
from comfy_helpers import SPREAD, empty_latent, exemplar_setup, ksampler, nested

PREDICTIONS = ["eps", "v_prediction", "flow"]
ON_MANIFOLD = 3 * SPREAD


def scheduler_for(prediction: str) -> str:
    return "simple" if prediction == "flow" else "normal"


@pytest.fixture(scope="module", params=PREDICTIONS)
def family(request, pack):
    model, cond, exemplars = exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)
    return request.param, model, cond, exemplars


def manifold_distance(images, exemplars):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance as distance

    return distance(images, exemplars)


def test_nfes_equal_outer_times_inner_and_previews_are_on_the_manifold(family, pack):
    prediction, model, cond, exemplars = family
    outer, inner, batch = 4, 8, 8
    samples, previews = nested(pack, model, cond, empty_latent(batch), seed=3, outer_steps=outer, inner_steps=inner,
                               sampler_name="euler", scheduler=scheduler_for(prediction))
    assert previews["nested_nfe"] == [inner * (k + 1) for k in range(outer)]
    assert previews["nested_nfe_total"] == outer * inner
    assert previews["samples"].shape == (outer * batch, 3, 32, 32)
    distances, _ = manifold_distance(previews["samples"], exemplars)
    assert float(distances.max()) <= ON_MANIFOLD, distances.reshape(outer, batch)
    final = previews["samples"][-batch:]
    assert torch.equal(samples["samples"], final)


def test_vanilla_x0_at_the_first_outer_boundary_is_off_the_manifold(family, pack):
    prediction, model, cond, exemplars = family
    outer, inner, batch = 4, 8, 8
    _, vanilla_x0 = ksampler(model, cond, empty_latent(batch), seed=3, steps=outer * inner, sampler_name="euler",
                             scheduler=scheduler_for(prediction), x0_at_step=inner - 1)
    _, previews = nested(pack, model, cond, empty_latent(batch), seed=3, outer_steps=outer, inner_steps=inner,
                         scheduler=scheduler_for(prediction))
    vanilla_distance, _ = manifold_distance(vanilla_x0, exemplars)
    nested_distance, _ = manifold_distance(previews["samples"][:batch], exemplars)
    assert float(vanilla_distance.median()) > ON_MANIFOLD
    assert float(nested_distance.mean()) * 20 <= float(vanilla_distance.mean())


def test_final_images_as_good_and_as_diverse_as_ksampler(family, pack):
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import distinct_exemplars

    prediction, model, cond, exemplars = family
    outer, inner, batch = 4, 8, 32  # 8 exemplars: 16 draws miss one about half the time, for either sampler
    vanilla = ksampler(model, cond, empty_latent(batch), seed=11, steps=outer * inner, scheduler=scheduler_for(prediction))
    samples, _ = nested(pack, model, cond, empty_latent(batch), seed=11, outer_steps=outer, inner_steps=inner,
                        scheduler=scheduler_for(prediction))
    vanilla_distance, _ = manifold_distance(vanilla, exemplars)
    nested_distance, _ = manifold_distance(samples["samples"], exemplars)
    assert float(nested_distance.mean()) <= 1.5 * float(vanilla_distance.mean()) + 1e-3
    reached_vanilla = distinct_exemplars(vanilla, exemplars, ON_MANIFOLD)
    reached_nested = distinct_exemplars(samples["samples"], exemplars, ON_MANIFOLD)
    assert reached_nested >= 0.9 * reached_vanilla and reached_nested >= 3


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "heun", "euler_ancestral"])
def test_one_outer_step_is_exactly_ksampler(family, pack, sampler_name):
    prediction, model, cond, _ = family
    vanilla = ksampler(model, cond, empty_latent(2), seed=5, steps=12, cfg=2.0, sampler_name=sampler_name,
                       scheduler=scheduler_for(prediction))
    samples, _ = nested(pack, model, cond, empty_latent(2), seed=5, outer_steps=1, inner_steps=12, cfg=2.0,
                        sampler_name=sampler_name, scheduler=scheduler_for(prediction))
    assert torch.allclose(samples["samples"], vanilla, atol=1e-5, rtol=0)


def test_one_outer_step_with_denoise_is_exactly_ksampler_img2img(family, pack):
    prediction, model, cond, exemplars = family
    latent = {"samples": exemplars[:2].clone() * 0.8}
    vanilla = ksampler(model, cond, latent, seed=9, steps=10, sampler_name="dpmpp_2m", scheduler=scheduler_for(prediction), denoise=0.55)
    samples, _ = nested(pack, model, cond, latent, seed=9, outer_steps=1, inner_steps=10, sampler_name="dpmpp_2m",
                        scheduler=scheduler_for(prediction), denoise=0.55)
    assert torch.allclose(samples["samples"], vanilla, atol=1e-5, rtol=0)


def test_one_inner_step_is_euler_over_the_outer_schedule(family, pack):
    import comfy.sample
    import comfy.samplers
    from comfyui_nested_diffusion.nested_core import outer_schedule
    from comfyui_nested_diffusion.nodes.planning import schedule_function

    prediction, model, cond, _ = family
    outer = 8
    samples, _ = nested(pack, model, cond, empty_latent(2), seed=4, outer_steps=outer, inner_steps=1,
                        sampler_name="euler", scheduler=scheduler_for(prediction), outer_step="ddim")
    sigmas = outer_schedule(schedule_function(model.get_model_object("model_sampling"), scheduler_for(prediction)), outer)
    latent_image = empty_latent(2)["samples"]
    noise = comfy.sample.prepare_noise(latent_image, 4)
    vanilla = comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond, cond,
                                         latent_image, seed=4)
    assert torch.allclose(samples["samples"], vanilla, atol=1e-5, rtol=0)


def test_same_seed_same_image_and_other_seed_other_image(family, pack):
    prediction, model, cond, _ = family
    kwargs = dict(outer_steps=3, inner_steps=4, sampler_name="euler_ancestral", scheduler=scheduler_for(prediction))
    first, _ = nested(pack, model, cond, empty_latent(4), seed=21, **kwargs)
    again, _ = nested(pack, model, cond, empty_latent(4), seed=21, **kwargs)
    other, _ = nested(pack, model, cond, empty_latent(4), seed=22, **kwargs)
    assert torch.equal(first["samples"], again["samples"])
    assert not torch.allclose(first["samples"], other["samples"])


def test_outer_eta_adds_noise_deterministically(family, pack):
    prediction, model, cond, exemplars = family
    kwargs = dict(outer_steps=4, inner_steps=5, scheduler=scheduler_for(prediction), outer_step="ddim")
    plain, _ = nested(pack, model, cond, empty_latent(8), seed=2, **kwargs)
    noisy, previews = nested(pack, model, cond, empty_latent(8), seed=2, outer_eta=1.0, **kwargs)
    noisy_again, _ = nested(pack, model, cond, empty_latent(8), seed=2, outer_eta=1.0, **kwargs)
    assert torch.equal(noisy["samples"], noisy_again["samples"])
    assert not torch.allclose(plain["samples"], noisy["samples"])
    distances, _ = manifold_distance(previews["samples"], exemplars)
    assert float(distances.max()) <= ON_MANIFOLD


def test_inpainting_keeps_the_unmasked_area(family, pack):
    prediction, model, cond, exemplars = family
    source = exemplars[:2].clone()
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 8:24] = 1.0
    latent = {"samples": source, "noise_mask": mask}
    samples, previews = nested(pack, model, cond, latent, seed=1, outer_steps=3, inner_steps=5,
                               scheduler=scheduler_for(prediction))
    keep = (mask == 0).expand_as(source)
    assert torch.allclose(samples["samples"][keep], source[keep], atol=1e-4)
    assert torch.allclose(previews["samples"][:2][keep], source[keep], atol=1e-4)
    assert samples["noise_mask"] is mask
