"""A small client for ComfyUI's HTTP + websocket API (depends only on ``requests`` and ``websocket-client``).

Copy this file wherever you need to drive ComfyUI from Python. Typical use::

    from comfy_api_client import ComfyAPIClient, ExecutionError, PromptValidationError
    from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT   # the pack's event names (protocol.py)

    with ComfyAPIClient("http://127.0.0.1:8188") as client:      # opens the websocket
        prompt_id = client.queue_prompt(api_prompt)               # API-format dict: {node_id: {class_type, inputs}}
        for event in client.stream(prompt_id, timeout=600):
            if event["type"] == OUTER_STEP_EVENT:
                print(event["data"]["outer_step"], "/", event["data"]["outer_steps"])
            elif event["type"] == "preview_image":
                open("preview.jpg", "wb").write(event["data"]["image"])
        outputs = client.history(prompt_id)["outputs"]
        for image in outputs["9"]["images"]:
            png_bytes = client.fetch_output(image)

Events. ``stream`` yields one dict per websocket message, always ``{"type": str, "data": ...}``:

* JSON messages exactly as ComfyUI sends them (``status``, ``execution_start``, ``execution_cached``,
  ``executing``, ``progress``, ``progress_state``, ``executed``, ``execution_success``, custom events such
  as the pack's ``protocol.OUTER_STEP_EVENT``, ...).
* Binary preview frames, decoded, as ``{"type": "preview_image", "data": {...}}`` with ``data`` keys
  ``image`` (the encoded bytes), ``image_type`` (``"image/jpeg"`` or ``"image/png"``), ``node`` (the node
  that sent it: from the frame's metadata when present, else the node ComfyUI last reported as executing),
  ``prompt_id``, ``metadata`` (the frame's metadata dict, or None) and ``binary_type`` (1 or 4).
  ComfyUI's binary format is a 4-byte big-endian event type followed by the payload:

  - 1 PREVIEW_IMAGE: 4-byte big-endian image type (1 JPEG, 2 PNG), then the image bytes;
  - 4 PREVIEW_IMAGE_WITH_METADATA (ComfyUI >= 0.3.4x, sent only to clients that announce the
    ``supports_preview_metadata`` feature flag): 4-byte big-endian length N, N bytes of JSON metadata
    (``node_id``, ``prompt_id``, ``display_node_id``, ``parent_node_id``, ``real_node_id``, ``image_type``),
    then the image bytes.

* Binary text frames (type 3, node progress text) as ``{"type": "progress_text", "data": {"node", "text"}}``;
  any other binary frame as ``{"type": "binary", "data": {"binary_type": int, "payload": bytes}}``.

Connect (or use the ``with`` block) *before* queueing: ComfyUI sends events only to connected clients and
does not replay them. ``stream`` ends at ``executing`` with ``node`` None for the prompt, which ComfyUI sends
after the prompt's history is written, so ``history(prompt_id)`` is complete as soon as ``stream`` returns.
"""
from __future__ import annotations

import json
import struct
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterator, Mapping, Optional

import requests
import websocket

__all__ = [
    "ComfyAPIClient",
    "ComfyAPIError",
    "PromptValidationError",
    "ExecutionError",
    "ExecutionInterrupted",
    "SteeringRefused",
    "decode_binary_message",
]

# The Nested Diffusion pack's routes (the pack's protocol.py names them; spelled here so that this file stays
# standalone).
NESTED_FINISH_ROUTE = "/nested_diffusion/finish"
NESTED_PICK_ROUTE = "/nested_diffusion/pick"
NESTED_RUNNING_ROUTE = "/nested_diffusion/running"

# ComfyUI's protocol.BinaryEventTypes
PREVIEW_IMAGE = 1
UNENCODED_PREVIEW_IMAGE = 2  # server-internal: never on the wire (the server encodes it as type 1)
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_TYPES = {1: "image/jpeg", 2: "image/png"}


class ComfyAPIError(RuntimeError):
    """Any error reported by the ComfyUI server."""


