"""'Finish now': a running nested sampler ends after its current inner diffusion and returns that image.

Runs register here while they sample, with the ``client_id`` their prompt was queued with. The route
``POST /nested_diffusion/finish`` with ``{"prompt_id": ..., "node_id": ..., "client_id": ...}`` flags exactly that
run and nothing else; with a ``client_id`` that is not the run's, it refuses (403): a client finishes only its own
runs (the web extension always sends its tab's). ``GET /nested_diffusion/running?client_id=...`` lists what that
client could finish (without ``client_id``: every run, without their client ids).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional

_lock = threading.Lock()
_running: dict[tuple[str, str], threading.Event] = {}
_clients: dict[tuple[str, str], Optional[str]] = {}  # the client_id each run's prompt was queued with


def queuing_client_id() -> Optional[str]:
    """The client_id of the prompt ComfyUI is executing (None outside a server or for prompts queued without one)."""
    try:
        from server import PromptServer
    except ImportError:
        return None
    client_id = getattr(getattr(PromptServer, "instance", None), "client_id", None)
    return client_id if isinstance(client_id, str) and client_id else None


@contextlib.contextmanager
def finishable_run(prompt_id: Optional[str], node_id: Optional[str]) -> Iterator[threading.Event]:
    """Register a run for its duration; the event is set when a finish is requested for it."""
    flag = threading.Event()
    key = (str(prompt_id), str(node_id)) if prompt_id is not None and node_id is not None else None
    if key is not None:
        with _lock:
            _running[key] = flag
            _clients[key] = queuing_client_id()
    try:
        yield flag
    finally:
        if key is not None:
            with _lock:
                if _running.get(key) is flag:
                    del _running[key]
                    _clients.pop(key, None)


def running_runs(client_id: Optional[str] = None) -> list[dict]:
    """The runs that can be finished now; only ``client_id``'s when given."""
    with _lock:
        return [{"prompt_id": prompt_id, "node_id": node_id} for prompt_id, node_id in _running
                if client_id is None or _clients.get((prompt_id, node_id)) == client_id]


def request_finish(prompt_id: str, node_id: str, client_id: Optional[str] = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a finish request; with ``client_id``, only for a run that client queued."""
    with _lock:
        if not _running:
            return 409, {"error": "nothing to finish: no nested sampler is running"}
        flag = _running.get((prompt_id, node_id))
        if flag is None:
            mine = [{"prompt_id": p, "node_id": n} for p, n in _running
                    if client_id is None or _clients.get((p, n)) == client_id]
            return 404, {"error": f"no running nested sampler for prompt_id {prompt_id!r} and node_id {node_id!r}",
                         "running": mine}
        if client_id is not None and _clients.get((prompt_id, node_id)) != client_id:
            return 403, {"error": "that run was queued by another client: a client can finish only its own runs"}
        flag.set()
    return 200, {"finishing": True, "prompt_id": prompt_id, "node_id": node_id}


def parse_finish_request(body: object) -> tuple[Optional[tuple], Optional[str]]:
    """((prompt_id, node_id, client_id or None), None) for a well-formed request, else (None, what is wrong)."""
    if not isinstance(body, dict):
        return None, "the body must be a JSON object with string fields prompt_id and node_id (and client_id)"
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not client_id or len(client_id) > 200):
        return None, "client_id, when given, must be a non-empty string of at most 200 characters: the client_id " \
                     "the prompt was queued with"
    prompt_id, node_id = body.get("prompt_id"), body.get("node_id")
    if isinstance(node_id, int) and not isinstance(node_id, bool):
        node_id = str(node_id)
    if not isinstance(prompt_id, str) or not prompt_id or not isinstance(node_id, str) or not node_id:
        return None, "prompt_id and node_id must be non-empty strings naming the running prompt and node"
    if len(prompt_id) > 200 or len(node_id) > 200:
        return None, "prompt_id and node_id must be at most 200 characters"
    return (prompt_id, node_id, client_id), None


def register_routes() -> None:
    """Add the routes to ComfyUI's server, when one is running (not in plain in-process use)."""
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is None:
        return

    @server.routes.post("/nested_diffusion/finish")
    async def finish(request):
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "the body must be valid JSON"}, status=400)
        ids, problem = parse_finish_request(body)
        if problem is not None:
            return web.json_response({"error": problem}, status=400)
        status, answer = request_finish(*ids)
        return web.json_response(answer, status=status)

    @server.routes.get("/nested_diffusion/running")
    async def running(request):
        client_id = request.query.get("client_id") or None
        return web.json_response({"running": running_runs(client_id)})

    logging.info("nested diffusion: finish-now routes registered")
