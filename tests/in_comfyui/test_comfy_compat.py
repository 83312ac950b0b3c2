"""What newer ComfyUI releases added and a sampler pack must honour, on the exact exemplar model:
inner processes see their own schedule in ``transformer_options["sample_sigmas"]`` (ComfyUI's context windows,
hook keyframes and some video models look the current sigma up there), the flow outer step with ``outer_eta``
honours ``model_sampling.noise_scale`` where the version has it, previews of a NestedTensor ``x0`` (multi-latent
models), and the version check at load. Each test runs on whatever ComfyUI the environment holds (0.3.75, 0.33.0).
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch
from comfy_helpers import SPREAD, empty_latent, exemplar_setup, run_node


@pytest.fixture(scope="module")
def eps_family(pack):
    return exemplar_setup(pack, "eps")


def schema_defaults(node_cls) -> dict:
    """A V3 node's input defaults from its own schema (a combo without one: its first option), as the editor fills
    them in: the inputs differ between ComfyUI releases."""
    defaults = {}
    for item in node_cls.define_schema().inputs:
        if getattr(item, "default", None) is not None:
            defaults[item.id] = item.default
        elif getattr(item, "options", None):
            defaults[item.id] = item.options[0]
    return defaults


def recording_clone(model):
    """A clone of ``model`` recording, at every model evaluation, the sigma and the ``sample_sigmas`` it was given."""
    seen = []

    def wrapper(apply_model, args):
        options = args["c"].get("transformer_options", {})
        seen.append((float(args["timestep"].flatten()[0]), options.get("sample_sigmas")))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, seen


def nested_ksampler(model, cond, batch=2, seed=3, outer=3, inner=5, sampler_name="euler", **optional):
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    return run_node(NestedKSampler, model=model, seed=seed, outer_steps=outer, inner_steps=inner, cfg=1.0,
                    sampler_name=sampler_name, scheduler="normal", positive=cond, negative=cond,
                    latent_image=empty_latent(batch), denoise=1.0, **optional)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "heun"])
def test_every_inner_process_sees_its_own_schedule_as_sample_sigmas(eps_family, pack, sampler_name):
    from comfyui_nested_diffusion.nodes.nested_ksampler import solver_spec
    from comfyui_nested_diffusion.nodes.planning import plan_nested_run

    model, cond, _ = eps_family
    recorded, seen = recording_clone(model)
    plan = plan_nested_run(model.get_model_object("model_sampling"), solver_spec(sampler_name, "normal", 5), 3, "normal")
    nested_ksampler(recorded, cond, sampler_name=sampler_name, outer_step="ddim")
    assert len(seen) == plan.nfe_total
    expected = [sigmas for sigmas, cost in zip(plan.inner_sigmas, plan.nfe_per_outer) for _ in range(cost)]
    for (sigma, sample_sigmas), inner in zip(seen, expected):
        assert sample_sigmas is not None
        assert torch.equal(sample_sigmas.cpu(), inner.to(sample_sigmas.dtype).cpu())  # the inner schedule, not the outer
        assert bool(torch.isclose(sample_sigmas.cpu(), torch.tensor(sigma, dtype=sample_sigmas.dtype), rtol=1e-4).any())


def context_windows_model(model, context_length, overlap, dim):
    """ComfyUI's own Context Windows (Manual) node (its other inputs at their defaults)."""
    try:
        context_nodes = importlib.import_module("comfy_extras.nodes_context_windows")
    except ImportError:
        pytest.skip("this ComfyUI has no context windows")
    node = context_nodes.ContextWindowsManualNode
    inputs = {**schema_defaults(node), "model": model, "context_length": context_length,
              "context_overlap": overlap, "dim": dim}
    return node.execute(**inputs).args[0]


