"""The learned digits models (demo_models/digits) as real ComfyUI MODELs, sampled by ComfyUI's own samplers."""
import pytest
import torch
from comfy_helpers import run_node

STEPS = 20
PER_CLASS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: these small batches gain nothing from two, and two threads on a busy 2-core machine
    crawl (each waits for the other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["eps", "flow", "v"])
def digits(request, pack):
    from comfyui_nested_diffusion.demo_models.digits.nodes import NestedDigitsModel

    return request.param, run_node(NestedDigitsModel, variant=request.param)[0]


def prompt(digit: str) -> list:
    from comfyui_nested_diffusion.demo_models.digits.nodes import NestedDigitsPrompt

    return run_node(NestedDigitsPrompt, digit=digit)[0]


def latent(batch: int) -> dict:
    return {"samples": torch.zeros(batch, 3, 16, 16)}


def ksampler(model, positive, negative, batch, seed, cfg, steps=STEPS):
    import nodes

    out = nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent(batch))[0]["samples"]
    assert out.shape == (batch, 3, 16, 16) and torch.isfinite(out).all()
    return out


def test_prompt_node_encodes_the_digit_and_any_as_zero(pack):
    from comfyui_nested_diffusion.demo_models.digits.data import CONTEXT_DIM

    (context, extras), = prompt("7")
    assert context.shape == (1, 1, CONTEXT_DIM) and extras == {}
    assert int(context[0, 0].argmax()) == 7 and float(context.sum()) == 1.0
    (anything, _), = prompt("any")
    assert anything.shape == (1, 1, CONTEXT_DIM) and float(anything.abs().sum()) == 0.0


def test_nodes_are_registered(pack):
    from comfyui_nested_diffusion.nodes import all_nodes

    ids = {node.define_schema().node_id for node in all_nodes()}
    assert {"NestedDigitsModel", "NestedDigitsPrompt"} <= ids


def test_loader_builds_a_comfy_model_from_the_shipped_weights(digits, pack):
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.model_base
    import comfy.model_patcher
    import comfy.model_sampling
    from comfyui_nested_diffusion.demo_models.digits.model import read_weights, weights_path

    variant, model = digits
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    assert isinstance(model.model, comfy.model_base.BaseModel)
    assert isinstance(model.model.diffusion_model, openaimodel.UNetModel)
    assert model.model.latent_format.latent_channels == 3
    config, state = read_weights(weights_path(variant))
    assert config["variant"] == variant
    loaded = model.model.diffusion_model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[key], state[key].float()) for key in state)
    sampling = model.get_model_object("model_sampling")
    if variant == "flow":
        assert model.model.model_type == comfy.model_base.ModelType.FLOW
        assert isinstance(sampling, comfy.model_sampling.CONST)
        assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow)
        assert sampling.shift == config["shift"] and float(sampling.sigma_max) == pytest.approx(1.0)
    else:
        expected = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[variant]
        assert model.model.model_type == expected
        assert isinstance(sampling, comfy.model_sampling.EPS)
        assert isinstance(sampling, comfy.model_sampling.V_PREDICTION) == (variant == "v")
        assert not isinstance(sampling, comfy.model_sampling.CONST)
        assert float(sampling.sigma_max) == pytest.approx(14.6146, rel=1e-3)  # the SD1.5 schedule


def test_ksampler_draws_the_requested_digits(digits, pack):
    """ComfyUI's KSampler path with CFG: the metric's classifier reads the requested digit (chance: 10%)."""
    from comfyui_nested_diffusion.demo_models.digits.metrics import class_accuracy

    _, model = digits
    negative = prompt("any")
    samples = torch.cat([ksampler(model, prompt(str(d)), negative, PER_CLASS, seed=d, cfg=3.0) for d in range(10)])
    labels = torch.arange(10).repeat_interleave(PER_CLASS)
    assert class_accuracy(samples, labels) >= 0.7
    # KSampler hands back pixels (the digits' mean is -0.39), not the model's centred latents (mean 0)
    assert abs(float(samples.mean()) + 0.39) < 0.12


def test_any_prompt_gives_varied_digits_and_a_digit_prompt_one_digit(digits, pack):
    from comfyui_nested_diffusion.demo_models.digits.metrics import predict

    _, model = digits
    anything = predict(ksampler(model, prompt("any"), prompt("any"), 20, seed=5, cfg=1.0))
    sevens = predict(ksampler(model, prompt("7"), prompt("any"), 20, seed=5, cfg=3.0))
    assert len(set(anything.tolist())) >= 5
    # The metric's classifier reads 91% of real held-out 7s as 7 and the model's CFG-3 sevens at about 65-80%; the
    # prompt must make 7 the majority, several times as common as without it.
    share_of_sevens, share_without = float((sevens == 7).double().mean()), float((anything == 7).double().mean())
    assert share_of_sevens >= 0.5 and share_of_sevens >= 3 * share_without, (share_of_sevens, share_without)


