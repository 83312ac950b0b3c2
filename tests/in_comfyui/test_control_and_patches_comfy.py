"""ControlNet / T2I-adapter conditioning and attention-patching model patches inside nested runs.

A tiny real ControlNet (ComfyUI's ``comfy.cldm.cldm.ControlNet`` with the tiny SD1.5 UNet's layout) and a tiny
real T2I adapter (``comfy.t2i_adapter.adapter.Adapter``) from ``tiny_control``, applied with ComfyUI's own
``ControlNetApplyAdvanced`` node, and PerturbedAttentionGuidance / SelfAttentionGuidance applied with their own
nodes to the tiny SD1.5 UNet of ``tiny_models`` (SAG needs nothing special: for a 16x16 latent the middle-block
self-attention map is 8x8, which SAG reshapes, thresholds and blurs as it does SD1.5's). The checks: each changes
the nested result; one outer step is still exactly KSampler with the same control or patch (to 1e-5 of the
output's scale); and recorders on the UNet and the control model show the control and the patches' extra passes
at every model evaluation of every inner diffusion, with a ControlNet's start/end percent decided by sigma
exactly as in KSampler (so with end_percent < 1 every inner diffusion that starts above the cut-off sigma is
controlled at its first steps, not only the first outer steps).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pytest
import tiny_control
import torch
from comfyui_nested_diffusion.tools import models as tiny_models

SIZE = 16  # latent side; the hint images are 8x that (128 px)
BATCH = 2
CFG = 3.0
TOLERANCE = 1e-5
STRENGTH = 0.8
OUTER, INNER = 3, 4  # the nested runs with recorders: 12 NFEs


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to 1e-5 of the expected output's scale (as in test_model_families_comfy)."""
    assert actual.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    error = float((actual - expected).abs().max())
    assert error <= TOLERANCE * scale, f"max |difference| {error:.3g} > {TOLERANCE:g} x output scale {scale:.3g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b, atol=1e-3)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads and spin-wait on a machine with few, shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Setup:
    model: object
    positive: list
    negative: list

    def latent(self) -> dict:
        return {"samples": torch.zeros(BATCH, 4, SIZE, SIZE)}

    def controlled(self, control_net, start=0.0, end=1.0, hint_seed=0, positive=None, negative=None):
        """positive/negative through ComfyUI's own ControlNetApplyAdvanced node."""
        import nodes

        hint = tiny_control.hint_image(SIZE, seed=hint_seed)
        return nodes.ControlNetApplyAdvanced().apply_controlnet(positive or self.positive, negative or self.negative,
                                                              control_net, hint, STRENGTH, start, end)


@pytest.fixture(scope="module")
def sd15(pack) -> Setup:
    return Setup(tiny_models.tiny_sd15_unet("eps", seed=1), tiny_models.conditioning(seed=2),
                 tiny_models.conditioning(seed=3))


@pytest.fixture(scope="module")
def controlnet(pack):
    return tiny_control.tiny_controlnet(seed=4)


def ksampler(setup: Setup, model=None, positive=None, negative=None, seed=5, steps=5, sampler_name="euler"):
    import nodes

    return nodes.common_ksampler(model or setup.model, seed, steps, CFG, sampler_name, "normal",
                                 positive or setup.positive, negative or setup.negative, setup.latent())[0]["samples"]


def nested_ksampler(setup: Setup, model=None, positive=None, negative=None, seed=5, outer_steps=OUTER,
                    inner_steps=INNER, sampler_name="euler", inner_solver=None):
    """The NestedKSampler node itself (as ComfyUI's executor prepares it); returns (samples, outer_previews)."""
    from comfy_helpers import node_with_hidden
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler

    node = node_with_hidden(NestedKSampler, unique_id="9")
    return node.execute(model=model or setup.model, seed=seed, outer_steps=outer_steps, inner_steps=inner_steps,
                        cfg=CFG, sampler_name=sampler_name, scheduler="normal", positive=positive or setup.positive,
                        negative=negative or setup.negative, latent_image=setup.latent(), denoise=1.0,
                        inner_solver=inner_solver, outer_eta=0.0).args


def inner_sigmas(model, outer_steps=OUTER, inner_steps=INNER, sampler_name="euler") -> list[list[float]]:
    """The sigma of every model evaluation of the nested run, one list per inner diffusion (euler: one per step)."""
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec, plan_nested_run

    spec = InnerSolverSpec(sampler_name=sampler_name, scheduler="normal", steps=inner_steps)
    plan = plan_nested_run(model.get_model_object("model_sampling"), spec, outer_steps, "normal")
    return [[float(s) for s in sigmas[:-1]] for sigmas in plan.inner_sigmas]


