"""'Finish now': a running nested sampler ends after its current inner diffusion and returns that image.

Runs register here while they sample; the route ``POST /nested_diffusion/finish`` with
``{"prompt_id": ..., "node_id": ...}`` flags exactly that run and nothing else. ``GET
/nested_diffusion/running`` lists what could be finished (the web extension uses it).
"""
from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional

_lock = threading.Lock()
_running: dict[tuple[str, str], threading.Event] = {}


@contextlib.contextmanager
def finishable_run(prompt_id: Optional[str], node_id: Optional[str]) -> Iterator[threading.Event]:
    """Register a run for its duration; the event is set when a finish is requested for it."""
    flag = threading.Event()
    key = (str(prompt_id), str(node_id)) if prompt_id is not None and node_id is not None else None
    if key is not None:
        with _lock:
            _running[key] = flag
    try:
        yield flag
    finally:
        if key is not None:
            with _lock:
                if _running.get(key) is flag:
                    del _running[key]


def running_runs() -> list[dict]:
    with _lock:
        return [{"prompt_id": prompt_id, "node_id": node_id} for prompt_id, node_id in _running]


def request_finish(prompt_id: str, node_id: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a finish request."""
    with _lock:
        if not _running:
            return 409, {"error": "nothing to finish: no nested sampler is running"}
        flag = _running.get((prompt_id, node_id))
        if flag is None:
            return 404, {"error": f"no running nested sampler for prompt_id {prompt_id!r} and node_id {node_id!r}",
                         "running": [{"prompt_id": p, "node_id": n} for p, n in _running]}
        flag.set()
    return 200, {"finishing": True, "prompt_id": prompt_id, "node_id": node_id}


def parse_finish_request(body: object) -> tuple[Optional[tuple[str, str]], Optional[str]]:
    """((prompt_id, node_id), None) for a well-formed request, else (None, what is wrong)."""
    if not isinstance(body, dict):
        return None, "the body must be a JSON object with string fields prompt_id and node_id"
    prompt_id, node_id = body.get("prompt_id"), body.get("node_id")
    if isinstance(node_id, int) and not isinstance(node_id, bool):
        node_id = str(node_id)
    if not isinstance(prompt_id, str) or not prompt_id or not isinstance(node_id, str) or not node_id:
        return None, "prompt_id and node_id must be non-empty strings naming the running prompt and node"
    if len(prompt_id) > 200 or len(node_id) > 200:
        return None, "prompt_id and node_id must be at most 200 characters"
    return (prompt_id, node_id), None


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
        return web.json_response({"running": running_runs()})

    logging.info("nested diffusion: finish-now routes registered")
