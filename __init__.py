"""Nested Diffusion for ComfyUI: anytime sampling (Elata et al., WACV 2024) as ComfyUI nodes."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
