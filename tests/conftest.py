"""Shared test bootstrap.

Unit tests of ``nested_core`` import it straight from the repository root and need no ComfyUI.
Tests that run inside ComfyUI use the ``comfy`` fixture (adds the ComfyUI engine built by
``scripts/setup_env.sh`` to ``sys.path``) and the ``pack`` fixture (imports this repository as a
custom-node package, exactly as ComfyUI's loader does).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tools.comfy_env import PACK_MODULE_NAME, ComfyNotFound, comfyui_path, import_pack  # noqa: E402
from tools.comfy_env import import_comfy as _import_comfy  # noqa: E402

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
    from tools.comfy_env import frontend_root
    from tools.comfy_server import ComfyServer

    frontend = frontend_root()  # NESTED_FRONTEND=1.58.1: another frontend than the engine's own
    with ComfyServer(startup_timeout=120, extra_args=["--front-end-root", str(frontend)] if frontend else []) as server:
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
    from tools.comfy_api_client import ComfyAPIClient, widget_defaults

    with ComfyAPIClient(comfy_server.url) as api:
        return widget_defaults(api.object_info("NestedExemplarModel")["NestedExemplarModel"])
