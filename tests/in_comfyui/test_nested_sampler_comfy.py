"""NestedSampler (a SAMPLER) inside ComfyUI's own SamplerCustomAdvanced and SamplerCustom."""
import pytest
import torch
from comfy_helpers import SPREAD, empty_latent, exemplar_setup, nested


@pytest.fixture(scope="module", params=["eps", "flow"])
def family(request, pack):
    return request.param, *exemplar_setup(pack, request.param, shift=3.0 if request.param == "flow" else 1.0)


def custom_advanced(model, cond, latent, seed, sampler, sigmas, cfg=1.0):
    from comfy_extras.nodes_custom_sampler import CFGGuider, RandomNoise, SamplerCustomAdvanced

    guider = CFGGuider.execute(model, cond, cond, cfg).args[0]
    noise = RandomNoise.execute(seed).args[0]
    output, denoised = SamplerCustomAdvanced.execute(noise, guider, sampler, sigmas, latent).args
    return output["samples"], denoised["samples"]


def nested_sampler(inner_solver=None, outer_eta=0.0):
    from comfyui_nested_diffusion.nodes.nested_sampler import NestedSampler

    return NestedSampler.execute(inner_solver=inner_solver, outer_eta=outer_eta).args[0]


def spec(sampler_name, scheduler, steps, eta=None):
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    return InnerSolverSpec(sampler_name=sampler_name, scheduler=scheduler, steps=steps, eta=eta)


@pytest.mark.parametrize("sampler_name,outer_eta", [("euler", 0.0), ("euler_ancestral", 0.0), ("dpmpp_2m", 0.5)])
def test_sampler_path_equals_nested_ksampler(family, pack, sampler_name, outer_eta):
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    prediction, model, cond, exemplars = family
    inner = spec(sampler_name, "normal", 5)
    expected, previews = nested(pack, model, cond, empty_latent(3), seed=8, outer_steps=3, inner_steps=5, cfg=2.0,
                                scheduler="normal", inner_solver=inner, outer_eta=outer_eta)
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    sigmas = BasicScheduler.execute(model, "normal", 4, 1.0).args[0]
    assert torch.equal(plan_nested_run(model.get_model_object("model_sampling"), inner, 3, "normal").outer_sigmas,
                       torch.cat([sigmas[:3], sigmas[-1:]]))
    output, denoised = custom_advanced(model, cond, empty_latent(3), 8, nested_sampler(inner, outer_eta), sigmas, cfg=2.0)
    assert torch.allclose(output, expected["samples"], atol=1e-5, rtol=0)
    assert torch.allclose(denoised, previews["samples"][-3:], atol=1e-5, rtol=0)


def test_sigmas_from_basic_scheduler_with_the_paper_default(family, pack):
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    prediction, model, cond, exemplars = family
    sigmas = BasicScheduler.execute(model, "simple" if prediction == "flow" else "karras", 5, 1.0).args[0]
    output, denoised = custom_advanced(model, cond, empty_latent(4), 2, nested_sampler(), sigmas)
    assert output.shape == (4, 3, 32, 32) and torch.isfinite(output).all()
    distances, _ = manifold_distance(output, exemplars)
    assert float(distances.max()) <= 3 * SPREAD
    assert torch.allclose(denoised, output, atol=1e-5)


def test_sigmas_ending_above_zero_return_the_noisy_outer_state(family, pack):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, SplitSigmas

    prediction, model, cond, _ = family
    sigmas = BasicScheduler.execute(model, "normal", 6, 1.0).args[0]
    high, _ = SplitSigmas.execute(sigmas, 3).args
    output, denoised = custom_advanced(model, cond, empty_latent(2), 2, nested_sampler(spec("euler", "normal", 4)), high)
    assert torch.isfinite(output).all()
    # the output still carries noise at sigma high[-1]; the denoised output is the last inner result
    assert float((output - denoised).std()) > 0.1 * float(high[-1]) * (0.0 if prediction == "flow" else 1.0)
    assert not torch.allclose(output, denoised, atol=1e-3)