@dataclass
class UNetCall:
    sigma: float
    batch: int
    cond_or_uncond: list
    control: bool  # a control dict reached the UNet
    attn1_replaced: tuple  # the blocks whose self-attention a patch replaces in this call


class UNetRecorder:
    """A UNet function wrapper that changes nothing and records every UNet call."""

    def __init__(self):
        self.calls: list[UNetCall] = []

    def __call__(self, apply_model, args):
        c = args["c"]
        sigmas = args["timestep"].flatten().unique()
        assert sigmas.numel() == 1
        replaced = c["transformer_options"].get("patches_replace", {}).get("attn1", {})
        self.calls.append(UNetCall(float(sigmas[0]), int(args["input"].shape[0]), list(args["cond_or_uncond"]),
                                   c.get("control") is not None, tuple(replaced)))
        return apply_model(args["input"], args["timestep"], **c)

    def evaluations(self, batch_per_evaluation: int = 2 * BATCH) -> list[list[UNetCall]]:
        """The calls grouped by model evaluation: consecutive calls at one sigma that together hold
        ``batch_per_evaluation`` items (cond and uncond of every batch item, batched in one call or not)."""
        groups: list[list[UNetCall]] = []
        filled = batch_per_evaluation
        for call in self.calls:
            if filled == batch_per_evaluation:
                groups.append([])
                filled = 0
            assert not groups[-1] or groups[-1][0].sigma == call.sigma
            groups[-1].append(call)
            filled += call.batch
            assert filled <= batch_per_evaluation
        assert filled == batch_per_evaluation
        return groups

    def sigmas(self, control=None) -> list[float]:
        """The sigma of every model evaluation (only those with / without a control, if ``control`` is given)."""
        out = []
        for group in self.evaluations():
            assert len({call.control for call in group}) == 1
            if control is None or group[0].control == control:
                out.append(group[0].sigma)
        return out


def recorded(model) -> tuple[object, UNetRecorder]:
    recorder = UNetRecorder()
    clone = model.clone()
    clone.set_model_unet_function_wrapper(recorder)
    return clone, recorder


class ControlModelCalls:
    """Counts the control model's forward passes (batch size and timestep of each)."""

    def __init__(self, module: torch.nn.Module):
        self.calls: list[tuple[int, float]] = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((int(kwargs["x"].shape[0]), float(kwargs["timesteps"].flatten()[0])))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def plain_nested(sd15) -> torch.Tensor:
    return nested_ksampler(sd15)[0]["samples"]


@pytest.fixture
def no_dropped_control(caplog):
    """Fails the test if the UNet dropped a control tensor of the wrong shape (ComfyUI only logs a warning)."""
    caplog.set_level(logging.WARNING)
    yield
    dropped = [r.getMessage() for r in caplog.get_records("call") if "control could not be applied" in r.getMessage()]
    assert not dropped, dropped[0]


# --- ControlNet -----------------------------------------------------------------------------------------------------

def test_controlnet_runs_at_every_model_call_of_every_inner_diffusion(sd15, controlnet, plain_nested, no_dropped_control):
    positive, negative = sd15.controlled(controlnet)
    model, unet = recorded(sd15.model)
    with ControlModelCalls(controlnet.control_model) as control:
        samples, previews = nested_ksampler(sd15, model=model, positive=positive, negative=negative)
    assert_differs(samples["samples"], plain_nested)
    nfe = OUTER * INNER
    assert previews["nested_nfe_total"] == nfe
    expected = [s for sigmas in inner_sigmas(sd15.model) for s in sigmas]
    # every UNet call got the control, at every sigma of every inner schedule
    assert unet.sigmas() == pytest.approx(expected, rel=1e-6)
    assert all(call.control for call in unet.calls)
    # the control model ran once per UNet call, on cond and uncond of every batch item at every NFE
    assert len(control.calls) == len(unet.calls)
    assert sum(batch for batch, _ in control.calls) == nfe * 2 * BATCH
    model_sampling = sd15.model.get_model_object("model_sampling")
    timesteps = [float(model_sampling.timestep(torch.tensor(call.sigma))) for call in unet.calls]
    assert [t for _, t in control.calls] == pytest.approx(timesteps, rel=1e-6)


