"""Nested Diffusion for ComfyUI: anytime sampling (Elata et al., WACV 2024) as ComfyUI nodes.

ComfyUI loads this folder by executing this file and then awaits ``comfy_entrypoint()``. Nothing here imports
ComfyUI: the nodes are imported inside the entry point, so that ``comfyui_nested_diffusion.nested_core`` and the
developer tools (``comfyui_nested_diffusion.tools``) import without ComfyUI on the path.
"""
from __future__ import annotations

from typing import Any

WEB_DIRECTORY = "./web"  # the "Finish now" button

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]


async def comfy_entrypoint() -> Any:
    """The pack's ComfyExtension; logs the ComfyUI found (and a warning outside the tested releases)."""
    from .nodes import comfy_entrypoint as nodes_entrypoint
    from .nodes.version_check import log_comfyui_version

    log_comfyui_version()
    return await nodes_entrypoint()
