#!/usr/bin/env bash
# The README's main job: a real ComfyUI server with this pack, the demo workflow queued over the API,
# nested diffusion vs a vanilla KSampler at equal NFEs. Sets up .nested_env/ on first use.
# Options go to scripts/demo.py (see --help): --out DIR, --outer K, --inner N, --seed S, --port P, --workflow FILE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
bash "$root/scripts/setup_env.sh"
exec "$venv_python" -P -m comfyui_nested_diffusion.scripts.demo "$@"
