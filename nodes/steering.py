"""Steering a running nested sampler: 'Finish now' and 'keep only this' (a pick).

Runs register here while they sample (``finishable_run``), with the ``client_id`` their prompt was queued with,
and get a ``RunControl``: the sampler reads ``finish_requested()`` (end after the current inner diffusion and
return that image), reports its batch size (``set_batch_size``) and, at every outer boundary, takes the pending
pick (``take_pick``: keep only that batch item from then on).

Routes (``protocol.py`` names them):

* ``POST /nested_diffusion/finish`` with ``{"prompt_id", "node_id", "client_id"}`` flags exactly that run.
* ``POST /nested_diffusion/pick`` with ``{"prompt_id", "node" (or "node_id"), "index", "client_id"}`` asks that
  run to keep only batch item ``index`` (its position in the batch) from its next outer boundary on; one pick
  per run.
* ``GET /nested_diffusion/running?client_id=...`` lists the runs that client can finish or pick in, with their
  ``batch_size`` (without ``client_id``: only the runs of prompts queued without one).

A request steers a run only with the ``client_id`` the run's prompt was queued with: another client's id, or none
for a run queued with one, is refused (403) and changes nothing (the web extension always sends its tab's). A prompt
queued without a ``client_id`` can be steered by requests that name none. ComfyUI itself has no authentication: the
client ids are not secrets (``GET /queue`` shows them) and ``POST /interrupt`` stops anyone's run, so this keeps
clients from steering each other's runs by mistake or by guessing, not from an attacker who reads the queue.
400: a malformed request or an index out of range; 404: no such run (the answer lists the client's runs); 409:
nothing runs, or (pick) the run cannot take a pick now.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Iterator, Optional

from ..protocol import FINISH_ROUTE, PICK_ROUTE, RUNNING_ROUTE
from .previews_wanted import register_prompt_handler
from .prompt_server import prompt_server, queuing_client_id


class RunControl:
    """What a client asks of one running sampler; thread-safe (the server's thread asks, the sampler's reads).

    The sampler: ``finish_requested()`` after every inner diffusion; ``set_batch_size(n)`` at the start and after
    a pick; ``take_pick()`` (or ``take_pick(batch)``) at every outer boundary (the pending pick's batch position,
    once; None otherwise).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._finish = False
        self._batch_size: Optional[int] = None  # None until the sampler reports it: no pick can be checked then
        self._pending: Optional[int] = None
        self._applied: Optional[int] = None

    # -- finish --
    def finish_requested(self) -> bool:
        with self._lock:
            return self._finish

    def request_finish(self) -> None:
        with self._lock:
            self._finish = True

    # -- pick --
    def set_batch_size(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"batch size must be a positive int, got {n!r}")
        with self._lock:
            self._batch_size = n

    @property
    def batch_size(self) -> Optional[int]:
        with self._lock:
            return self._batch_size

    @property
    def picked(self) -> Optional[int]:
        """The batch position of the pick the sampler took (applied), or None."""
        with self._lock:
            return self._applied

    @property
    def pending_pick(self) -> Optional[int]:
        with self._lock:
            return self._pending

    def take_pick(self, batch: Optional[int] = None) -> Optional[int]:
        """The pending pick's batch position, once (it counts as applied from then on); None when there is none.
        ``batch``: the run's batch size now, when the caller passes it; a pick outside it is dropped (None)."""
        with self._lock:
            index, self._pending = self._pending, None
            if index is not None and batch is not None and not 0 <= index < batch:
                logging.warning("nested diffusion: pick %d dropped: the batch has %d items", index, batch)
                return None
            if index is not None:
                self._applied = index
            return index

    def offer_pick(self, index: int) -> tuple[int, dict]:
        """(HTTP status, JSON body): check ``index`` against this run and make it the pending pick."""
        with self._lock:
            if self._applied is not None:
                return 409, {"error": f"this run already kept only batch item {self._applied}: one pick per run"}
            if self._batch_size is None:
                return 409, {"error": "this run does not take picks (its sampler has not reported a batch size)"}
            if not 0 <= index < self._batch_size:
                if self._batch_size == 1:
                    problem = f"index {index} is out of range: the run's batch size is 1 (only index 0)"
                else:
                    problem = (f"index {index} is out of range: the run's batch has {self._batch_size} items "
                               f"(0..{self._batch_size - 1})")
                return 400, {"error": problem, "batch_size": self._batch_size}
            replaced, self._pending = self._pending, index
        answer = {"picking": True, "index": index, "batch_size": self._batch_size}
        if replaced is not None and replaced != index:
            answer["replaced"] = replaced  # a pick not applied yet: the latest request wins
        return 200, answer


