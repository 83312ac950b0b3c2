#!/usr/bin/env bash
# The README's test command: builds the environment if needed (venv + real ComfyUI), then runs every test.
# Extra arguments go to pytest, e.g. scripts/test.sh -k nfe
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup_env.sh
exec .nested_env/venv/bin/python -m pytest -c tests/pytest.ini --rootdir tests tests "$@"