class PromptValidationError(ComfyAPIError):
    """POST /prompt refused the prompt (HTTP 400).

    ``response`` is ComfyUI's JSON body: ``{"error": {"type", "message", "details", "extra_info"},
    "node_errors": {node_id: {"errors": [{"type", "message", "details", "extra_info": {"input_name", ...}}],
    "dependent_outputs": [...], "class_type": str}}}``; ``error`` and ``node_errors`` are its two parts.
    """

    def __init__(self, response: dict, status_code: int = 400):
        self.response = response if isinstance(response, dict) else {"error": response}
        self.status_code = status_code
        self.error = self.response.get("error")
        self.node_errors = self.response.get("node_errors") or {}
        super().__init__(self._describe())

    def _describe(self) -> str:
        error = self.error if isinstance(self.error, dict) else {"message": str(self.error)}
        lines = [f"prompt rejected (HTTP {self.status_code}): {error.get('message', '')} {error.get('details', '')}".rstrip()]
        for node_id, node in self.node_errors.items():
            for item in node.get("errors", []):
                name = (item.get("extra_info") or {}).get("input_name")
                where = f"{node.get('class_type', '?')} (node {node_id})" + (f" input {name!r}" if name else "")
                lines.append(f"  {where}: {item.get('message', '')}: {item.get('details', '')}")
        return "\n".join(lines)