def test_context_windows_run_inside_every_inner_diffusion(pack):
    """ComfyUI's context windows look the current sigma up in sample_sigmas ("No sample_sigmas matched current
    timestep" where it is missing): every inner diffusion must see its own schedule there. Windows of 16
    over the 32-wide latent of the tiny SD1.5 UNet (a convolutional model runs on any window)."""
    from comfyui_nested_diffusion.tools import models as tiny_models

    model = tiny_models.tiny_sd15_unet("eps", seed=1)
    cond = tiny_models.conditioning(seed=2)
    widths = []

    def wrapper(apply_model, args):
        widths.append(int(args["input"].shape[-1]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    windowed = context_windows_model(model, context_length=16, overlap=8, dim=3).clone()
    windowed.set_model_unet_function_wrapper(wrapper)
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    samples, previews = run_node(NestedKSampler, model=windowed, seed=3, outer_steps=3, inner_steps=4, cfg=1.0,
                                 sampler_name="euler", scheduler="normal", positive=cond, negative=cond,
                                 latent_image={"samples": torch.zeros(1, 4, 16, 32)}, denoise=1.0, outer_step="ddim")
    assert previews["nested_nfe"] == [4, 8, 12]
    # every evaluation ran on windows (16 wide; 0.33.0 adds a causal fix frame to later ones), several per NFE
    assert max(widths) < 32 and len(widths) > 12
    assert samples["samples"].shape == (1, 4, 16, 32) and bool(torch.isfinite(samples["samples"]).all())


@pytest.mark.parametrize("outer_step, outer_eta", [("ddim", 1.0), ("ddim", 0.5), ("renoise", 0.0), ("trajectory", 0.0)])
def test_flow_outer_steps_honour_the_models_noise_scale(pack, outer_step, outer_eta):
    """ComfyUI 0.21.1 added ``model_sampling.noise_scale`` (flow models whose noise is scaled, e.g.
    HiDream-O1's 8): ``x = (1 - s) x0 + s * noise_scale * eps``. The outer state at every outer sigma must have
    that much noise around the previous inner result, so the fresh noise of ancestral and renoise steps is scaled."""
    import copy

    model, cond, _ = exemplar_setup(pack, "flow", shift=3.0)
    sampling = model.get_model_object("model_sampling")
    if not hasattr(sampling, "set_noise_scale"):
        pytest.skip("this ComfyUI has no model_sampling.noise_scale")
    scaled = copy.deepcopy(sampling)
    scaled.set_noise_scale(8.0)
    patched = model.clone()
    patched.add_object_patch("model_sampling", scaled)
    recorded, seen_inputs = patched, []

    def wrapper(apply_model, args):
        seen_inputs.append((float(args["timestep"].flatten()[0]), args["input"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    recorded.set_model_unet_function_wrapper(wrapper)
    samples, previews = nested_ksampler(recorded, cond, batch=2, outer=3, inner=5, outer_step=outer_step,
                                        outer_eta=outer_eta)
    x0 = recorded.model.process_latent_in(previews["samples"]).reshape(3, 2, *previews["samples"].shape[1:])
    for k in (1, 2):
        sigma, x = seen_inputs[5 * k]  # the first evaluation of inner diffusion k: the outer state (flow: xc = x)
        residual = x - (1 - sigma) * x0[k - 1]
        assert abs(float(residual.std()) / (sigma * 8.0) - 1) < 0.1, f"outer step {k}: {float(residual.std()):.4g} vs {sigma * 8:.4g}"


def test_the_pack_logs_the_comfyui_version_at_load_and_warns_outside_the_tested_range(pack, caplog):
    import comfyui_version
    from comfyui_nested_diffusion.nodes import version_check

    found = version_check.comfyui_version()
    assert found == comfyui_version.__version__ and version_check.parse_version(found) is not None
    assert version_check.TESTED_OLDEST <= version_check.parse_version(found) <= version_check.TESTED_NEWEST
    with caplog.at_level("INFO"):
        message = version_check.log_comfyui_version()
    assert f"ComfyUI {found} (tested on 0.3.75 and 0.33.0)" in message
    assert [r.levelname for r in caplog.records if "nested diffusion: ComfyUI" in r.getMessage()] == ["INFO"]
    for version, warned in [("0.3.60", "older"), ("0.34.1", "newer"), ("1.2.0", "newer"), ("unknown", "could not tell"),
                            ("0.3.75", None), ("0.12.3", None), ("0.33.4", None)]:
        level, message = version_check.version_message(version)
        assert (level == logging.WARNING) == (warned is not None), version
        assert warned is None or warned in message


def test_the_running_server_logged_its_comfyui_version(comfy_server):
    """As a user sees it: the server's log has the line, from ComfyUI's own loading of the pack."""
    import comfyui_version

    log = comfy_server.log_path.read_text(encoding="utf-8", errors="replace")
    assert f"nested diffusion: ComfyUI {comfyui_version.__version__} (tested on 0.3.75 and 0.33.0)" in log


@pytest.fixture
def previews_on():
    """Live previews as a server with --preview-method latent2rgb sends them, captured from ComfyUI's progress hook."""
    import comfy.cli_args
    import comfy.utils
    import latent_preview

    sent = []
    method, hook = comfy.cli_args.args.preview_method, comfy.utils.PROGRESS_BAR_HOOK
    comfy.cli_args.args.preview_method = latent_preview.LatentPreviewMethod.Latent2RGB
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, *args, **kwargs: sent.append((value, total, preview)))
    yield sent
    comfy.cli_args.args.preview_method = method
    comfy.utils.set_progress_bar_global_hook(hook)


def comfy_version() -> tuple[int, ...]:
    try:
        import comfyui_version
    except ImportError:
        return (0,)
    return tuple(int(part) for part in comfyui_version.__version__.split(".")[:3] if part.isdigit())


def test_multi_latent_models_show_their_first_latent_in_previews_and_outer_previews(pack, previews_on):
    """Since ComfyUI 0.30.0 a multi-latent model (video with audio) samples a NestedTensor latent, packed flat for
    the sampler and handed to callbacks as a NestedTensor ``x0``. Its live previews and outer_previews show the first
    latent, as ComfyUI's own previews do. The exact exemplar model
    stands in for such a model: two image latents, packed by ComfyUI, unpacked around every model evaluation."""
    nested_tensor = pytest.importorskip("comfy.nested_tensor", reason="this ComfyUI has no multi-latent models")
    if comfy_version() < (0, 30, 0):
        pytest.skip("before ComfyUI 0.30.0 sampler callbacks get a multi-latent x0 packed flat, not as a NestedTensor")
    import comfy.utils
    from comfy_helpers import IMAGE_SIZE
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    model, cond, exemplars = exemplar_setup(pack, "eps")
    shapes = [(1, 3, IMAGE_SIZE, IMAGE_SIZE)] * 2

    def two_latents(apply_model, args):
        parts = comfy.utils.unpack_latents(args["input"], shapes)
        return comfy.utils.pack_latents([apply_model(part, args["timestep"], **args["c"]) for part in parts])[0]

    multi = model.clone()
    multi.set_model_unet_function_wrapper(two_latents)
    latent = {"samples": nested_tensor.NestedTensor([torch.zeros(shape) for shape in shapes])}
    samples, previews = run_node(NestedKSampler, model=multi, seed=5, outer_steps=3, inner_steps=5, cfg=1.0,
                                 sampler_name="euler", scheduler="normal", positive=cond, negative=cond,
                                 latent_image=latent, denoise=1.0, outer_step="ddim")
    assert samples["samples"].is_nested and previews["nested_nfe"] == [5, 10, 15]
    for part in samples["samples"].unbind():
        assert float(manifold_distance(part, exemplars)[0].max()) <= 3 * SPREAD
    assert previews["samples"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)  # the first latent of every outer step
    assert float(manifold_distance(previews["samples"], exemplars)[0].max()) <= 3 * SPREAD
    assert torch.allclose(previews["samples"][-1:], samples["samples"].unbind()[0], atol=1e-5)
    images = [preview for _, _, preview in previews_on if preview is not None]
    assert len(images) == 3  # one live preview per outer step
