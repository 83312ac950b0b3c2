"""Tiny real control models for the tiny SD1.5 UNet of ``comfyui_nested_diffusion.tools.models``, with random weights.

``tiny_controlnet`` is ComfyUI's own ``comfy.cldm.cldm.ControlNet`` built with the tiny UNet's config (the
same channels, levels, res blocks and attention layout) and a 3-channel hint, wrapped in
``comfy.controlnet.ControlNet`` exactly as ``comfy.controlnet.load_controlnet_state_dict`` wraps a loaded
SD1.5 ControlNet file (same operations, dtype, load device and manual-cast dtype).

``tiny_t2i_adapter`` is ComfyUI's ``comfy.t2i_adapter.adapter.Adapter`` (the SD1.5 full adapter: 8x pixel
unshuffle, ``ksize=1``, ``sk=True``, no down-convolutions, as ``load_t2i_adapter`` builds it for SD1.5 files)
with two levels instead of four, wrapped in ``comfy.controlnet.T2IAdapter`` as ``load_t2i_adapter`` does. An
SD1.5 adapter emits one feature map after every third UNet input block (the last res block of each level:
input blocks 2, 5, 8, 11 of SD1.5), so it needs a UNet with two res blocks per level: ``tiny_sd15_unet_2rb``
(the tiny UNet of ``comfyui_nested_diffusion.tools.models`` with ``num_res_blocks=[2, 2]``). On the one-res-block tiny UNet its
first feature map would land after the downsampling block, at the wrong resolution, and ComfyUI would drop it
with a "control could not be applied" warning.

All weights come from ``randomize_weights`` (seeded, independent of the global RNG). A real
ControlNet's zero convolutions start at zero; random ones make the control visibly change the output.
"""
from __future__ import annotations

import torch
from comfyui_nested_diffusion.tools.models import SD15_UNET_CONFIG, randomize_weights, sd15_unet

HINT_CHANNELS = 3
HINT_RATIO = 8  # the hint IMAGE is 8x the latent, as for SD1.5 ControlNets and T2I adapters
HEADS = {"num_heads": 2, "num_head_channels": -1}  # the tiny UNet's attention heads

SD15_2RB_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    # two res blocks per level (like SD1.5), cross-attention on the second level and in the middle
    "num_res_blocks": [2, 2],
    "transformer_depth": [0, 0, 1, 1],
    "transformer_depth_output": [0, 0, 0, 1, 1, 1],
}


def tiny_sd15_unet_2rb(seed: int = 0):
    """The tiny SD1.5 eps UNet with two res blocks per level (input blocks 0..5), for the T2I adapter."""
    return sd15_unet(SD15_2RB_UNET_CONFIG, HEADS, "eps", seed)


def tiny_controlnet(seed: int = 0, unet_config: dict = SD15_UNET_CONFIG):
    """A CONTROL_NET for the tiny SD1.5 UNet (``unet_config``), built the way ComfyUI's loader builds one."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.ops

    unet_dtype = torch.float32
    load_device = comfy.model_management.get_torch_device()
    manual_cast_dtype = comfy.model_management.unet_manual_cast(unet_dtype, load_device)
    config = {**unet_config, **HEADS}
    config.pop("out_channels")
    config.update(
        hint_channels=HINT_CHANNELS,
        operations=comfy.ops.pick_operations(unet_dtype, manual_cast_dtype),
        dtype=unet_dtype,
        device=comfy.model_management.unet_offload_device(),
    )
    control_model = comfy.cldm.cldm.ControlNet(**config)
    randomize_weights(control_model, seed)
    return comfy.controlnet.ControlNet(control_model, global_average_pooling=False, load_device=load_device,
                                       manual_cast_dtype=manual_cast_dtype)


def tiny_t2i_adapter(seed: int = 0, channels: tuple = (32, 64)):
    """A T2I adapter (CONTROL_NET) for ``tiny_sd15_unet_2rb``: one feature map per UNet level."""
    import comfy.controlnet
    import comfy.t2i_adapter.adapter

    cin = HINT_CHANNELS * HINT_RATIO * HINT_RATIO  # 8x8 pixel unshuffle of an RGB hint
    adapter = comfy.t2i_adapter.adapter.Adapter(cin=cin, channels=list(channels), nums_rb=2, ksize=1, sk=True,
                                                use_conv=False, xl=False)
    randomize_weights(adapter, seed)
    return comfy.controlnet.T2IAdapter(adapter, adapter.input_channels, HINT_RATIO, "nearest-exact")


def hint_image(latent_size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """A hint IMAGE ``[batch, 8 * latent_size, 8 * latent_size, 3]`` in [0, 1]: smooth random shapes, like an edge
    or depth map rather than per-pixel noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=generator)
    size = latent_size * HINT_RATIO
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return image.movedim(1, -1).contiguous()
