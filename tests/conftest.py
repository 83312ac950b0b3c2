"""Shared test bootstrap.

The repository is imported under one name, ``comfyui_nested_diffusion`` (scripts/test.sh puts the folder holding
that link on PYTHONPATH: scripts/env.sh). Unit tests of ``nested_core`` import
``comfyui_nested_diffusion.nested_core`` and need no ComfyUI. Tests that run inside ComfyUI use the ``comfy``
fixture (adds the ComfyUI engine built by ``scripts/setup_env.sh`` to ``sys.path``) and the ``pack`` fixture
(imports the pack's nodes, as ComfyUI's loader does).
"""
from __future__ import annotations

from pathlib import Path

import pytest

try:
    from comfyui_nested_diffusion.tools.comfy_env import PACK_MODULE_NAME, ComfyNotFound, comfyui_path, import_pack
    from comfyui_nested_diffusion.tools.comfy_env import import_comfy as _import_comfy
except ModuleNotFoundError as error:  # pytest run without scripts/test.sh
    raise pytest.UsageError(f"{error}: run the tests with scripts/test.sh (it makes this checkout importable as "
                            "comfyui_nested_diffusion: scripts/env.sh)") from error

# Test-only custom nodes the test server loads beside the pack (a model that sleeps per call, and counts)
TEST_SERVER_NODES = Path(__file__).resolve().parent / "server_nodes" / "nested_diffusion_test_nodes.py"

__all__ = ["PACK_MODULE_NAME", "comfyui_path", "import_comfy", "import_pack"]


def import_comfy() -> Path:
    try:
        return _import_comfy()
    except ComfyNotFound as error:
        pytest.fail(str(error))


@pytest.fixture(scope="session")
def comfy() -> Path:
    return import_comfy()


@pytest.fixture(scope="session")
def pack(comfy):
    return import_pack()


@pytest.fixture(scope="session")
def comfy_server():
    """One real ComfyUI server with this pack installed (tools/comfy_server.py), shared by the session."""
    from comfyui_nested_diffusion.tools.comfy_env import frontend_root
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer

    frontend = frontend_root()  # NESTED_FRONTEND=1.58.1: another frontend than the engine's own
    with ComfyServer(startup_timeout=120, extra_args=["--front-end-root", str(frontend)] if frontend else [],
                     extra_custom_nodes=[TEST_SERVER_NODES]) as server:
        yield server


@pytest.fixture
def client(comfy_server):
    """A websocket-connected API client of the shared server (tools/comfy_api_client.py)."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient

    with ComfyAPIClient(comfy_server.url) as api:
        yield api


@pytest.fixture(scope="session")
def exemplar_defaults(comfy_server) -> dict:
    """NestedExemplarModel's widget defaults as the server reports them (the node may gain inputs)."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, widget_defaults

    with ComfyAPIClient(comfy_server.url) as api:
        return widget_defaults(api.object_info("NestedExemplarModel")["NestedExemplarModel"])
