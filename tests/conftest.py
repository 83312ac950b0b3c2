"""Shared test bootstrap.

Unit tests of ``nested_core`` import it straight from the repository root and need no ComfyUI.
Tests that run inside ComfyUI use the ``comfy`` fixture (adds the ComfyUI engine built by
``scripts/setup_env.sh`` to ``sys.path``) and the ``pack`` fixture (imports this repository as a
custom-node package, exactly as ComfyUI's loader does).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_MODULE_NAME = "comfyui_nested_diffusion"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def comfyui_path() -> Path:
    """The ComfyUI checkout under test: $COMFYUI_PATH, else the one setup_env.sh built."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    recorded = REPO_ROOT / ".nested_env" / "comfyui_path"
    if recorded.exists():
        return Path(recorded.read_text().strip())
    return REPO_ROOT / ".nested_env" / "ComfyUI"


def import_comfy() -> Path:
    path = comfyui_path()
    if not (path / "main.py").exists():
        pytest.fail(f"No ComfyUI at {path}: run scripts/setup_env.sh (or set COMFYUI_PATH)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    # ComfyUI's `utils` package must win over any other module of that name.
    for name in ("utils", "nodes"):
        module = sys.modules.get(name)
        if module is not None and not str(getattr(module, "__file__", "") or "").startswith(str(path)):
            del sys.modules[name]
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # what `main.py --cpu` does, before the device is chosen
    import comfy.model_management  # noqa: F401  (initialises the device state)
    return path


def import_pack():
    """Import the repository as a package, the way ComfyUI imports a custom-node folder."""
    if PACK_MODULE_NAME in sys.modules:
        return sys.modules[PACK_MODULE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACK_MODULE_NAME, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE_NAME] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def comfy() -> Path:
    return import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    return import_pack()


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server with this pack installed (tools/comfy_server.py), shared by the session."""
    from tools.comfy_server import ComfyServer

    with ComfyServer(startup_timeout=120) as server:
        yield server


@pytest.fixture
def client(comfy_server):
    """A websocket-connected API client of the shared server (tools/comfy_api_client.py)."""
    from tools.comfy_api_client import ComfyAPIClient

    with ComfyAPIClient(comfy_server.url) as api:
        yield api


@pytest.fixture(scope="session")
def exemplar_defaults(comfy_server) -> dict:
    """NestedExemplarModel's widget defaults as the server reports them (the node may gain inputs)."""
    from api_helpers import widget_defaults

    from tools.comfy_api_client import ComfyAPIClient

    with ComfyAPIClient(comfy_server.url) as api:
        return widget_defaults(api.object_info("NestedExemplarModel")["NestedExemplarModel"])