def test_controlnet_end_percent_is_decided_by_sigma_in_every_inner_diffusion(sd15, controlnet, plain_nested):
    """end_percent 0.5 stops the control below the sigma at 50% of the model's schedule, as in KSampler, so each
    inner diffusion that starts above that sigma is controlled at its first steps and not at its last."""
    positive, negative = sd15.controlled(controlnet, end=0.5)
    model, unet = recorded(sd15.model)
    with ControlModelCalls(controlnet.control_model) as control:
        samples, _ = nested_ksampler(sd15, model=model, positive=positive, negative=negative)
    threshold = sd15.model.get_model_object("model_sampling").percent_to_sigma(0.5)
    schedules = inner_sigmas(sd15.model)
    expected = [s for sigmas in schedules for s in sigmas if s >= threshold]
    assert 0 < len(expected) < OUTER * INNER
    assert sum(1 for sigmas in schedules if sigmas[0] >= threshold) >= 2  # the control comes back in a later inner run
    assert unet.sigmas(control=True) == pytest.approx(expected, rel=1e-6)
    assert unet.sigmas(control=False) == pytest.approx(
        [s for sigmas in schedules for s in sigmas if s < threshold], rel=1e-6)
    assert sum(batch for batch, _ in control.calls) == len(expected) * 2 * BATCH
    full_positive, full_negative = sd15.controlled(controlnet)
    full, _ = nested_ksampler(sd15, positive=full_positive, negative=full_negative)
    assert_differs(samples["samples"], plain_nested)
    assert_differs(samples["samples"], full["samples"])


@pytest.mark.parametrize("sampler_name,end", [("euler", 1.0), ("dpmpp_2m", 0.5), ("euler_ancestral", 0.5)])
def test_one_outer_step_with_controlnet_is_ksampler(sd15, controlnet, sampler_name, end, no_dropped_control):
    positive, negative = sd15.controlled(controlnet, end=end)
    one, _ = nested_ksampler(sd15, positive=positive, negative=negative, seed=7, outer_steps=1, inner_steps=5,
                             sampler_name=sampler_name)
    vanilla = ksampler(sd15, positive=positive, negative=negative, seed=7, steps=5, sampler_name=sampler_name)
    assert_differs(vanilla, ksampler(sd15, seed=7, steps=5, sampler_name=sampler_name))
    assert_same(one["samples"], vanilla)


def test_chained_controlnets_with_start_and_end_percent(sd15, controlnet):
    """Two ControlNetApplyAdvanced nodes in a row (the second one chains the first as its previous control)."""
    second = tiny_control.tiny_controlnet(seed=8)
    positive, negative = sd15.controlled(controlnet)
    positive, negative = sd15.controlled(second, start=0.2, end=0.7, hint_seed=1, positive=positive, negative=negative)
    assert positive[0][1]["control"].previous_controlnet is not None
    one, _ = nested_ksampler(sd15, positive=positive, negative=negative, seed=9, outer_steps=1, inner_steps=5)
    assert_same(one["samples"], ksampler(sd15, positive=positive, negative=negative, seed=9, steps=5))
    with ControlModelCalls(second.control_model) as calls:
        samples, _ = nested_ksampler(sd15, positive=positive, negative=negative, seed=9)
    model_sampling = sd15.model.get_model_object("model_sampling")
    high, low = model_sampling.percent_to_sigma(0.2), model_sampling.percent_to_sigma(0.7)
    in_range = [s for sigmas in inner_sigmas(sd15.model) for s in sigmas if low <= s <= high]
    assert 0 < len(in_range) < OUTER * INNER
    assert sum(batch for batch, _ in calls.calls) == len(in_range) * 2 * BATCH
    first_positive, first_negative = sd15.controlled(controlnet)
    only_first, _ = nested_ksampler(sd15, positive=first_positive, negative=first_negative, seed=9)
    assert_differs(samples["samples"], only_first["samples"])


def test_controlled_guider_through_nested_sampler_equals_nested_ksampler(sd15, controlnet):
    from comfy_extras.nodes_custom_sampler import BasicScheduler, CFGGuider, RandomNoise, SamplerCustomAdvanced
    from comfyui_nested_diffusion.nodes.nested_sampler import NestedSampler
    from comfyui_nested_diffusion.nodes.planning import InnerSolverSpec

    positive, negative = sd15.controlled(controlnet, end=0.5)
    spec = InnerSolverSpec(sampler_name="dpmpp_2m", scheduler="normal", steps=INNER)
    expected, _ = nested_ksampler(sd15, positive=positive, negative=negative, seed=8, inner_solver=spec)
    guider = CFGGuider.execute(sd15.model, positive, negative, CFG).args[0]
    sampler = NestedSampler.execute(inner_solver=spec, outer_eta=0.0).args[0]
    sigmas = BasicScheduler.execute(sd15.model, "normal", OUTER + 1, 1.0).args[0]
    output, _ = SamplerCustomAdvanced.execute(RandomNoise.execute(8).args[0], guider, sampler, sigmas, sd15.latent()).args
    assert_same(output["samples"], expected["samples"])


