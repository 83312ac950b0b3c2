"""Models for the tests and the benchmark: tiny real diffusion architectures with random weights, built from
ComfyUI's own model classes, the exact exemplar-mixture model, and ``counting_clone`` (NFEs counted at the model).

Every builder returns a stock ``comfy.model_patcher.ModelPatcher`` around a stock
``comfy.model_base`` model (``BaseModel`` with ComfyUI's ``UNetModel``, ``model_base.Flux`` with
``comfy.ldm.flux.model.Flux``, ``model_base.SD3`` with the MMDiT), configured by a subclass of the
matching ``comfy.supported_models`` config whose only change is a tiny ``unet_config``. So ComfyUI
picks the family's own model sampling (discrete eps / v, ``ModelSamplingFlux``,
``ModelSamplingDiscreteFlow`` with SD3's shift), latent format and conditioning handling, and the
whole pack runs through exactly the code paths a real checkpoint of that family takes, in
milliseconds per step on a CPU.

ComfyUI builds layers with ``comfy.ops`` operations that skip weight initialisation (a checkpoint
is loaded right after), so the builders fill every parameter and buffer from a seeded generator:
the same seed gives the same model, bit for bit.
"""
from __future__ import annotations

import math
import time

import torch

CONTEXT_DIM = 32  # text-token width of every tiny model
POOLED_DIM = 32  # pooled text vector (Flux ``y`` / SD3 ``adm``)
CONTEXT_TOKENS = 8

SD15_UNET_CONFIG = {
    # The keys comfy.model_detection gives an SD1.5 checkpoint, scaled down: two levels (32, 64 channels),
    # one res block each, cross-attention (context 32, 2 heads of 16) at the second level and in the middle.
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 1, 1],
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}

FLUX_UNET_CONFIG = {
    # comfy.model_detection's Flux-dev keys, scaled down: 16-channel latents in 2x2 patches, width 64,
    # 2 heads of 32 (rope axes 8 + 12 + 12), one double and one single stream block, guidance embedding.
    "image_model": "flux",
    "guidance_embed": True,
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "vec_in_dim": POOLED_DIM,
    "context_in_dim": CONTEXT_DIM,
    "hidden_size": 64,
    "mlp_ratio": 2.0,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "axes_dim": [8, 12, 12],
    "theta": 10000,
    "qkv_bias": True,
}

SD3_UNET_CONFIG = {
    # comfy.model_detection's MMDiT keys, scaled down: depth 2 (the MMDiT's width is 64 * depth = 128,
    # 2 heads), 16-channel latents in 2x2 patches, a 16x16 patch grid of learned positions.
    "in_channels": 16,
    "out_channels": 16,
    "patch_size": 2,
    "depth": 2,
    "input_size": None,
    "adm_in_channels": POOLED_DIM,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CONTEXT_DIM, "out_features": 128}},
    "num_patches": 256,
    "pos_embed_max_size": 16,
    "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
    "mlp_ratio": 2.0,
}


def tiny_config(base, unet_config: dict, unet_extra_config: dict | None = None):
    """An instance of ``base`` (a comfy.supported_models class) with a tiny unet_config, float32 weights."""
    import comfy.supported_models  # noqa: F401

    extra = dict(base.unet_extra_config if unet_extra_config is None else unet_extra_config)
    tiny = type(f"Tiny{base.__name__}", (base,), {
        "unet_config": dict(unet_config),
        "unet_extra_config": extra,
        "supported_inference_dtypes": [torch.float32],
    })
    config = tiny(dict(unet_config))
    config.set_inference_dtype(torch.float32, None)
    return config


@torch.no_grad()
def randomize_weights(module: torch.nn.Module, seed: int) -> None:
    """Fill every parameter and buffer from ``seed``: fan-in scaled weights, unit norm scales, small biases.

    Deterministic in module order, independent of the global RNG. Integer buffers are left alone.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(tensor, std, mean=0.0):
        values = torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * std + mean
        tensor.copy_(values.to(tensor.dtype))

    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if not tensor.is_floating_point():
            continue
        leaf = name.rsplit(".", 1)[-1]
        if tensor.ndim >= 2:
            if leaf in ("pos_embed", "register"):  # learned positions / register tokens
                normal(tensor, 0.5)
            else:  # Linear / Conv / Embedding weights: fan-in is everything but the output dimension
                normal(tensor, 1.0 / math.sqrt(max(math.prod(tensor.shape[1:]), 1)))
        elif leaf in ("weight", "scale"):  # norms (GroupNorm, LayerNorm, RMSNorm)
            normal(tensor, 0.05, mean=1.0)
        else:
            normal(tensor, 0.05)


def model_patcher(model):
    """A stock ModelPatcher around ``model`` on ComfyUI's load and offload devices."""
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )


def parameter_count(patcher) -> int:
    return sum(p.numel() for p in patcher.model.diffusion_model.parameters())


def tiny_sd15_unet(prediction: str = "eps", seed: int = 0):
    """An SD1.5-family MODEL: ``BaseModel`` + ComfyUI's ``UNetModel`` (~1.0M parameters), 4-channel SD15 latents.

    ``prediction``: ``"eps"`` (SD1.5) or ``"v_prediction"`` (SD2.x-v), both on the discrete SD schedule.
    """
    return sd15_unet(SD15_UNET_CONFIG, {"num_heads": 2, "num_head_channels": -1}, prediction, seed)


