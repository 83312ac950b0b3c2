"""Nested Diffusion for ComfyUI: anytime sampling (Elata et al., WACV 2024) as ComfyUI nodes."""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # the "Finish now" button

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
