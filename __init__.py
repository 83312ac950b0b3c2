"""Nested Diffusion for ComfyUI: anytime sampling (Elata et al., WACV 2024) as ComfyUI nodes."""
from .nodes import comfy_entrypoint
from .nodes.version_check import log_comfyui_version

log_comfyui_version()  # at load: the ComfyUI found, and a warning outside the tested releases

WEB_DIRECTORY = "./web"  # the "Finish now" button

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
