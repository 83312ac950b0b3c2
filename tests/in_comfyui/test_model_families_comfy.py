"""The pack on tiny real architectures of every model family, with random weights, inside ComfyUI.

``tiny_models`` builds the models from ComfyUI's own classes (an SD1.5-style ``UNetModel`` in eps and
v-prediction, a Flux transformer and an SD3 MMDiT), so these tests exercise what a real checkpoint of
each family goes through: its model sampling (discrete, ``ModelSamplingFlux``, ``ModelSamplingDiscreteFlow``),
latent format, conditioning extras (Flux ``guidance``, pooled ``y``), CFG with distinct positive and
negative prompts, ComfyUI's model patches and model-sampling nodes. Random weights say nothing about image
quality, so the checks compare with ComfyUI's own samplers, which nested sampling must match (to 1e-5 of
the output's scale) wherever it degenerates to them, and check that guidance, patches and shifts take effect.
"""
from __future__ import annotations

import pytest
import torch
from comfyui_nested_diffusion.tools import models as tiny_models

FAMILIES = ["sd15_eps", "sd15_v", "flux", "sd3"]
SD15_FAMILIES = ["sd15_eps", "sd15_v"]
FLOW_FAMILIES = ["flux", "sd3"]
SIZE = 16
BATCH = 2
CFG = 3.0
TOLERANCE = 1e-5


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the expected output's scale (absolute 1e-5 when it is at most 1).

    Random weights give x0 predictions far from the data (|latent| up to a few hundred for an eps
    UNet); there float32 rounding alone reaches 1e-5 absolute, since the nested outer step
    ``x0 + (x - x0) * s_next / s`` and Euler's ``x + (x - x0) / s * (s_next - s)`` round differently.
    """
    assert actual.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= TOLERANCE * scale, f"max |difference| {error:.3g} > {TOLERANCE:g} x output scale {scale:.3g}"


class Family:
    def __init__(self, name: str):
        self.name = name
        if name in SD15_FAMILIES:
            self.model = tiny_models.tiny_sd15_unet("eps" if name == "sd15_eps" else "v_prediction", seed=1)
            self.positive = tiny_models.conditioning(seed=2)
            self.negative = tiny_models.conditioning(seed=3)
            self.channels = 4
            self.scheduler = "normal"
        else:
            self.model = tiny_models.tiny_flow_model(name, seed=1)
            self.positive = tiny_models.flow_conditioning(seed=2)
            self.negative = tiny_models.flow_conditioning(seed=3)
            self.channels = 16
            self.scheduler = "simple"

    def latent(self, batch: int = BATCH) -> dict:
        return {"samples": torch.zeros(batch, self.channels, SIZE, SIZE)}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are too small to gain from intra-op threads, and on a machine with few, shared cores
    the threads' spin-waiting multiplies this file's CPU time; restored for the other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, pack) -> Family:
    return Family(request.param)


@pytest.fixture(scope="module", params=SD15_FAMILIES)
def sd15(request, pack) -> Family:
    return Family(request.param)


@pytest.fixture(scope="module", params=FLOW_FAMILIES)
def flow(request, pack) -> Family:
    return Family(request.param)


# --- the three ways to sample: KSampler, NestedKSampler, SamplerCustomAdvanced + NestedSampler ---------------

def ksampler(fam: Family, model=None, seed=5, steps=4, sampler_name="euler", scheduler=None, cfg=CFG, latent=None,
             denoise=1.0) -> torch.Tensor:
    import nodes

    return nodes.common_ksampler(model or fam.model, seed, steps, cfg, sampler_name, scheduler or fam.scheduler,
                                 fam.positive, fam.negative, latent or fam.latent(), denoise=denoise)[0]["samples"]


def nested_ksampler(fam: Family, model=None, seed=5, outer_steps=3, inner_steps=4, sampler_name="euler",
                    scheduler=None, cfg=CFG, outer_eta=0.0, inner_solver=None, positive=None, negative=None,
                    latent=None, denoise=1.0, outer_step="auto"):
    """The NestedKSampler node itself (as ComfyUI's executor prepares it); returns (samples, outer_previews)."""
    from comfy_helpers import node_with_hidden
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    node = node_with_hidden(NestedKSampler, unique_id="9")
    output = node.execute(model=model or fam.model, seed=seed, outer_steps=outer_steps, inner_steps=inner_steps, cfg=cfg,
                          sampler_name=sampler_name, scheduler=scheduler or fam.scheduler,
                          positive=positive or fam.positive, negative=negative or fam.negative,
                          latent_image=latent or fam.latent(), denoise=denoise, inner_solver=inner_solver,
                          outer_eta=outer_eta, outer_step=outer_step)
    return output.args


def plan_for(model, sampler_name, scheduler, inner_steps, outer_steps):
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, plan_nested_run

    spec = InnerSolverSpec(sampler_name=sampler_name, scheduler=scheduler, steps=inner_steps)
    return plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, scheduler)