_lock = threading.Lock()
_running: dict[tuple[str, str], RunControl] = {}
_clients: dict[tuple[str, str], Optional[str]] = {}  # the client_id each run's prompt was queued with


_QUEUING_CLIENT = object()


@contextlib.contextmanager
def finishable_run(prompt_id: Optional[str], node_id: Optional[str],
                   client_id: Optional[str] = _QUEUING_CLIENT) -> Iterator[RunControl]:  # type: ignore[assignment]
    """Register a run for its duration and hand the sampler its RunControl (unregistered without both ids: then
    no client can reach it, and it is never asked anything). ``client_id``: the client that may steer it (by
    default the one the executing prompt was queued with; None: only requests that name no client)."""
    control = RunControl()
    key = (str(prompt_id), str(node_id)) if prompt_id is not None and node_id is not None else None
    if key is not None:
        with _lock:
            _running[key] = control
            _clients[key] = queuing_client_id() if client_id is _QUEUING_CLIENT else client_id
    try:
        yield control
    finally:
        if key is not None:
            with _lock:
                if _running.get(key) is control:
                    del _running[key]
                    _clients.pop(key, None)


def _entry(key: tuple[str, str], control: RunControl) -> dict:
    return {"prompt_id": key[0], "node_id": key[1], "batch_size": control.batch_size, "picked": control.picked}


def _may_steer(key: tuple[str, str], client_id: Optional[str]) -> bool:
    """Only the client whose id the run's prompt was queued with (None: a prompt queued without one)."""
    return _clients.get(key) == client_id


def _visible(client_id: Optional[str]) -> list[dict]:
    return [_entry(key, control) for key, control in _running.items() if _may_steer(key, client_id)]


def running_runs(client_id: Optional[str] = None) -> list[dict]:
    """The runs ``client_id`` can steer now (``prompt_id``, ``node_id``, ``batch_size``: None until the sampler reports
    it, ``picked``: the kept batch position or None); ``client_id`` None: the runs queued without a client id."""
    with _lock:
        return _visible(client_id)


def _find(prompt_id: str, node_id: str, client_id: Optional[str], verb: str) -> tuple[Optional[RunControl], int, dict]:
    """(the run's control, 0, {}) or (None, HTTP status, body) when it cannot be steered by that client. Call with
    _lock held."""
    if not _running:
        return None, 409, {"error": f"nothing to {verb}: no nested sampler is running"}
    control = _running.get((prompt_id, node_id))
    if control is None:
        return None, 404, {"error": f"no running nested sampler for prompt_id {prompt_id!r} and node_id {node_id!r}",
                           "running": _visible(client_id)}
    if not _may_steer((prompt_id, node_id), client_id):
        if client_id is None:
            return None, 403, {"error": f"that run was queued with a client_id: send it as client_id to {verb} it (a "
                                        f"client can {verb} only its own runs)"}
        return None, 403, {"error": f"that run was queued by another client: a client can {verb} only its own runs"}
    return control, 0, {}


