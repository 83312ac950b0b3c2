#!/usr/bin/env bash
# The benchmark (docs/maintainers.md; not part of the test run): NestedKSampler vs ComfyUI's KSampler at equal NFEs,
# inside a real ComfyUI process. Builds the environment if needed (venv + real ComfyUI), then runs
# bench/run_benchmark.py; results (JSON, PNG, summary.md) land in bench/results/. Exits 1 if a target fails.
# Arguments go to the benchmark, e.g. scripts/bench.sh --quick, scripts/bench.sh --parts quality
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$root"
bash scripts/setup_env.sh
exec "$venv_python" -P -m comfyui_nested_diffusion.bench.run_benchmark "$@"