def comfy_sigmas(model, scheduler, steps) -> torch.Tensor:
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    return BasicScheduler.execute(model, scheduler, steps, 1.0).args[0]


def check_nested_output(fam: Family, samples: dict, previews: dict, outer_steps: int, batch: int = BATCH):
    shape = (batch, fam.channels, SIZE, SIZE)
    assert samples["samples"].shape == shape
    assert torch.isfinite(samples["samples"]).all()
    assert previews["samples"].shape == (outer_steps * batch, *shape[1:])
    assert torch.isfinite(previews["samples"]).all()
    # the result is the last inner diffusion's output
    assert_same(previews["samples"][-batch:], samples["samples"])


# --- every family -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_nested_runs_with_cfg_give_finite_outputs_of_the_right_shape(family, sampler_name):
    outer, inner = 3, 4
    samples, previews = nested_ksampler(family, outer_steps=outer, inner_steps=inner, sampler_name=sampler_name)
    check_nested_output(family, samples, previews, outer)
    assert previews["nested_nfe"] == [inner * (k + 1) for k in range(outer)]
    # the anytime images change from one outer step to the next (the model is really evaluated)
    first, last = previews["samples"][:BATCH], previews["samples"][-BATCH:]
    assert not torch.allclose(first, last, atol=1e-3)


def test_guidance_and_both_prompts_reach_the_inner_steps(family):
    base, _ = nested_ksampler(family, sampler_name="dpmpp_2m")
    swapped, _ = nested_ksampler(family, sampler_name="dpmpp_2m", positive=family.negative, negative=family.positive)
    no_cfg, _ = nested_ksampler(family, sampler_name="dpmpp_2m", cfg=1.0)
    assert not torch.allclose(base["samples"], swapped["samples"], atol=1e-3)
    assert not torch.allclose(base["samples"], no_cfg["samples"], atol=1e-3)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_one_outer_step_is_ksampler(family, sampler_name):
    samples, previews = nested_ksampler(family, seed=7, outer_steps=1, inner_steps=5, sampler_name=sampler_name)
    vanilla = ksampler(family, seed=7, steps=5, sampler_name=sampler_name)
    check_nested_output(family, samples, previews, 1)
    assert_same(samples["samples"], vanilla)


def test_one_inner_step_is_euler_over_the_outer_schedule(family):
    import comfy.sample
    import comfy.samplers

    outer = 5
    samples, _ = nested_ksampler(family, seed=4, outer_steps=outer, inner_steps=1, sampler_name="euler", outer_step="ddim")
    # ComfyUI's own schedule for outer + 1 steps, less its last non-zero sigma, is the outer schedule
    sigmas = comfy_sigmas(family.model, family.scheduler, outer + 1)
    sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    plan = plan_for(family.model, "euler", family.scheduler, 1, outer)
    assert torch.allclose(plan.outer_sigmas, sigmas.cpu(), atol=1e-6, rtol=1e-6)
    latent_image = family.latent()["samples"]
    noise = comfy.sample.prepare_noise(latent_image, 4)
    vanilla = comfy.sample.sample_custom(family.model, noise, CFG, comfy.samplers.sampler_object("euler"), sigmas,
                                         family.positive, family.negative, latent_image, seed=4)
    assert_same(samples["samples"], vanilla)


