"""The benchmark's models: the exact exemplar-mixture denoiser, and a small SD1.5-architecture UNet
(both built by ``tools/models.py``, which the tests use too; here: the benchmark's sizes and their descriptions).

The UNet is ComfyUI's own ``UNetModel`` inside a stock ``comfy.model_base.BaseModel``, configured by a
subclass of ``comfy.supported_models.SD15`` whose only change is a smaller ``unet_config``: so it has
SD1.5's model sampling (discrete eps schedule), latent format (4 channels, 0.18215), conditioning handling
(cross-attention to 77 x 768 text tokens) and code paths, with random weights (no checkpoint can be
downloaded here) and a cost per step a 2-core CPU can afford.
"""
from __future__ import annotations

from comfyui_nested_diffusion.tools.models import conditioning, exemplar_model
from comfyui_nested_diffusion.tools.models import sd15_unet as tiny_sd15

SPREAD = 0.05  # std of each exemplar's cloud, pixel units in [-1, 1]
IMAGE_SIZE = 32
ON_MANIFOLD = 3 * SPREAD  # the tests' radius for "on the data manifold" (used for distinct exemplars)
FLOW_SHIFT = 3.0
PREDICTIONS = ("eps", "v_prediction", "flow")


def scheduler_for(prediction: str) -> str:
    """The scheduler a user would pick: ``normal`` for SD-style eps/v, ``simple`` for flow (as the tests)."""
    return "simple" if prediction == "flow" else "normal"


def exact_model(prediction: str):
    """(MODEL, CONDITIONING, exemplars [8, 3, 32, 32] in [-1, 1]) for one model family."""
    return exemplar_model(prediction, SPREAD, IMAGE_SIZE, shift=FLOW_SHIFT if prediction == "flow" else 1.0)


def exact_model_config(prediction: str) -> dict:
    from comfyui_nested_diffusion.demo_models.exemplar.nodes import DEFAULT_LATENT_SCALE

    return {
        "model": "exemplar mixture (exact denoiser), demo_models/exemplar/nodes.py",
        "prediction": prediction,
        "exemplars": f"default_exemplars({IMAGE_SIZE}): 8 images 3x{IMAGE_SIZE}x{IMAGE_SIZE}",
        "spread": SPREAD,
        "latent_scale": DEFAULT_LATENT_SCALE,
        "shift": FLOW_SHIFT if prediction == "flow" else None,
        "scheduler": scheduler_for(prediction),
    }


SD15_BENCH_UNET_CONFIG = {
    # SD1.5's keys (what comfy.model_detection reads from an SD1.5 checkpoint) at a smaller size: three levels
    # (32, 64, 128 channels) instead of four (320 ... 1280), one res block per level instead of two, and
    # spatial transformers (self-attention + cross-attention to 77 x 768 CLIP-L tokens, 8 heads) at the 16x16
    # level and in the middle block. SD1.5 also has them at 64x64 and 32x32; on a 2-core CPU their 4096- and
    # 1024-token self-attention would cost seconds per step.
    "use_checkpoint": False,
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1, 1],
    "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 0, 1, 1],
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SD15_BENCH_UNET_EXTRA = {"num_heads": 8, "num_head_channels": -1}
TEXT_TOKENS, TEXT_DIM = 77, 768


def sd15_unet(seed: int = 0):
    """A ModelPatcher around ``BaseModel`` + ComfyUI's SD1.5 ``UNetModel`` (``SD15_BENCH_UNET_CONFIG``), random weights."""
    return tiny_sd15(SD15_BENCH_UNET_CONFIG, SD15_BENCH_UNET_EXTRA, "eps", seed)


def sd15_conditioning(seed: int) -> list:
    """A CONDITIONING shaped like CLIPTextEncode's for SD1.5: 77 random 768-dim tokens."""
    return conditioning(TEXT_DIM, seed, TEXT_TOKENS)


def sd15_config(patcher) -> dict:
    return {
        "model": "comfy.model_base.BaseModel + comfy.ldm UNetModel, SD15 config class with a smaller unet_config",
        "unet_config": dict(SD15_BENCH_UNET_CONFIG),
        "unet_extra_config": dict(SD15_BENCH_UNET_EXTRA),
        "parameters": int(sum(p.numel() for p in patcher.model.diffusion_model.parameters())),
        "weights": "random (seeded, fan-in scaled), float32",
        "conditioning": f"positive and negative: {TEXT_TOKENS} x {TEXT_DIM} random tokens",
        "prediction": "eps (SD1.5 discrete schedule)",
        "latent_format": "SD15 (4 channels)",
    }