def request_finish(prompt_id: str, node_id: str, client_id: Optional[str] = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a finish request: only for a run queued with ``client_id`` (None: without one)."""
    with _lock:
        control, status, answer = _find(prompt_id, node_id, client_id, "finish")
        if control is None:
            return status, answer
        control.request_finish()
    return 200, {"finishing": True, "prompt_id": prompt_id, "node_id": node_id}


def request_pick(prompt_id: str, node_id: str, index: int, client_id: Optional[str] = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a pick: keep only batch item ``index`` from the run's next outer boundary on.
    Only for a run queued with ``client_id`` (None: without one)."""
    with _lock:
        control, status, answer = _find(prompt_id, node_id, client_id, "pick in")
        if control is None:
            return status, answer
        status, answer = control.offer_pick(index)
    if status == 200:
        answer.update(prompt_id=prompt_id, node_id=node_id)
    return status, answer


def _parse_client_id(body: dict) -> tuple[Optional[str], Optional[str]]:
    client_id = body.get("client_id")
    if client_id is not None and (not isinstance(client_id, str) or not client_id or len(client_id) > 200):
        return None, "client_id, when given, must be a non-empty string of at most 200 characters: the client_id " \
                     "the prompt was queued with"
    return client_id, None


def _parse_ids(prompt_id: object, node_id: object, node_field: str) -> tuple[Optional[tuple], Optional[str]]:
    if isinstance(node_id, int) and not isinstance(node_id, bool):
        node_id = str(node_id)
    if not isinstance(prompt_id, str) or not prompt_id or not isinstance(node_id, str) or not node_id:
        return None, f"prompt_id and {node_field} must be non-empty strings naming the running prompt and node"
    if len(prompt_id) > 200 or len(node_id) > 200:
        return None, f"prompt_id and {node_field} must be at most 200 characters"
    return (prompt_id, node_id), None


def parse_finish_request(body: object) -> tuple[Optional[tuple], Optional[str]]:
    """((prompt_id, node_id, client_id or None), None) for a well-formed request, else (None, what is wrong)."""
    if not isinstance(body, dict):
        return None, "the body must be a JSON object with string fields prompt_id and node_id (and client_id)"
    client_id, problem = _parse_client_id(body)
    if problem is None:
        ids, problem = _parse_ids(body.get("prompt_id"), body.get("node_id"), "node_id")
    if problem is not None:
        return None, problem
    return (*ids, client_id), None


def parse_pick_request(body: object) -> tuple[Optional[tuple], Optional[str]]:
    """((prompt_id, node_id, index, client_id or None), None) for a well-formed request, else (None, what is
    wrong). The node is ``node`` (as in the events) or ``node_id`` (as in the finish route)."""
    if not isinstance(body, dict):
        return None, "the body must be a JSON object with fields prompt_id, node and index (and client_id)"
    client_id, problem = _parse_client_id(body)
    if problem is None:
        ids, problem = _parse_ids(body.get("prompt_id"), body.get("node", body.get("node_id")), "node")
    if problem is not None:
        return None, problem
    index = body.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        return None, "index must be an integer: the batch position of the item to keep (0 for the first)"
    if index < 0:
        return None, f"index {index} is out of range: batch positions start at 0"
    return (*ids, index, client_id), None


def json_route(parse, act):
    """An aiohttp handler for a JSON steering request: ``parse(body)`` gives (arguments, None) or (None, the problem:
    400), then ``act(*arguments)`` (a function or a coroutine function) gives (HTTP status, JSON body)."""
    from aiohttp import web

    async def handle(request):
        try:
            body = await request.json()
        except Exception:
            return web.json_response({"error": "the body must be valid JSON"}, status=400)
        args, problem = parse(body)
        if problem is not None:
            return web.json_response({"error": problem}, status=400)
        result = act(*args)
        status, answer = (await result) if inspect.isawaitable(result) else result
        return web.json_response(answer, status=status)
    return handle


def register_routes() -> None:
    """Add the routes (and the outer_previews prompt handler) to ComfyUI's server, when one is running (not in plain
    in-process use)."""
    server = prompt_server()
    if server is None:
        return
    from aiohttp import web

    server.routes.post(FINISH_ROUTE)(json_route(parse_finish_request, request_finish))
    server.routes.post(PICK_ROUTE)(json_route(parse_pick_request, request_pick))

    @server.routes.get(RUNNING_ROUTE)
    async def running(request):
        client_id = request.query.get("client_id") or None
        return web.json_response({"running": running_runs(client_id)})

    logging.info("nested diffusion: finish-now and pick routes registered")
    register_prompt_handler(server)