@pytest.mark.parametrize("sampler_name", ["dpmpp_2m", "euler_ancestral"])
def test_sampler_path_equals_nested_ksampler(family, sampler_name):
    from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced
    from comfyui_nested_diffusion.nodes.nested_sampler import NestedSampler
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    outer = 3
    spec = InnerSolverSpec(sampler_name=sampler_name, scheduler=family.scheduler, steps=4)
    expected, previews = nested_ksampler(family, seed=8, outer_steps=outer, inner_solver=spec)
    guider = CFGGuider.execute(family.model, family.positive, family.negative, CFG).args[0]
    noise = RandomNoise.execute(8).args[0]
    sampler = NestedSampler.execute(inner_solver=spec, outer_eta=0.0).args[0]
    sigmas = comfy_sigmas(family.model, family.scheduler, outer + 1)
    output, denoised = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, family.latent()).args
    assert torch.isfinite(output["samples"]).all()
    assert_same(output["samples"], expected["samples"])
    assert_same(denoised["samples"], previews["samples"][-BATCH:])


def test_outer_eta_runs_finite_and_reinjects_seeded_noise(family):
    paper = dict(seed=6, outer_steps=3, inner_steps=4, outer_step="ddim")  # outer_eta belongs to the paper's step
    deterministic, deterministic_previews = nested_ksampler(family, outer_eta=0.0, **paper)
    samples, previews = nested_ksampler(family, outer_eta=0.5, **paper)
    again, _ = nested_ksampler(family, outer_eta=0.5, **paper)
    check_nested_output(family, samples, previews, 3)
    assert torch.equal(samples["samples"], again["samples"])
    # the first inner diffusion starts from the same noise; later ones from re-noised states
    assert_same(previews["samples"][:BATCH], deterministic_previews["samples"][:BATCH])
    assert not torch.allclose(samples["samples"], deterministic["samples"], atol=1e-3)


def test_img2img_and_inpainting_like_ksampler(family):
    """denoise < 1 on a non-empty latent with a noise_mask: one outer step is KSampler; more keep the unmasked part."""
    latent = {"samples": torch.randn(BATCH, family.channels, SIZE, SIZE, generator=torch.Generator().manual_seed(0))}
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 4:12, 4:12] = 1.0
    latent["noise_mask"] = mask
    common = dict(seed=14, sampler_name="dpmpp_2m", latent=latent, denoise=0.5)
    one, _ = nested_ksampler(family, outer_steps=1, inner_steps=5, **common)
    assert_same(one["samples"], ksampler(family, steps=5, **common))
    samples, previews = nested_ksampler(family, outer_steps=3, inner_steps=4, **common)
    check_nested_output(family, samples, previews, 3)
    outside = (mask == 0).expand_as(samples["samples"])
    assert_same(samples["samples"][outside], latent["samples"][outside])
    assert not torch.allclose(samples["samples"], latent["samples"], atol=1e-2)


class CountingScale:
    """A model patch like a LoRA's effect: scales the UNet output; records the sigma of every call."""

    def __init__(self, scale: float):
        self.scale = scale
        self.sigmas: list[float] = []

    def __call__(self, apply_model, args):
        self.sigmas.extend(float(s) for s in args["timestep"].flatten().unique())
        return apply_model(args["input"], args["timestep"], **args["c"]) * self.scale


def test_a_model_patch_applies_to_every_inner_step(family):
    wrapper = CountingScale(0.8)
    patched = family.model.clone()
    patched.set_model_unet_function_wrapper(wrapper)
    outer, inner = 3, 4
    samples, _ = nested_ksampler(family, model=patched, seed=9, outer_steps=outer, inner_steps=inner, sampler_name="euler")
    plain, _ = nested_ksampler(family, seed=9, outer_steps=outer, inner_steps=inner, sampler_name="euler")
    assert torch.isfinite(samples["samples"]).all()
    assert not torch.allclose(samples["samples"], plain["samples"], atol=1e-3)
    # the patch saw every model evaluation of every inner diffusion, at the inner schedule's sigmas
    plan = plan_for(family.model, "euler", family.scheduler, inner, outer)
    expected = [float(s) for sigmas in plan.inner_sigmas for s in sigmas[:-1]]
    assert len(wrapper.sigmas) == outer * inner
    assert wrapper.sigmas == pytest.approx(expected, rel=1e-6)
    # and outer_steps=1 on the patched model is still exactly KSampler on the patched model
    one, _ = nested_ksampler(family, model=patched, seed=9, outer_steps=1, inner_steps=inner)
    assert_same(one["samples"], ksampler(family, model=patched, seed=9, steps=inner))