def test_zero_conditioning_of_any_width_means_any(digits, pack):
    """A CLIP-less empty conditioning (here the exemplar model's 8-wide zero token) samples exactly like 'any'."""
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import empty_conditioning

    _, model = digits
    expected = ksampler(model, prompt("any"), prompt("any"), 2, seed=3, cfg=1.0, steps=4)
    zero = empty_conditioning()
    assert zero[0][0].shape[-1] != prompt("any")[0][0].shape[-1]
    assert torch.allclose(ksampler(model, zero, zero, 2, seed=3, cfg=1.0, steps=4), expected, atol=1e-5)
    with pytest.raises(Exception, match="Digits Prompt"):
        bad = [[torch.ones(1, 1, 8), {}]]
        ksampler(model, bad, bad, 1, seed=3, cfg=1.0, steps=2)


def test_sampler_custom_and_nested_ksampler_accept_the_model(digits, pack):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, SamplerCustom
    from comfyui_nested_diffusion.demo_models.digits.metrics import predict
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    _, model = digits
    sigmas = BasicScheduler.execute(model, "normal", STEPS, 1.0).args[0]
    sampler = KSamplerSelect.execute("euler").args[0]
    output, _ = SamplerCustom.execute(model, True, 1, 3.0, prompt("4"), prompt("any"), sampler, sigmas, latent(6)).args
    assert float((predict(output["samples"]) == 4).double().mean()) >= 0.8
    samples, previews = run_node(NestedKSampler, model=model, seed=2, outer_steps=2, inner_steps=10, cfg=3.0,
                                 sampler_name="euler", scheduler="normal", positive=prompt("2"), negative=prompt("any"),
                                 latent_image=latent(6), denoise=1.0)
    assert float((predict(samples["samples"]) == 2).double().mean()) >= 0.8


def test_one_outer_step_of_nested_ksampler_is_exactly_ksampler(digits, pack):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    import nodes

    _, model = digits
    positive, negative = prompt("3"), prompt("any")
    vanilla = nodes.common_ksampler(model, 11, 8, 2.0, "euler", "normal", positive, negative, latent(3))[0]["samples"]
    samples, _ = run_node(NestedKSampler, model=model, seed=11, outer_steps=1, inner_steps=8, cfg=2.0,
                          sampler_name="euler", scheduler="normal", positive=positive, negative=negative,
                          latent_image=latent(3), denoise=1.0)
    assert torch.allclose(samples["samples"], vanilla, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["eps", "flow", "v"])
def test_training_target_is_what_comfy_samples_with(variant, pack):
    """The training loss's target, put through ComfyUI's own ``calculate_denoised`` at the training input, gives
    back the clean latents: the network learns exactly the parametrisation the samplers read (eps, v or flow)."""
    from comfyui_nested_diffusion.demo_models.digits import model as digits_model

    base = digits_model.build_base_model(digits_model.default_config(variant), initialise=True)
    sampling = base.model_sampling
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(8, 3, 16, 16, generator=generator), torch.randn(8, 3, 16, 16, generator=generator)
    sigma = digits_model.sample_sigmas(base, 8, generator)
    s = sigma.reshape(-1, 1, 1, 1)
    if variant == "flow":
        x, target = (1 - s) * x0 + s * noise, noise - x0
    elif variant == "eps":
        x, target = x0 + s * noise, noise
    else:
        x = x0 + s * noise
        c_skip, c_out = digits_model.v_coefficients(base, s)
        target = (c_skip * x - x0) / c_out
        # SD2's v = alpha eps - sigma_t x0 of the variance-preserving state, in ComfyUI's sigma units
        assert torch.allclose(target, (noise - s * x0) / (1 + s**2).sqrt(), atol=1e-4)
    assert torch.allclose(sampling.calculate_denoised(sigma, target, x), x0, atol=1e-4)
    # the loss compares the output recovered from the denoised estimate with that target: a model whose denoised
    # estimate is exactly x0 scores zero, an untrained one does not
    context = torch.zeros(8, 1, 10)
    untrained = digits_model.training_loss(base, x0, context, torch.Generator().manual_seed(1))
    base.apply_model = lambda x, sigma, **kwargs: x0  # this test's own model object, an oracle denoiser
    oracle = digits_model.training_loss(base, x0, context, torch.Generator().manual_seed(1))
    assert untrained.item() > 0.1 and oracle.item() < 1e-8, (untrained.item(), oracle.item())
