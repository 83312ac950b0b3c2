"""The one place the pack looks up ComfyUI's running server (``server.PromptServer.instance``) and what it is
executing (the prompt and node ids).

In plain in-process use (scripts, tests, the benchmark) there is none: every caller then does nothing.
"""
from __future__ import annotations

import functools
from typing import Any, Optional


@functools.lru_cache(maxsize=None)
def _prompt_server_class():
    """ComfyUI's PromptServer class, or None where ``server`` cannot be imported (looked up once, not per step)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    return PromptServer


def prompt_server() -> Any:
    """The running server, or None."""
    return getattr(_prompt_server_class(), "instance", None)


def send_to_prompt_client(event: str, data: dict) -> None:
    """Send a websocket event to the client that queued the running prompt (as ComfyUI's progress does)."""
    server = prompt_server()
    if server is not None:
        server.send_sync(event, data, server.client_id)


def queuing_client_id() -> Optional[str]:
    """The client_id of the prompt ComfyUI is executing (None outside a server or for prompts queued without one)."""
    client_id = getattr(prompt_server(), "client_id", None)
    return client_id if isinstance(client_id, str) and client_id else None


def _executing_context():
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:  # ComfyUI releases before the execution context existed
        return None
    return get_executing_context()


def executing_prompt_id() -> Optional[str]:
    context = _executing_context()
    return context.prompt_id if context is not None else None


def executing_node_id() -> Optional[str]:
    context = _executing_context()
    return context.node_id if context is not None else None
