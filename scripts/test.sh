#!/usr/bin/env bash
# The README's test command: builds the environment if needed (venv + real ComfyUI), then runs every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k nfe
# NESTED_ENGINE=0.33.0 scripts/test.sh: the same on ComfyUI 0.33.0 (from ../shared/comfyui/, in .nested_env_033/);
# NESTED_FRONTEND=1.58.1 with it: the test server serves that frontend (scripts/setup_env.sh fetches it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
bash scripts/setup_env.sh
targets=(tests)  # the whole suite, unless test files are named: scripts/test.sh tests/browser/test_browser.py
for arg in "$@"; do
  case "$arg" in tests/*) targets=() ;; esac
done
exec "$venv_python" -P -m pytest -c tests/pytest.ini --rootdir tests "${targets[@]}" "$@"
