"""The inverse-problem node inside a real ComfyUI: super-resolution, inpainting, colorization and denoising on the
exact exemplar model (eps and flow) and the learned digits model, with KSampler and NestedKSampler."""
from __future__ import annotations

import pytest
import torch
from comfy_helpers import IMAGE_SIZE, empty_latent, exemplar_setup, ksampler, nested, run_node

TASKS = ("super_resolution", "inpainting", "colorization", "denoising")
CONSISTENT = 1e-3


@pytest.fixture(scope="module")
def nodes(pack):
    from comfyui_nested_diffusion.nodes import measurement

    return measurement


@pytest.fixture(scope="module")
def eps_setup(pack):
    return exemplar_setup(pack, "eps")


def truth_images(model, cond, batch: int, seed: int = 100) -> torch.Tensor:
    """Ground truth from the exact model itself (KSampler, 30 euler steps), as ComfyUI IMAGE [B, H, W, 3]."""
    samples = ksampler(model, cond, empty_latent(batch), seed=seed, steps=30)
    return ((samples.float() + 1) / 2).movedim(1, -1)


def right_half_mask(size: int = IMAGE_SIZE) -> torch.Tensor:
    mask = torch.zeros(1, size, size)
    mask[:, :, size // 2:] = 1.0
    return mask


def measure(nodes, model, truth, task, factor=2, sigma_y=0.0, seed=0, vae=None):
    """(patched MODEL, LATENT, measurement IMAGE, operator) for ``truth``."""
    mask = right_half_mask(truth.shape[1]) if task == "inpainting" else None
    measured = run_node(nodes.NestedDegradeImage, image=truth, task=task, factor=factor, sigma_y=sigma_y, seed=seed,
                        mask=mask)[0]
    patched, latent, _ = run_node(nodes.NestedInverseProblem, model=model, image=measured, task=task, factor=factor,
                                  sigma_y=sigma_y, mask=mask, vae=vae)
    operator = nodes.measurement_operator(task, factor, mask, measured)
    return patched, latent, measured, operator


def consistency(nodes, operator, pixels, measured_image) -> torch.Tensor:
    """||H x - y|| / ||y|| per image, in [-1, 1] pixel units."""
    y = nodes.measurement_from_image(operator, nodes.image_to_pixels(measured_image))
    return operator.relative_error(pixels, y.repeat(pixels.shape[0] // y.shape[0], 1, 1, 1))  # outer-major previews


@pytest.mark.parametrize("task", TASKS)
def test_ksampler_and_every_nested_preview_agree_with_the_measurement(task, nodes, eps_setup, pack):
    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 4)
    patched, latent, measured, operator = measure(nodes, model, truth, task)
    assert latent["samples"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    vanilla = ksampler(patched, cond, latent, seed=5, steps=12, sampler_name="euler_ancestral")
    assert consistency(nodes, operator, vanilla, measured).max() <= CONSISTENT
    # the patch, not the model, does it: unpatched, some of the 4 samples land on another exemplar than the truth
    unpatched = ksampler(model, cond, latent, seed=5, steps=12, sampler_name="euler_ancestral")
    assert consistency(nodes, operator, unpatched, measured).max() > 0.05
    samples, previews = nested(pack, patched, cond, latent, seed=5, outer_steps=3, inner_steps=4,
                               sampler_name="euler_ancestral")
    outer = previews["samples"].reshape(3, 4, 3, IMAGE_SIZE, IMAGE_SIZE)
    for step in range(3):
        assert consistency(nodes, operator, outer[step], measured).max() <= CONSISTENT, step
    assert consistency(nodes, operator, samples["samples"], measured).max() <= CONSISTENT


def test_super_resolution_latent_is_factor_times_the_image(nodes, eps_setup):
    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 3)
    patched, latent, measured, _ = measure(nodes, model, truth, "super_resolution", factor=4)
    assert measured.shape == (3, 8, 8, 3)
    assert latent["samples"].shape == (3, 3, 32, 32)


@pytest.mark.parametrize("task", ["super_resolution", "inpainting"])
def test_outer_steps_one_equals_ksampler_exactly(task, nodes, eps_setup, pack):
    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 2)
    patched, latent, _, _ = measure(nodes, model, truth, task)
    vanilla = ksampler(patched, cond, latent, seed=9, steps=10, sampler_name="euler_ancestral")
    samples, _ = nested(pack, patched, cond, latent, seed=9, outer_steps=1, inner_steps=10,
                        sampler_name="euler_ancestral")
    assert torch.equal(samples["samples"], vanilla)


def test_flow_model_previews_agree_with_the_measurement(nodes, pack):
    model, cond, _ = exemplar_setup(pack, "flow", shift=3.0)
    truth = truth_images(model, cond, 2)
    patched, latent, measured, operator = measure(nodes, model, truth, "super_resolution", factor=4)
    samples, previews = nested(pack, patched, cond, latent, seed=2, outer_steps=3, inner_steps=4,
                               sampler_name="euler_ancestral", scheduler="simple")
    assert consistency(nodes, operator, previews["samples"], measured).max() <= CONSISTENT
    assert consistency(nodes, operator, samples["samples"], measured).max() <= CONSISTENT


def digits_setup():
    """The learned digits model (eps) and its "any digit" conditioning."""
    from comfyui_nested_diffusion.demo_models.digits.data import ANY, digit_context
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    return load_digits_model("eps"), [[digit_context([ANY]), {}]]


def test_learned_digits_model_colorization_and_super_resolution(nodes, pack):
    model, cond = digits_setup()
    truth = ((ksampler(model, cond, {"samples": torch.zeros(2, 3, 16, 16)}, seed=1, steps=20) + 1) / 2).movedim(1, -1)
    for task in ("super_resolution", "colorization"):
        patched, latent, measured, operator = measure(nodes, model, truth, task)
        samples, previews = nested(pack, patched, cond, latent, seed=4, outer_steps=2, inner_steps=5,
                                   sampler_name="euler_ancestral")
        assert consistency(nodes, operator, previews["samples"], measured).max() <= CONSISTENT, task


def test_noisy_denoising_beats_the_measurement_and_does_not_copy_its_noise(nodes, eps_setup, pack):
    """sigma_y > 0: the solution is closer to the truth than the noisy image is (the model's prior removes noise)."""
    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 4)
    patched, latent, measured, _ = measure(nodes, model, truth, "denoising", sigma_y=0.1, seed=3)
    samples, _ = nested(pack, patched, cond, latent, seed=6, outer_steps=2, inner_steps=10,
                        sampler_name="euler_ancestral")
    solution = (samples["samples"] + 1) / 2
    truth_chw = truth.movedim(-1, 1)
    error_of_solution = (solution - truth_chw).pow(2).mean()
    error_of_measurement = (measured.movedim(-1, 1) - truth_chw).pow(2).mean()
    assert error_of_solution < 0.5 * error_of_measurement


