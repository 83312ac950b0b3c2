#!/usr/bin/env bash
# The environment's Python with this checkout importable as ``comfyui_nested_diffusion`` (scripts/env.sh); builds the
# environment first if needed. For the developer scripts and tools, e.g.
#   scripts/python.sh -m comfyui_nested_diffusion.scripts.load_test --mixed
#   scripts/python.sh -m comfyui_nested_diffusion.tools.comfy_server --port 8188
#   scripts/python.sh -m comfyui_nested_diffusion.tools.workflows --check
# NESTED_ENGINE=0.33.0 selects the ComfyUI 0.33.0 environment.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$root/scripts/setup_env.sh"
exec "$venv_python" -P "$@"
