"""One import identity: the repository is the package ``comfyui_nested_diffusion`` and nothing else, and the package
imports without ComfyUI (the nodes load only when ComfyUI awaits ``comfy_entrypoint``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT, child_env

TOP_LEVEL_NAMES = {"nested_core", "tools", "bench", "scripts", "demo_models", "tiny_models", "workflow_checks",
                   "build_workflows", "nested_demo", "nested_load_test"}


def test_the_checkout_is_not_on_sys_path_and_comfyuis_nodes_module_wins(pack):
    import nodes

    assert str(REPO_ROOT) not in {str(Path(entry or ".").resolve()) for entry in sys.path}
    assert Path(nodes.__file__).resolve().parent != REPO_ROOT / "nodes" and hasattr(nodes, "common_ksampler")
    assert TOP_LEVEL_NAMES.isdisjoint(sys.modules), TOP_LEVEL_NAMES & set(sys.modules)
    packs_own = {REPO_ROOT / "nodes" / "__init__.py", REPO_ROOT / "protocol.py"}  # names ComfyUI has at its root too
    for name in ("nodes", "protocol"):
        module = sys.modules.get(name)
        assert module is None or Path(module.__file__).resolve() not in packs_own, name
    assert pack.__name__ == "comfyui_nested_diffusion" and Path(pack.__path__[0]).resolve() == REPO_ROOT


def test_the_package_and_its_core_import_without_comfyui():
    code = ("import sys, comfyui_nested_diffusion as pack, comfyui_nested_diffusion.nested_core, "
            "comfyui_nested_diffusion.tools.workflows; import inspect; "
            "assert inspect.iscoroutinefunction(pack.comfy_entrypoint) and pack.WEB_DIRECTORY == './web'; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'comfy', 'comfy_api', 'nodes', 'server', 'folder_paths'}))")
    done = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, env=child_env(),
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