def test_latent_models_are_refused_naming_the_pixel_space_requirement(nodes, pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.tools.models import tiny_sd15_unet

    with pytest.raises(NestedDiffusionError, match="model: the inverse-problem node needs a pixel-space model.*SD15"):
        run_node(nodes.NestedInverseProblem, model=tiny_sd15_unet(), image=torch.rand(1, 16, 16, 3),
                 task="colorization", factor=1, sigma_y=0.0)


def test_bad_inputs_name_the_input(nodes):
    """At the node: sigma_y, the mask; at sampling (the first model call; the digits UNet takes any size): the
    image against the latent's size and batch."""
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    model, cond = digits_setup()
    image = torch.rand(2, 8, 8, 3)

    def inverse(**inputs):
        settings = dict(model=model, image=image, task="super_resolution", factor=2, sigma_y=0.0)
        return run_node(nodes.NestedInverseProblem, **{**settings, **inputs})

    with pytest.raises(NestedDiffusionError, match="sigma_y must be a number >= 0"):
        inverse(sigma_y=-0.1)
    with pytest.raises(NestedDiffusionError, match="mask: inpainting needs a mask"):
        inverse(task="inpainting")
    with pytest.raises(NestedDiffusionError, match="mask is 4x4, but the image is 8x8"):
        inverse(task="inpainting", mask=torch.zeros(1, 4, 4))
    with pytest.raises(NestedDiffusionError, match="mask batch is 3, but the image batch is 2"):
        inverse(task="inpainting", mask=torch.zeros(3, 8, 8))
    patched, latent, _ = inverse()  # 8x8 image x 2 = 16x16 latent
    assert latent["samples"].shape == (2, 3, 16, 16)
    with pytest.raises(NestedDiffusionError, match=r"image is 8x8, but a 8x8 latent at factor 2 needs a 4x4 image"):
        ksampler(patched, cond, {"samples": torch.zeros(2, 3, 8, 8)}, seed=0, steps=2)
    with pytest.raises(NestedDiffusionError, match="image batch is 2, but the latent batch is 3"):
        ksampler(patched, cond, {"samples": torch.zeros(3, 3, 16, 16)}, seed=0, steps=2)
    with pytest.raises(NestedDiffusionError, match="image batch is 2, but the latent batch is 1 .after a pick"):
        ksampler(patched, cond, {"samples": torch.zeros(1, 3, 16, 16)}, seed=0, steps=2)
    patched3, _, _ = inverse(factor=3, image=torch.rand(1, 5, 5, 3))
    with pytest.raises(NestedDiffusionError, match="factor 3 does not divide the latent size 16x16"):
        ksampler(patched3, cond, {"samples": torch.zeros(1, 3, 16, 16)}, seed=0, steps=2)
    patched_gray, _, _ = inverse(task="colorization")
    with pytest.raises(NestedDiffusionError, match="image is 8x8, but the latent is 16x16"):
        ksampler(patched_gray, cond, {"samples": torch.zeros(2, 3, 16, 16)}, seed=0, steps=2)
    with pytest.raises(NestedDiffusionError, match="factor 3 does not divide the image size 8x8"):
        run_node(nodes.NestedDegradeImage, image=image, task="super_resolution", factor=3, sigma_y=0.0, seed=0)


EXACT_SOLVERS = ["euler", "heun", "ddim", "lcm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_sde"]


@pytest.mark.parametrize("sampler_name", EXACT_SOLVERS + ["uni_pc"])
def test_inner_solvers_that_end_on_the_denoised_estimate_give_consistent_previews(sampler_name, nodes, eps_setup, pack):
    """The solvers whose last step to sigma 0 returns the (patched) denoised estimate are consistent to float
    rounding; uni_pc's last step combines several model outputs, so it is close but not exact (docs say so)."""
    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 2)
    patched, latent, measured, operator = measure(nodes, model, truth, "super_resolution", factor=4)
    _, previews = nested(pack, patched, cond, latent, seed=2, outer_steps=3, inner_steps=6, sampler_name=sampler_name)
    worst = float(consistency(nodes, operator, previews["samples"], measured).max())
    if sampler_name in EXACT_SOLVERS:
        assert worst <= 1e-6
    else:
        assert 1e-6 < worst <= 0.05