class ExecutionError(ComfyAPIError):
    """The prompt failed while running. ``data`` is ComfyUI's ``execution_error`` message
    (``node_id``, ``node_type``, ``exception_type``, ``exception_message``, ``traceback``, ...)."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = data.get("node_id")
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type")
        self.exception_message = data.get("exception_message", "")
        super().__init__(
            f"{self.node_type} (node {self.node_id}) failed: {self.exception_type}: {self.exception_message}".strip()
        )


class ExecutionInterrupted(ComfyAPIError):
    """The prompt was interrupted (``interrupt()`` or the UI's cancel). ``data`` is the message."""

    def __init__(self, data: dict):
        self.data = data
        super().__init__(f"prompt {data.get('prompt_id')} interrupted at {data.get('node_type')} (node {data.get('node_id')})")


class SteeringRefused(ComfyAPIError):
    """The Nested Diffusion pack refused a finish or pick request. ``status_code``: 400 (malformed, or an index
    out of range), 403 (another client's run), 404 (no such run; ``answer["running"]`` lists this client's
    runs), 409 (nothing runs, or the run already took its one pick); ``answer``: the server's JSON body."""

    def __init__(self, status_code: int, answer: dict):
        self.status_code = status_code
        self.answer = answer if isinstance(answer, dict) else {"error": str(answer)}
        super().__init__(f"refused (HTTP {status_code}): {self.answer.get('error', '')}")


def decode_binary_message(message: bytes) -> dict:
    """One binary websocket frame -> an event dict (see the module docstring). ``node``/``prompt_id``
    of a type-1 preview are None here (the frame does not carry them); ``stream`` fills them in."""
    if len(message) < 4:
        return {"type": "binary", "data": {"binary_type": None, "payload": bytes(message)}}
    (event_type,) = struct.unpack(">I", message[:4])
    payload = bytes(message[4:])
    if event_type == PREVIEW_IMAGE and len(payload) >= 4:
        (image_type,) = struct.unpack(">I", payload[:4])
        return {"type": "preview_image", "data": {
            "image": payload[4:], "image_type": _IMAGE_TYPES.get(image_type, f"unknown/{image_type}"),
            "node": None, "prompt_id": None, "metadata": None, "binary_type": PREVIEW_IMAGE,
        }}
    if event_type == PREVIEW_IMAGE_WITH_METADATA and len(payload) >= 4:
        (length,) = struct.unpack(">I", payload[:4])
        metadata = json.loads(payload[4:4 + length].decode("utf-8"))
        return {"type": "preview_image", "data": {
            "image": payload[4 + length:], "image_type": metadata.get("image_type", "image/jpeg"),
            "node": metadata.get("node_id"), "prompt_id": metadata.get("prompt_id"), "metadata": metadata,
            "binary_type": PREVIEW_IMAGE_WITH_METADATA,
        }}
    if event_type == TEXT and len(payload) >= 4:
        (length,) = struct.unpack(">I", payload[:4])
        return {"type": "progress_text", "data": {
            "node": payload[4:4 + length].decode("utf-8", "replace"),
            "text": payload[4 + length:].decode("utf-8", "replace"),
        }}
    return {"type": "binary", "data": {"binary_type": event_type, "payload": payload}}


class ComfyAPIClient:
    """One websocket connection (one ``client_id``) plus the HTTP calls, against one ComfyUI server.

    ``url``: the server, e.g. ``"http://127.0.0.1:8188"``. ``client_id``: a fresh uuid if not given; events of
    prompts queued with it are sent to this connection only. ``preview_metadata``: announce the
    ``supports_preview_metadata`` feature, so previews arrive as type-4 frames naming their node and prompt
    (otherwise ComfyUI sends plain type-1 frames). ``http_timeout``: seconds per HTTP request.
    Not thread-safe: use one client per thread.
    """

    def __init__(self, url: str = "http://127.0.0.1:8188", client_id: Optional[str] = None, *,
                 preview_metadata: bool = True, http_timeout: float = 30.0):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.preview_metadata = preview_metadata
        self.http_timeout = http_timeout
        self.session = requests.Session()
        self.ws: Optional[websocket.WebSocket] = None
        self.server_features: dict = {}
        self._pending: deque = deque()  # events read while connecting, handed out by the next stream()

    # -- connection ---------------------------------------------------------------------------------
    @property
    def ws_url(self) -> str:
        scheme, rest = self.url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws?clientId={self.client_id}"

    def connect(self, timeout: float = 30.0) -> "ComfyAPIClient":
        """Open the websocket (and negotiate feature flags); returns self. Call before ``queue_prompt``."""
        if self.ws is not None:
            return self
        self.ws = websocket.create_connection(self.ws_url, timeout=timeout)
        if self.preview_metadata:
            # Must be the first message the client sends; wait for the server's answer so that the flag is
            # in place before any prompt of ours runs (older servers never answer: then go on after a while).
            self.ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
            deadline = time.monotonic() + min(timeout, 5.0)
            while time.monotonic() < deadline:
                event = self._receive(deadline)
                if event is None:
                    break
                if event["type"] == "feature_flags":
                    self.server_features = event.get("data") or {}
                    break
                self._pending.append(event)
        return self

    def close(self) -> None:
        if self.ws is not None:
            try:
                self.ws.close()
            finally:
                self.ws = None
        self.session.close()

    def __enter__(self) -> "ComfyAPIClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- HTTP ---------------------------------------------------------------------------------------
    def _get(self, path: str, **params) -> requests.Response:
        response = self.session.get(f"{self.url}{path}", params=params or None, timeout=self.http_timeout)
        response.raise_for_status()
        return response

    def wait_until_up(self, timeout: float = 60.0, interval: float = 0.5) -> None:
        """Block until the server answers ``GET /object_info``; raises TimeoutError."""
        deadline = time.monotonic() + timeout
        last_error: Any = None
        while time.monotonic() < deadline:
            try:
                response = self.session.get(f"{self.url}/object_info", timeout=min(self.http_timeout, 10.0))
                if response.status_code == 200:
                    return
                last_error = f"HTTP {response.status_code}"
            except requests.RequestException as error:
                last_error = error
            time.sleep(interval)
        raise TimeoutError(f"ComfyUI at {self.url} did not answer /object_info within {timeout:.0f} s: {last_error}")

    def object_info(self, node_class: Optional[str] = None) -> dict:
        """``GET /object_info`` (all nodes) or ``/object_info/{node_class}``: {class: {input, output, ...}}."""
        return self._get(f"/object_info/{node_class}" if node_class else "/object_info").json()

    def queue_prompt(self, prompt: dict, *, extra_data: Optional[dict] = None, prompt_id: Optional[str] = None,
                     front: bool = False) -> str:
        """``POST /prompt`` with this client's ``client_id``; returns the prompt_id.

        Raises PromptValidationError (carrying ComfyUI's JSON) when the server rejects the prompt (HTTP 400).
        """
        body: dict = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if prompt_id:
            body["prompt_id"] = prompt_id
        if front:
            body["front"] = True
        response = self.session.post(f"{self.url}/prompt", json=body, timeout=self.http_timeout)
        if response.status_code == 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {"error": {"message": response.text}}
            raise PromptValidationError(payload, response.status_code)
        response.raise_for_status()
        return response.json()["prompt_id"]

    def history(self, prompt_id: str) -> dict:
        """``GET /history/{prompt_id}``: that prompt's entry (``prompt``, ``outputs``, ``status``, ``meta``),
        or ``{}`` while it is not finished."""
        return self._get(f"/history/{prompt_id}").json().get(prompt_id, {})

    def fetch_image(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:  # noqa: A002
        """``GET /view``: the bytes of a saved image (``type`` is "output", "temp" or "input")."""
        return self._get("/view", filename=filename, subfolder=subfolder, type=type).content

    def fetch_output(self, item: Mapping[str, Any]) -> bytes:
        """The bytes of one image entry of an output (``/history`` or the ``executed`` event) as ComfyUI lists it.

        Only its ``filename``, ``subfolder`` and ``type`` name the file: newer ComfyUI adds keys of its own to each
        entry (``metadata``; ``id`` and ``preview_id`` with its assets system), which ``/view`` does not take."""
        return self.fetch_image(item["filename"], item.get("subfolder", ""), item.get("type", "output"))

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        """``POST /interrupt``: stop the running prompt (only that one when ``prompt_id`` is given)."""
        body = {"prompt_id": prompt_id} if prompt_id else {}
        self.session.post(f"{self.url}/interrupt", json=body, timeout=self.http_timeout).raise_for_status()

    def queue(self) -> dict:
        """``GET /queue``: {"queue_running": [...], "queue_pending": [...]}."""
        return self._get("/queue").json()

    # -- steering a nested sampler (the Nested Diffusion pack's routes) -------------------------------
    def _steer(self, path: str, body: dict) -> dict:
        response = self.session.post(f"{self.url}{path}", json={**body, "client_id": self.client_id},
                                     timeout=self.http_timeout)
        try:
            answer = response.json()
        except ValueError:
            answer = {"error": response.text}
        if response.status_code != 200:
            raise SteeringRefused(response.status_code, answer)
        return answer

    def running(self) -> list[dict]:
        """``GET /nested_diffusion/running``: this client's running nested samplers, each
        ``{"prompt_id", "node_id", "batch_size", "picked"}``."""
        return self._get(NESTED_RUNNING_ROUTE, client_id=self.client_id).json()["running"]

    def finish(self, prompt_id: str, node: str) -> dict:
        """'Finish now': the nested sampler ``node`` of this client's prompt ``prompt_id`` ends after its current
        inner diffusion and returns that image. Returns the server's answer; raises SteeringRefused."""
        return self._steer(NESTED_FINISH_ROUTE, {"prompt_id": prompt_id, "node_id": str(node)})

    def pick(self, prompt_id: str, node: str, index: int) -> dict:
        """'Keep only this': from its next outer boundary on, the nested sampler ``node`` of this client's prompt
        ``prompt_id`` continues only batch item ``index`` (its position in the batch; the
        ``nested_diffusion.candidates`` event lists the candidates in that order) and sends
        ``nested_diffusion.picked``. One pick per run. Returns the server's answer (``{"picking": true, "index",
        "batch_size", ...}``); raises SteeringRefused."""
        return self._steer(NESTED_PICK_ROUTE, {"prompt_id": prompt_id, "node": str(node), "index": index})

    # -- websocket ----------------------------------------------------------------------------------
    def _receive(self, deadline: float) -> Optional[dict]:
        """The next websocket message as an event dict, or None when the deadline passes first."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.ws.settimeout(remaining)
        try:
            opcode, message = self.ws.recv_data()
        except websocket.WebSocketTimeoutException:
            return None
        if opcode == websocket.ABNF.OPCODE_TEXT:
            return json.loads(message.decode("utf-8") if isinstance(message, bytes) else message)
        if opcode == websocket.ABNF.OPCODE_BINARY:
            return decode_binary_message(message)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            raise ComfyAPIError("the server closed the websocket")
        return {"type": "websocket", "data": {"opcode": opcode}}

    def events(self, timeout: float) -> Iterator[dict]:
        """Every message on the websocket, unfiltered, until ``timeout`` seconds pass with none (low level)."""
        if self.ws is None:
            self.connect()
        while self._pending:
            yield self._pending.popleft()
        while True:
            event = self._receive(time.monotonic() + timeout)
            if event is None:
                return
            yield event

    def stream(self, prompt_id: str, on_event: Optional[Callable[[dict], None]] = None,
               timeout: float = 600.0) -> Iterator[dict]:
        """Yield the events of one prompt until it has finished (see the module docstring for their shape).

        Events of other prompts are skipped; messages that name no prompt (``status``, ...) are passed on.
        ``on_event(event)`` is called for each event yielded, before it is yielded. Ends after ``executing``
        with ``node`` None for ``prompt_id`` (or ``execution_success`` if the server never sends that).
        Raises ExecutionError on ``execution_error`` and ExecutionInterrupted on ``execution_interrupted``
        (after reading on to the end of the prompt, so the connection is ready for the next one), and
        TimeoutError when the prompt has not finished ``timeout`` seconds after the call.
        """
        if self.ws is None:
            self.connect()
        deadline = time.monotonic() + timeout
        running: Optional[str] = None  # the prompt ComfyUI is running for this client
        node: Optional[str] = None  # ... and its executing node (to attribute type-1 previews)
        failure: Optional[ComfyAPIError] = None
        succeeded = False
        while True:
            if self._pending:
                event = self._pending.popleft()
            else:
                event = self._receive(deadline)
                if event is None:
                    if failure is not None:  # the error was seen; the end marker never came
                        raise failure
                    if succeeded:
                        return
                    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            kind = event.get("type")
            data = event.get("data")
            if kind == "preview_image":
                if data.get("prompt_id") is None:
                    if running != prompt_id:
                        continue
                    data["prompt_id"] = running
                    data["node"] = data["node"] or node
                elif data["prompt_id"] != prompt_id:
                    continue
            elif isinstance(data, dict) and data.get("prompt_id") is None and "prompt_id" in data:
                if running != prompt_id:  # e.g. a custom event sent outside an execution context
                    continue
            elif isinstance(data, dict) and "prompt_id" in data:
                if data["prompt_id"] != prompt_id:
                    if kind == "execution_start":
                        running = data["prompt_id"]
                    continue
                if kind == "execution_start":
                    running = prompt_id
                elif kind == "executing":
                    node = data.get("node")
            if on_event is not None:
                on_event(event)
            yield event
            if not isinstance(data, dict) or data.get("prompt_id") != prompt_id:
                continue
            if kind == "execution_error":
                failure = ExecutionError(data)
            elif kind == "execution_interrupted":
                failure = ExecutionInterrupted(data)
            elif kind == "execution_success":
                succeeded = True
                deadline = min(deadline, time.monotonic() + 5.0)  # the end marker follows at once
            elif kind == "executing" and data.get("node") is None:
                if failure is not None:
                    raise failure
                return

    def run(self, prompt: dict, timeout: float = 600.0, on_event: Optional[Callable[[dict], None]] = None) -> tuple[str, list[dict]]:
        """Queue ``prompt``, wait for it; returns (prompt_id, the list of its events)."""
        prompt_id = self.queue_prompt(prompt)
        return prompt_id, list(self.stream(prompt_id, on_event=on_event, timeout=timeout))


def widget_defaults(node_info: dict) -> dict:
    """The default of every required widget input (INT, FLOAT, STRING, BOOLEAN, COMBO) of one node."""
    defaults = {}
    for name, spec in node_info["input"]["required"].items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):  # V1 combo: the list of choices
            defaults[name] = options.get("default", kind[0])
        elif kind == "COMBO":
            defaults[name] = options.get("default", options["options"][0])
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN") and "default" in options:
            defaults[name] = options["default"]
    return defaults