def test_bad_sigmas_get_a_clear_error(family, pack):
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    _, model, cond, _ = family
    with pytest.raises(NestedDiffusionError, match="strictly decreasing"):
        custom_advanced(model, cond, empty_latent(1), 2, nested_sampler(), torch.tensor([1.0, 2.0, 0.0]))


def test_a_long_bad_schedule_gets_a_short_error_naming_where(family, pack):
    """Found by the API fuzzer: BasicScheduler with thousands of steps repeats sigmas, and the error listed all of them
    (6660 characters)."""
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError

    _, model, cond, _ = family
    sigmas = torch.cat([torch.linspace(14.0, 1.0, 1500), torch.tensor([1.0]), torch.linspace(0.9, 0.0, 1500)])
    with pytest.raises(NestedDiffusionError, match=r"sigma 1499 \(1\) is not above sigma 1500 \(1\)") as error:
        custom_advanced(model, cond, empty_latent(1), 2, nested_sampler(), sigmas)
    assert len(str(error.value)) < 300 and "3001 values" in str(error.value)


def test_an_error_about_outer_steps_says_they_come_from_the_sigmas(family, pack):
    """NestedSampler has no outer_steps input: an error naming it says where its count came from (found by the fuzzer:
    "step_schedule lists 1 inner step counts but outer_steps is 9999")."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    _, model, cond, _ = family
    sigmas = BasicScheduler.execute(model, "normal", 30, 1.0).args[0]
    inner = InnerSolverSpec(sampler_name="euler", scheduler="normal", steps=5, step_schedule="5,5")
    with pytest.raises(NestedDiffusionError, match=r"outer_steps is 29.*the 29 outer steps of the connected sigmas, 31 values"):
        custom_advanced(model, cond, empty_latent(1), 2, nested_sampler(inner), sigmas)


def test_basic_and_dual_cfg_guiders_drive_the_nested_sampler(family, pack):
    from comfy_extras.nodes_custom_sampler import BasicGuider, BasicScheduler, DualCFGGuider, RandomNoise, SamplerCustomAdvanced
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    prediction, model, cond, exemplars = family
    sigmas = BasicScheduler.execute(model, "normal", 4, 1.0).args[0]
    sampler = nested_sampler(spec("euler", "normal", 6))
    guiders = [BasicGuider.execute(model, cond).args[0], DualCFGGuider.execute(model, cond, cond, cond, 2.0, 1.5, "regular").args[0]]
    outputs = []
    for guider in guiders:
        output, denoised = SamplerCustomAdvanced.execute(RandomNoise.execute(5).args[0], guider, sampler, sigmas,
                                                         empty_latent(2)).args
        distances, _ = manifold_distance(output["samples"], exemplars)
        assert float(distances.max()) <= 3 * SPREAD
        outputs.append(output["samples"])
    # the exact model ignores conditioning, so every guider must give the same image
    assert torch.allclose(outputs[0], outputs[1], atol=1e-4)


def latent_tensors_reachable(root, latent_shape) -> list:
    """Tensors with the latent's image size that ``root`` still references (walking its attributes, not into modules)."""
    import gc
    import types

    seen, found, todo = set(), [], [root]
    while todo and len(seen) < 200_000:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, torch.nn.Module)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if tuple(obj.shape[-2:]) == tuple(latent_shape[-2:]):
                found.append(obj)
            continue
        todo.extend(gc.get_referents(obj))
    return found


def test_a_sampler_output_keeps_no_images_after_its_run(family, pack):
    """The SAMPLER is ComfyUI's cached output of NestedSampler: it lives as long as the graph keeps the node, so a run
    through SamplerCustomAdvanced must leave no inner results in it (it has no outer_previews output to fill)."""
    from comfy_extras.nodes_custom_sampler import BasicScheduler

    _, model, cond, _ = family
    sampler = nested_sampler(spec("euler", "normal", 3))
    sigmas = BasicScheduler.execute(model, "normal", 5, 1.0).args[0]
    latent = empty_latent(4)
    output, _ = custom_advanced(model, cond, latent, 3, sampler, sigmas)
    assert torch.isfinite(output).all()
    assert sampler.last_result is not None  # it did run
    assert latent_tensors_reachable(sampler, latent["samples"].shape) == []