# ---------------------------------------------------------------------------------------------- through a VAE
@pytest.fixture(scope="module")
def latent_setup(pack):
    """A tiny SD1.5-family UNet (random weights, SD15 latents) and a tiny ComfyUI VAE (TAESD architecture, 8x8
    block-mean weights: an imperfect autoencoder that represents block-flat images exactly, see
    bench/inverse_vae.py), one torch thread."""
    from comfyui_nested_diffusion.bench.inverse_vae import block_mean_vae
    from comfyui_nested_diffusion.tools.models import conditioning, tiny_sd15_unet

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_sd15_unet("eps", seed=1), conditioning(seed=2), block_mean_vae()
    torch.set_num_threads(threads)


def decoded_consistency(nodes, vae, operator, latents, measured_image) -> torch.Tensor:
    return consistency(nodes, operator, nodes.image_to_pixels(vae.decode(latents)), measured_image)


@pytest.mark.parametrize("task,factor", [("super_resolution", 8), ("inpainting", 1)])
def test_latent_model_through_a_vae_gives_decoded_previews_closer_to_the_measurement(task, factor, nodes,
                                                                                     latent_setup, pack):
    """Decode, project, encode at every model call: every decoded outer-step image is far closer to the
    measurement than the unpatched model's, and as close as the VAE can represent it (inpainting of a smooth
    image: the VAE keeps only block means, so about 0.4 remains)."""
    from comfyui_nested_diffusion.bench.inverse_vae import truth_images as vae_truths

    model, cond, vae = latent_setup
    truth = vae_truths("smooth", 2)
    patched, latent, measured, operator = measure(nodes, model, truth, task, factor=factor, vae=vae)
    assert latent["samples"].shape == (2, 4, 8, 8)  # 64x64 pixels through the VAE's downscale 8
    samples, previews = nested(pack, patched, cond, latent, seed=3, outer_steps=2, inner_steps=3,
                               sampler_name="euler_ancestral")
    outer = previews["samples"].reshape(2, 2, 4, 8, 8)
    unpatched = ksampler(model, cond, latent, seed=3, steps=6, sampler_name="euler_ancestral")
    plain = decoded_consistency(nodes, vae, operator, unpatched, measured)
    assert plain.min() > 1.0  # random weights: the unpatched model ignores the measurement
    bound = 1e-3 if task == "super_resolution" else 0.5  # x8 pooling is what the VAE keeps exactly
    for step in range(2):
        error = decoded_consistency(nodes, vae, operator, outer[step], measured)
        assert error.max() <= bound, (step, error)
    assert decoded_consistency(nodes, vae, operator, samples["samples"], measured).max() <= bound