def sd15_unet(unet_config: dict, unet_extra_config: dict, prediction: str = "eps", seed: int = 0):
    """``BaseModel`` + ComfyUI's ``UNetModel`` in SD1.5's config class with ``unet_config``, random weights from ``seed``."""
    import comfy.model_base
    import comfy.model_management
    import comfy.supported_models

    model_types = {"eps": comfy.model_base.ModelType.EPS, "v_prediction": comfy.model_base.ModelType.V_PREDICTION}
    if prediction not in model_types:
        raise ValueError(f"prediction must be one of {sorted(model_types)}, got {prediction!r}")
    config = tiny_config(comfy.supported_models.SD15, unet_config, unet_extra_config)
    model = comfy.model_base.BaseModel(config, model_type=model_types[prediction],
                                       device=comfy.model_management.unet_offload_device())
    randomize_weights(model.diffusion_model, seed)
    return model_patcher(model)


def flux_unet_config() -> dict:
    """FLUX_UNET_CONFIG for this ComfyUI: 0.4.0 added ``txt_ids_dims`` to FluxParams (Flux-dev's: none), which
    earlier releases refuse."""
    import dataclasses

    import comfy.ldm.flux.model

    fields = {field.name for field in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {**FLUX_UNET_CONFIG, "txt_ids_dims": []} if "txt_ids_dims" in fields else dict(FLUX_UNET_CONFIG)


def tiny_flow_model(kind: str = "flux", seed: int = 0):
    """A flow (CONST) MODEL with 16-channel latents.

    ``kind="flux"``: ``model_base.Flux`` + ``comfy.ldm.flux.model.Flux`` (~0.2M parameters), Flux-dev's
    config (guidance embedding, ``ModelSamplingFlux`` with shift 1.15, Flux latent format); its
    conditioning needs ``pooled_output`` and takes ``guidance`` (see ``flow_conditioning``).
    ``kind="sd3"``: ``model_base.SD3`` + the MMDiT (~0.9M parameters), SD3's config
    (``ModelSamplingDiscreteFlow`` with shift 3.0, SD3 latent format); needs ``pooled_output``.
    Latents must be at most 32x32 for ``sd3`` (its 16x16 grid of learned positions, 2x2 patches).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.supported_models

    device = comfy.model_management.unet_offload_device()
    if kind == "flux":
        config = tiny_config(comfy.supported_models.Flux, flux_unet_config())
        model = comfy.model_base.Flux(config, device=device)
    elif kind == "sd3":
        config = tiny_config(comfy.supported_models.SD3, SD3_UNET_CONFIG)
        model = comfy.model_base.SD3(config, device=device)
    else:
        raise ValueError(f"kind must be 'flux' or 'sd3', got {kind!r}")
    randomize_weights(model.diffusion_model, seed)
    return model_patcher(model)


def conditioning(context_dim: int = CONTEXT_DIM, seed: int = 0, tokens: int = CONTEXT_TOKENS) -> list:
    """A CONDITIONING for the tiny UNet: random text tokens, no extras (what CLIPTextEncode would hand it)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, context_dim, generator=generator), {}]]


def flow_conditioning(seed: int = 0, guidance: float = 3.5, context_dim: int = CONTEXT_DIM,
                      pooled_dim: int = POOLED_DIM, tokens: int = CONTEXT_TOKENS) -> list:
    """A CONDITIONING for the tiny flow models, shaped like a Flux / SD3 text encoder's output.

    Carries ``pooled_output`` (their ``y`` vector) and, as FluxGuidance sets it, ``guidance``.
    """
    generator = torch.Generator().manual_seed(seed)
    tokens_out = torch.randn(1, tokens, context_dim, generator=generator)
    pooled = torch.randn(1, pooled_dim, generator=generator)
    return [[tokens_out, {"pooled_output": pooled, "guidance": guidance}]]


def exemplar_model(prediction: str, spread: float, image_size: int, shift: float = 1.0):
    """(MODEL, CONDITIONING, exemplars) of the exact exemplar-mixture denoiser for one model family."""
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import default_exemplars
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import build_exemplar_model, empty_conditioning

    exemplars = default_exemplars(image_size)
    return build_exemplar_model(exemplars, spread, prediction, shift=shift), empty_conditioning(), exemplars


def counting_clone(model, seconds_per_call: float = 0.0, on_call=None):
    """A clone of a MODEL whose every diffusion-model evaluation is counted (ComfyUI's unet function wrapper):
    ``(clone, calls)`` with ``calls["n"]`` the evaluations so far and ``calls["items"]`` the batch items they
    evaluated. ``seconds_per_call``: each evaluation takes at least that long (a slow model, steady);
    ``on_call(calls)`` runs at every evaluation."""
    calls = {"n": 0, "items": 0}

    def wrapper(apply_model, args):
        calls["n"] += 1
        calls["items"] += int(args["input"].shape[0])
        if seconds_per_call:
            time.sleep(seconds_per_call)
        if on_call is not None:
            on_call(calls)
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone = model.clone()
    clone.set_model_unet_function_wrapper(wrapper)
    return clone, calls


def node_with_hidden(node_cls, **hidden):
    """The class ComfyUI's executor runs for a V3 node: a clone holding its hidden inputs (``unique_id="7"``,
    ``prompt={...}``). The one adapter the tests and the benchmark keep for what differs between ComfyUI releases:
    ``PREPARE_CLASS_CLONE`` took the hidden values themselves up to 0.3.x and ``{"hidden_inputs": ...}`` from 0.4.0."""
    import inspect

    from comfy_api.latest import io

    values = {getattr(io.Hidden, name): value for name, value in hidden.items()}
    if "v3_data" in inspect.signature(node_cls.PREPARE_CLASS_CLONE).parameters:
        return node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": values})
    return node_cls.PREPARE_CLASS_CLONE(values)
