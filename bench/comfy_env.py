"""Bootstrap for the benchmark: a real ComfyUI engine and this pack, imported in-process (tools/comfy_env.py)."""
from tools.comfy_env import PACK_MODULE_NAME, REPO_ROOT, comfyui_path, import_comfy, import_pack

__all__ = ["PACK_MODULE_NAME", "REPO_ROOT", "comfyui_path", "import_comfy", "import_pack"]