def test_outer_steps_one_through_a_vae_equals_ksampler_exactly(nodes, latent_setup, pack):
    from comfyui_nested_diffusion.bench.inverse_vae import truth_images as vae_truths

    model, cond, vae = latent_setup
    patched, latent, _, _ = measure(nodes, model, vae_truths("smooth", 2), "colorization", factor=1, vae=vae)
    vanilla = ksampler(patched, cond, latent, seed=4, steps=4, sampler_name="euler_ancestral")
    samples, _ = nested(pack, patched, cond, latent, seed=4, outer_steps=1, inner_steps=4,
                        sampler_name="euler_ancestral")
    assert torch.equal(samples["samples"], vanilla)


def test_a_pixel_space_vae_on_a_pixel_space_model_changes_nothing(nodes, eps_setup):
    """A VAE on a pixel-space model is ignored (the exact projection needs none): ComfyUI's pixel_space VAE, as
    VAELoader builds it, gives the same MODEL behaviour and LATENT as no VAE."""
    import comfy.sd

    model, cond, _ = eps_setup
    truth = truth_images(model, cond, 2)
    measured = run_node(nodes.NestedDegradeImage, image=truth, task="super_resolution", factor=4, sigma_y=0.0,
                        seed=0)[0]
    settings = dict(model=model, image=measured, task="super_resolution", factor=4, sigma_y=0.0)
    plain, latent, _ = run_node(nodes.NestedInverseProblem, **settings)
    with_vae, latent_vae, _ = run_node(nodes.NestedInverseProblem, **settings,
                                       vae=comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)}))
    assert torch.equal(latent["samples"], latent_vae["samples"])
    expected = ksampler(plain, cond, latent, seed=1, steps=6, sampler_name="euler_ancestral")
    assert torch.equal(ksampler(with_vae, cond, latent, seed=1, steps=6, sampler_name="euler_ancestral"), expected)


def test_bad_inputs_through_a_vae_name_the_input(nodes, latent_setup):
    """The image against the latent times the VAE's downscale, a solution the VAE cannot encode, a VAE that does
    not belong to the model."""
    import comfy.sd
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    model, cond, vae = latent_setup

    def inverse(**inputs):
        settings = dict(model=model, image=torch.rand(1, 8, 8, 3), task="super_resolution", factor=4, sigma_y=0.0,
                        vae=vae)
        return run_node(nodes.NestedInverseProblem, **{**settings, **inputs})

    patched, latent, _ = inverse()  # 8x8 image x 4 = 32x32 pixels = a 4x4 latent
    assert latent["samples"].shape == (1, 4, 4, 4)
    with pytest.raises(NestedDiffusionError, match=r"image is 8x8, but a 8x8 \(64x64 pixels through the VAE, x8\) "
                                                   r"latent at factor 4 needs a 16x16 image"):
        ksampler(patched, cond, {"samples": torch.zeros(1, 4, 8, 8)}, seed=0, steps=2)
    patched_gray, _, _ = inverse(task="colorization", factor=1, image=torch.rand(1, 64, 64, 3))
    with pytest.raises(NestedDiffusionError, match=r"image is 64x64, but the latent is 4x4 \(32x32 pixels through "
                                                   r"the VAE, x8\): for colorization they must be the same size"):
        ksampler(patched_gray, cond, {"samples": torch.zeros(1, 4, 4, 4)}, seed=0, steps=2)
    with pytest.raises(NestedDiffusionError, match=r"image: the solution is 12x12 pixels .* VAE \(downscale 8\) "
                                                   "cannot encode"):
        inverse(image=torch.rand(1, 3, 3, 3))
    with pytest.raises(NestedDiffusionError, match=r"vae: its latents have 3 channels, but the model's \(SD15\) "
                                                   "have 4"):
        inverse(vae=comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)}))
