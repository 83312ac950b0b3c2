# Sourced by test.sh, demo.sh, bench.sh and python.sh: the environment's interpreter, and this checkout importable
# under exactly one name, ``comfyui_nested_diffusion`` (the name the pack gets in-process).
# .nested_import/ (git-ignored) holds one link, comfyui_nested_diffusion -> .. (this checkout, relative: a worktree
# or a moved clone links to itself); PYTHONPATH names that folder. The checkout itself never goes on sys.path (the
# scripts run python with -P), so ComfyUI's own top-level ``nodes`` and ``utils`` are never shadowed by the pack's.
# Nothing is written into the venv: worktrees share it, and each must import its own checkout.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${NESTED_ENGINE:-0.3.75}" in
  0.33.0) venv_python="$root/.nested_env_033/venv/bin/python" ;;
  *) venv_python="$root/.nested_env/venv/bin/python" ;;
esac
mkdir -p "$root/.nested_import"
if [ "$(readlink "$root/.nested_import/comfyui_nested_diffusion" 2>/dev/null)" != ".." ]; then
  ln -sfn .. "$root/.nested_import/comfyui_nested_diffusion"
fi
export PYTHONPATH="$root/.nested_import${PYTHONPATH:+:$PYTHONPATH}"