# --- SD1.5 family: FreeU and EDM model sampling ----------------------------------------------------------------------

def test_freeu_v2_patch_on_the_unet(sd15):
    from comfy_extras.nodes_freelunch import FreeU_V2

    patched = FreeU_V2().patch(sd15.model, b1=1.3, b2=1.4, s1=0.9, s2=0.2)[0]
    samples, previews = nested_ksampler(sd15, model=patched, seed=10, sampler_name="dpmpp_2m")
    plain, _ = nested_ksampler(sd15, seed=10, sampler_name="dpmpp_2m")
    check_nested_output(sd15, samples, previews, 3)
    assert not torch.allclose(samples["samples"], plain["samples"], atol=1e-3)
    one, _ = nested_ksampler(sd15, model=patched, seed=10, outer_steps=1, inner_steps=4, sampler_name="dpmpp_2m")
    vanilla = ksampler(sd15, model=patched, seed=10, steps=4, sampler_name="dpmpp_2m")
    assert_same(one["samples"], vanilla)


def test_continuous_edm_model_sampling(sd15):
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    sampling = "eps" if sd15.name == "sd15_eps" else "v_prediction"
    patched = ModelSamplingContinuousEDM().patch(sd15.model, sampling=sampling, sigma_max=80.0, sigma_min=0.002)[0]
    plan = plan_for(patched, "euler", "karras", 4, 3)
    assert float(plan.outer_sigmas[0]) == pytest.approx(80.0, rel=1e-4)
    samples, previews = nested_ksampler(sd15, model=patched, seed=11, scheduler="karras", sampler_name="dpmpp_2m")
    check_nested_output(sd15, samples, previews, 3)
    assert previews["nested_sigmas"][0] == pytest.approx(80.0, rel=1e-4)
    one, _ = nested_ksampler(sd15, model=patched, seed=11, outer_steps=1, inner_steps=4, scheduler="karras")
    vanilla = ksampler(sd15, model=patched, seed=11, steps=4, scheduler="karras")
    assert_same(one["samples"], vanilla)


# --- flow family: the model-sampling shift nodes ------------------------------------------------------------------------