# --- T2I adapter ----------------------------------------------------------------------------------------------------

def test_t2i_adapter(pack, no_dropped_control):
    unet = Setup(tiny_control.tiny_sd15_unet_2rb(seed=1), tiny_models.conditioning(seed=2), tiny_models.conditioning(seed=3))
    adapter = tiny_control.tiny_t2i_adapter(seed=6)
    positive, negative = unet.controlled(adapter)
    model, recorder = recorded(unet.model)
    samples, _ = nested_ksampler(unet, model=model, positive=positive, negative=negative)
    plain, _ = nested_ksampler(unet)
    assert_differs(samples["samples"], plain["samples"])
    assert recorder.sigmas() == pytest.approx([s for sigmas in inner_sigmas(unet.model) for s in sigmas], rel=1e-6)
    assert all(call.control for call in recorder.calls)
    one, _ = nested_ksampler(unet, positive=positive, negative=negative, seed=7, outer_steps=1, inner_steps=5,
                             sampler_name="dpmpp_2m")
    vanilla = ksampler(unet, positive=positive, negative=negative, seed=7, steps=5, sampler_name="dpmpp_2m")
    assert_differs(vanilla, ksampler(unet, seed=7, steps=5, sampler_name="dpmpp_2m"))
    assert_same(one["samples"], vanilla)


# --- attention patches: PAG and SAG -------------------------------------------------------------------------------

def perturbed_attention_guidance(model):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    return PerturbedAttentionGuidance.execute(model, scale=3.0).args[0]


def self_attention_guidance(model):
    from comfy_extras.nodes_sag import SelfAttentionGuidance

    return SelfAttentionGuidance.execute(model, scale=0.5, blur_sigma=2.0).args[0]


PATCHES = {
    # the extra single-batch UNet pass each runs after CFG at every model evaluation, and the self-attention it
    # replaces in the middle block: PAG's identity attention only in that pass, SAG's recording one in every pass
    "pag": (perturbed_attention_guidance, ("middle", 0)),
    "sag": (self_attention_guidance, ("middle", 0, 0)),
}


@pytest.mark.parametrize("name", sorted(PATCHES))
def test_attention_patch_runs_at_every_inner_step(sd15, plain_nested, name):
    patch, block = PATCHES[name]
    patched = patch(sd15.model)
    model, unet = recorded(patched)
    samples, _ = nested_ksampler(sd15, model=model)
    assert_differs(samples["samples"], plain_nested)
    expected = [s for sigmas in inner_sigmas(sd15.model) for s in sigmas]
    groups = unet.evaluations(3 * BATCH)  # cond and uncond, then the patch's own pass
    assert [group[0].sigma for group in groups] == pytest.approx(expected, rel=1e-6)
    for group in groups:
        *guided, extra = group
        # cond and uncond of every batch item (batched or not), then the patch's own pass on one of them
        assert sum(call.batch for call in guided) == 2 * BATCH
        assert sorted(i for call in guided for i in call.cond_or_uncond) == [0, 1]
        assert extra.batch == BATCH and extra.cond_or_uncond == [0]
        assert block in extra.attn1_replaced
        if name == "pag":  # PAG perturbs only its own pass; SAG records the attention of the uncond pass too
            assert not any(call.attn1_replaced for call in guided)
        else:
            assert all(block in call.attn1_replaced for call in guided)


@pytest.mark.parametrize("name,sampler_name", [("pag", "euler"), ("sag", "dpmpp_2m")])
def test_one_outer_step_with_attention_patch_is_ksampler(sd15, name, sampler_name):
    patched = PATCHES[name][0](sd15.model)
    one, _ = nested_ksampler(sd15, model=patched, seed=7, outer_steps=1, inner_steps=5, sampler_name=sampler_name)
    vanilla = ksampler(sd15, model=patched, seed=7, steps=5, sampler_name=sampler_name)
    assert_differs(vanilla, ksampler(sd15, seed=7, steps=5, sampler_name=sampler_name))
    assert_same(one["samples"], vanilla)