def shift_patched(flow: Family):
    """The flow model with ComfyUI's own shift node applied, as a workflow would: Flux -> ModelSamplingFlux
    at 2048x2048 (shift ~3.2 instead of 1.15), SD3 -> ModelSamplingSD3 with shift 6 (instead of 3)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    if flow.name == "flux":
        return ModelSamplingFlux().patch(flow.model, max_shift=1.15, base_shift=0.5, width=2048, height=2048)[0]
    return ModelSamplingSD3().patch(flow.model, shift=6.0)[0]


def test_shift_patch_changes_the_nested_run(flow):
    patched = shift_patched(flow)
    plain_plan = plan_for(flow.model, "euler", flow.scheduler, 4, 3)
    patched_plan = plan_for(patched, "euler", flow.scheduler, 4, 3)
    # a bigger shift keeps the outer sigmas higher for longer
    assert float(patched_plan.outer_sigmas[1]) > float(plain_plan.outer_sigmas[1]) + 0.01
    samples, previews = nested_ksampler(flow, model=patched, seed=12)
    plain, _ = nested_ksampler(flow, seed=12)
    check_nested_output(flow, samples, previews, 3)
    assert previews["nested_sigmas"] == pytest.approx([float(s) for s in patched_plan.outer_sigmas[:-1]], rel=1e-6)
    assert not torch.allclose(samples["samples"], plain["samples"], atol=1e-3)


def image_to_image_patched(flow: Family):
    """The flow model with an image-to-image model sampling patched in, as ComfyUI's ModelSamplingSD3 node patches
    its own: ComfyUI's IMG_TO_IMG_FLOW (0.33.0: WAN21_FlowRVS starts from the video, not from noise) where it exists,
    else a CONST sampling that ignores the noise as IMG_TO_IMG_FLOW does (ComfyUI 0.3.75 has none)."""
    import comfy.model_sampling as sampling_types

    class StartsFromTheImage(sampling_types.CONST):
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    image_to_image = getattr(sampling_types, "IMG_TO_IMG_FLOW", StartsFromTheImage)

    class ImageToImageSampling(sampling_types.ModelSamplingDiscreteFlow, image_to_image):
        pass

    sampling = ImageToImageSampling(flow.model.model.model_config)
    sampling.set_parameters(shift=3.0)
    patched = flow.model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched


def test_a_model_that_starts_from_the_image_takes_one_outer_step_only(flow):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.nodes.planning import outer_noise_matches_model

    patched = image_to_image_patched(flow)
    assert outer_noise_matches_model(flow.model.get_model_object("model_sampling"), flow=True)
    assert outer_noise_matches_model(shift_patched(flow).get_model_object("model_sampling"), flow=True)
    assert not outer_noise_matches_model(patched.get_model_object("model_sampling"), flow=True)
    with pytest.raises(NestedDiffusionError, match=r"outer_steps 3: .*does not start from noise.*outer_steps must be 1"):
        nested_ksampler(flow, model=patched, seed=14, outer_steps=3)
    one, _ = nested_ksampler(flow, model=patched, seed=14, outer_steps=1, inner_steps=4)
    assert_same(one["samples"], ksampler(flow, model=patched, seed=14, steps=4))


def failing_at_call(model, failing_call: int, error: Exception):
    """A clone of ``model`` whose model evaluation number ``failing_call`` (counted from 1) raises ``error``."""
    from comfy_helpers import counting_clone

    def fail_there(calls):
        if calls["n"] == failing_call:
            raise error

    return counting_clone(model, on_call=fail_there)[0]


def test_a_patch_that_fails_at_a_restart_gets_an_error_that_says_so(pack):
    """ComfyUI's LazyCache keeps one state per run and expects its sigmas only to fall: once an inner diffusion
    restarts above its start sigma, its wrapper raises a bare TypeError (0.3.75 and 0.33.0). The run names the inner
    diffusion, the cause and the way out; with one outer step (KSampler) LazyCache works as in KSampler."""
    from comfy_extras.nodes_easycache import LazyCacheNode
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    flux = Family("flux")
    cached = LazyCacheNode.execute(flux.model, 0.2, 0.15, 0.95, False).args[0]
    with pytest.raises(NestedDiffusionError, match=r"inner diffusion \d+ failed after \d+ ran to the end \(TypeError: "
                                                   r".*LazyCache.*set outer_steps to 1") as raised:
        nested_ksampler(flux, model=cached, seed=15, outer_steps=10, inner_steps=2, cfg=1.0)
    assert isinstance(raised.value.__cause__, TypeError)
    one, _ = nested_ksampler(flux, model=cached, seed=15, outer_steps=1, inner_steps=20, cfg=1.0)
    assert_same(one["samples"], ksampler(flux, model=cached, seed=15, steps=20, cfg=1.0))


def test_other_failures_pass_through_unchanged(pack):
    """A failure in the first inner diffusion is what KSampler would meet; Cancel and out of memory are ComfyUI's to
    handle (Cancel's exception is an Exception in 0.3.75, a BaseException in 0.33.0)."""
    import comfy.model_management

    flux = Family("flux")
    cancel = comfy.model_management.InterruptProcessingException
    with pytest.raises(cancel):  # in the second inner diffusion
        nested_ksampler(flux, model=failing_at_call(flux.model, 6, cancel()), outer_steps=3, cfg=1.0)
    with pytest.raises(RuntimeError, match="^boom$"):
        nested_ksampler(flux, model=failing_at_call(flux.model, 2, RuntimeError("boom")), outer_steps=3, cfg=1.0)
    out_of_memory = comfy.model_management.OOM_EXCEPTION
    assert out_of_memory is not Exception
    with pytest.raises(out_of_memory, match="^no room$"):  # in the second inner diffusion (4 calls each)
        nested_ksampler(flux, model=failing_at_call(flux.model, 6, out_of_memory("no room")), outer_steps=3, cfg=1.0)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m"])
def test_one_outer_step_is_ksampler_on_the_shifted_model(flow, sampler_name):
    patched = shift_patched(flow)
    one, _ = nested_ksampler(flow, model=patched, seed=13, outer_steps=1, inner_steps=5, sampler_name=sampler_name)
    vanilla = ksampler(flow, model=patched, seed=13, steps=5, sampler_name=sampler_name)
    unshifted = ksampler(flow, seed=13, steps=5, sampler_name=sampler_name)
    assert not torch.allclose(vanilla, unshifted, atol=1e-3)
    assert_same(one["samples"], vanilla)


def test_tiny_models_are_tiny_and_reproducible(family):
    assert tiny_models.parameter_count(family.model) < 5_000_000
    rebuilt = Family(family.name)
    assert len(rebuilt.model.model.diffusion_model.state_dict()) == len(family.model.model.diffusion_model.state_dict())
    for (name, a), (_, b) in zip(family.model.model.diffusion_model.state_dict().items(),
                                 rebuilt.model.model.diffusion_model.state_dict().items()):
        assert torch.equal(a, b), name
    other = tiny_models.tiny_sd15_unet(seed=2) if family.name in SD15_FAMILIES else tiny_models.tiny_flow_model(family.name, seed=2)
    assert not torch.equal(next(iter(other.model.diffusion_model.parameters())),
                           next(iter(family.model.model.diffusion_model.parameters())))


def test_flux_guidance_from_the_conditioning_reaches_the_model(pack):
    """Flux-dev's distilled guidance travels in the conditioning (as FluxGuidance sets it), not through cfg."""
    flux = Family("flux")
    low = tiny_models.flow_conditioning(seed=2, guidance=1.0)
    default, _ = nested_ksampler(flux, seed=15, cfg=1.0)
    changed, _ = nested_ksampler(flux, seed=15, cfg=1.0, positive=low, negative=low)
    assert torch.isfinite(changed["samples"]).all()
    assert not torch.allclose(default["samples"], changed["samples"], atol=1e-3)


def test_an_empty_latent_is_fitted_to_the_models_compression_as_ksampler_fits_it(pack):
    """ComfyUI after 0.3.75: EmptyLatentImage records ``downscale_ratio_spacial`` (8) and KSampler resizes an empty
    latent to a model that compresses by another factor (Flux2 and Wan 2.2: 16), then drops the key from its output.
    A model compressing by 4 here: where the release resizes, both samplers must give the same 2x larger latent."""
    import inspect

    import comfy.sample

    import nodes

    fam = Family("sd15_eps")
    latent_format = fam.model.get_model_object("latent_format")
    fourfold = type("FourfoldLatents", (type(latent_format),), {"spacial_downscale_ratio": 4})()
    model = fam.model.clone()
    model.add_object_patch("latent_format", fourfold)
    latent = {**fam.latent(), "downscale_ratio_spacial": 8}
    expected, = nodes.common_ksampler(model, 5, 4, CFG, "euler", fam.scheduler, fam.positive, fam.negative, latent)
    samples, _ = nested_ksampler(fam, model=model, outer_steps=1, inner_steps=4, latent=latent)
    resizes = "downscale_ratio_spacial" in inspect.signature(comfy.sample.fix_empty_latent_channels).parameters
    assert samples["samples"].shape[-1] == (2 * SIZE if resizes else SIZE)
    assert_same(samples["samples"], expected["samples"])
    assert set(samples) == {"samples"}  # the ratio described the empty latent, not the sampled one
    assert set(expected) == ({"samples"} if resizes else {"samples", "downscale_ratio_spacial"})
    assert latent["downscale_ratio_spacial"] == 8  # the input LATENT is left as it was
