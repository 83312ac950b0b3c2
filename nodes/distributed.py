"""Steering a whole ComfyUI-Distributed job from the master: Finish now and picks reach every server of the job.

ComfyUI-Distributed (robertvoy/ComfyUI-Distributed) queues one prompt on the master and a copy on each worker. The
copies keep the master's node ids, and every ``DistributedCollector`` in them carries the job's ``multi_job_id``; the
master's collector also lists the job's workers (``enabled_worker_ids``). This module adds two routes to the master,
and nothing else (no transport, no discovery of its own):

* ``POST /nested_diffusion/job/finish`` with ``{"prompt_id", "node_id", "client_id"}`` (the master's prompt and
  node): finishes that node's nested run on the master and on every worker of the job.
* ``POST /nested_diffusion/job/pick`` with ``{"prompt_id", "node" (or "node_id"), "index", "server", "client_id"}``:
  ``server`` is ``"master"`` or a worker id of ComfyUI-Distributed's config; that server keeps only batch item
  ``index``, every other server of the job finishes now. The pick is asked first: when that server refuses it,
  nothing else changes.

How the master finds the workers' runs, with ComfyUI-Distributed's own data only: the job's worker ids from the master
prompt's collector, their addresses from ``GET /distributed/config`` on the master, and on each worker the running
prompt whose collector carries the job's ``multi_job_id`` (``GET /queue``). It then calls the worker's own
``/nested_diffusion/finish`` or ``/pick`` route.

Who may steer: the request must carry the ``client_id`` the master's prompt was queued with (as the single-server
routes ask). The master then forwards with the client id the worker's prompt was queued with, read from that prompt
on the worker (ComfyUI-Distributed queues it with the master prompt's client id over its worker websocket, and with
none over HTTP). So a client steers a worker's run only by proving that it queued the job on the master. ComfyUI has
no authentication and ``GET /queue`` shows client ids (see steering.py): this keeps clients apart, it stops no attacker.

Without ComfyUI-Distributed installed (no such folder among the custom nodes) the routes are not added.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, Optional

from ..protocol import FINISH_ROUTE, JOB_FINISH_ROUTE, JOB_PICK_ROUTE, PICK_ROUTE
from .prompt_server import prompt_server
from .steering import json_route, parse_finish_request, parse_pick_request, request_finish, request_pick

COLLECTOR = "DistributedCollector"
MASTER = "master"
WORKER_TIMEOUT = 5.0  # seconds for each request to a worker: a worker that is gone costs at most this
CONNECT_TIMEOUT = 2.0


# -- ComfyUI-Distributed present? -------------------------------------------------------------------------------
def _is_distributed_folder(path: str) -> bool:
    """A custom node folder holding ComfyUI-Distributed (its pyproject names it; a copy without one by its files)."""
    try:
        with open(os.path.join(path, "pyproject.toml"), encoding="utf-8") as handle:
            text = handle.read(4096)
        return 'name = "comfyui-distributed"' in text.lower()
    except OSError:
        return os.path.isfile(os.path.join(path, "distributed.py")) and os.path.isdir(os.path.join(path, "api"))


def distributed_installed(custom_node_dirs: Optional[list[str]] = None) -> bool:
    """Whether ComfyUI-Distributed is among the custom nodes (a folder with "distributed" in its name, not disabled).

    Read from the folders, not from loaded modules: custom nodes load in folder order, so it may load after this pack.
    """
    if custom_node_dirs is None:
        try:
            import folder_paths
            custom_node_dirs = folder_paths.get_folder_paths("custom_nodes")
        except Exception:
            return False
    for root in custom_node_dirs:
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            lowered = name.lower()
            if "distributed" in lowered and not lowered.endswith(".disabled") and \
                    _is_distributed_folder(os.path.join(root, name)):
                return True
    return False


# -- the job, read from a prompt --------------------------------------------------------------------------------
def job_ids(prompt: Any) -> frozenset[str]:
    """The ``multi_job_id`` of every DistributedCollector in an API-format prompt (empty: not a distributed job)."""
    if not isinstance(prompt, dict):
        return frozenset()
    found = set()
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") == COLLECTOR:
            job = (node.get("inputs") or {}).get("multi_job_id")
            if isinstance(job, str) and job:
                found.add(job)
    return frozenset(found)


def job_worker_ids(prompt: Any) -> list[str]:
    """The worker ids the master's collectors list (``enabled_worker_ids``, a JSON list), in their order."""
    ids: list[str] = []
    if not isinstance(prompt, dict):
        return ids
    for node in prompt.values():
        if not isinstance(node, dict) or node.get("class_type") != COLLECTOR:
            continue
        listed = (node.get("inputs") or {}).get("enabled_worker_ids")
        try:
            listed = json.loads(listed) if isinstance(listed, str) else listed
        except ValueError:
            continue
        for worker_id in listed if isinstance(listed, list) else []:
            if str(worker_id) not in ids:
                ids.append(str(worker_id))
    return ids


def worker_url(worker: dict, master_address: str = "127.0.0.1") -> str:
    """A worker's base URL from its ComfyUI-Distributed config entry (the same rule ComfyUI-Distributed uses)."""
    host = str(worker.get("host") or "").strip() or master_address
    try:
        port = int(worker.get("port", worker.get("listen_port", 8188)) or 8188)
    except (TypeError, ValueError):
        port = 8188
    if host.startswith(("http://", "https://")):
        return host.rstrip("/")
    secure = worker.get("type") == "cloud" or host.endswith(".proxy.runpod.net") or port == 443
    scheme = "https" if secure else "http"
    default_port = 443 if secure else 80
    return f"{scheme}://{host}" + ("" if port == default_port else f":{port}")


def find_job_prompt(queue: dict, jobs: frozenset[str]) -> Optional[tuple[str, Optional[str], bool]]:
    """(prompt_id, the client_id it was queued with, whether it runs) of the ``GET /queue`` item (each [number,
    prompt_id, prompt, extra_data, ...]) that belongs to the job, or None."""
    running = [(item, True) for item in queue.get("queue_running") or []]
    pending = [(item, False) for item in queue.get("queue_pending") or []]
    for item, is_running in running + pending:
        if not isinstance(item, (list, tuple)) or len(item) < 4:
            continue
        if job_ids(item[2]) & jobs:
            extra = item[3] if isinstance(item[3], dict) else {}
            client_id = extra.get("client_id")
            return str(item[1]), client_id if isinstance(client_id, str) and client_id else None, is_running
    return None


# -- the master's side --------------------------------------------------------------------------------------------
def _master_prompt(prompt_id: str) -> Optional[tuple[dict, Optional[str]]]:
    """(prompt, client_id) of the master's running or pending prompt ``prompt_id``, else None."""
    running, pending = prompt_server().prompt_queue.get_current_queue_volatile()
    for item in [*running, *pending]:
        if len(item) >= 4 and str(item[1]) == prompt_id:
            extra = item[3] if isinstance(item[3], dict) else {}
            client_id = extra.get("client_id")
            return item[2], client_id if isinstance(client_id, str) and client_id else None
    return None


def _own_url() -> str:
    """The master's own address, for its ``GET /distributed/config``."""
    server = prompt_server()
    host = str(getattr(server, "address", "") or "127.0.0.1")
    if host in ("0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{getattr(server, 'port', 8188)}"


async def _get_json(session, url: str) -> Any:
    async with session.get(url) as response:
        response.raise_for_status()
        return await response.json()


async def _post_json(session, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, json=body) as response:
        try:
            answer = await response.json(content_type=None)
        except ValueError:
            answer = {"error": f"HTTP {response.status}"}
        return response.status, answer if isinstance(answer, dict) else {"answer": answer}


async def _job_workers(session, worker_ids: list[str]) -> list[dict]:
    """``{"id", "name", "url"}`` for each of the job's workers, from ComfyUI-Distributed's config on the master."""
    config = await _get_json(session, f"{_own_url()}/distributed/config")
    master_address = str((config.get("master") or {}).get("host") or "") or "127.0.0.1"
    by_id = {str(worker.get("id")): worker for worker in config.get("workers") or [] if isinstance(worker, dict)}
    workers = []
    for worker_id in worker_ids:
        entry = by_id.get(worker_id)
        if entry is None:
            workers.append({"id": worker_id, "name": worker_id, "url": None})
        else:
            workers.append({"id": worker_id, "name": str(entry.get("name") or worker_id),
                            "url": worker_url(entry, master_address)})
    return workers


async def _steer_worker(session, worker: dict, jobs: frozenset[str], route: str, body: dict) -> dict:
    """Send ``body`` to the worker's own steering ``route`` for its prompt of this job, with that prompt's client id."""
    report = {"server": worker["id"], "name": worker["name"]}
    if worker["url"] is None:
        return {**report, "status": 404, "answer": {"error": "that worker is not in ComfyUI-Distributed's config"}}
    try:
        found = find_job_prompt(await _get_json(session, f"{worker['url']}/queue"), jobs)
        if found is None:
            return {**report, "status": 404, "answer": {"error": "the worker runs no prompt of this job now"}}
        prompt_id, client_id, running = found
        if not running:
            return {**report, "status": 409, "answer": {"error": "the worker has not started this job's prompt yet"}}
        forwarded = {**body, "prompt_id": prompt_id}
        if client_id is not None:
            forwarded["client_id"] = client_id
        status, answer = await _post_json(session, f"{worker['url']}{route}", forwarded)
        return {**report, "status": status, "answer": answer}
    except Exception as error:  # a worker that is gone or answers garbage: report it, steer the others
        return {**report, "status": 502, "answer": {"error": f"worker unreachable: {type(error).__name__}: {error}"}}


def _session():
    import aiohttp

    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT, connect=CONNECT_TIMEOUT))


def _authorize(prompt_id: str, client_id: Optional[str], verb: str) -> tuple[Optional[dict], int, dict]:
    """(the master's prompt, 0, {}) when ``client_id`` queued it, else (None, HTTP status, body)."""
    found = _master_prompt(prompt_id)
    if found is None:
        return None, 409, {"error": f"nothing to {verb}: prompt {prompt_id!r} is not running or queued here"}
    prompt, owner = found
    if owner != client_id:
        return None, 403, {"error": f"that prompt was queued by another client: a client can {verb} only its own runs"}
    return prompt, 0, {}


def _summary(reports: list[dict], **fields) -> tuple[int, dict]:
    """200 when some server took the request, else the master's own refusal (or 409 when it had no run)."""
    acted = [report["server"] for report in reports if report["status"] == 200]
    answer = {**fields, "servers": reports, "acted_on": acted}
    if acted:
        return 200, answer
    master = next((report for report in reports if report["server"] == MASTER), None)
    status = master["status"] if master is not None and master["status"] in (400, 403) else 409
    answer["error"] = "no server of this job could take it: " + "; ".join(
        f"{report['server']}: {report['answer'].get('error', report['status'])}" for report in reports)
    return status, answer


def _local(status_answer: tuple[int, dict]) -> dict:
    status, answer = status_answer
    return {"server": MASTER, "name": MASTER, "status": status, "answer": answer}


async def finish_job(prompt_id: str, node_id: str, client_id: Optional[str]) -> tuple[int, dict]:
    """Finish node ``node_id``'s nested runs on the master and on every worker of the master prompt's job."""
    prompt, status, answer = _authorize(prompt_id, client_id, "finish")
    if prompt is None:
        return status, answer
    started = time.perf_counter()
    reports = [_local(request_finish(prompt_id, node_id, client_id))]
    jobs = job_ids(prompt)
    if jobs:
        async with _session() as session:
            try:
                workers = await _job_workers(session, job_worker_ids(prompt))
            except Exception as error:
                workers = []
                logging.warning("nested diffusion: could not read ComfyUI-Distributed's config: %s", error)
            reports += await asyncio.gather(*[
                _steer_worker(session, worker, jobs, FINISH_ROUTE, {"node_id": node_id}) for worker in workers])
    return _summary(reports, finishing=True, prompt_id=prompt_id, node_id=node_id,
                    seconds=round(time.perf_counter() - started, 4))


async def pick_in_job(prompt_id: str, node_id: str, index: int, server_id: str,
                      client_id: Optional[str]) -> tuple[int, dict]:
    """Server ``server_id`` keeps only batch item ``index`` of node ``node_id``; the job's other servers finish."""
    prompt, status, answer = _authorize(prompt_id, client_id, "pick in")
    if prompt is None:
        return status, answer
    jobs = job_ids(prompt)
    async with _session() as session:
        workers = []
        if jobs:
            try:
                workers = await _job_workers(session, job_worker_ids(prompt))
            except Exception as error:
                logging.warning("nested diffusion: could not read ComfyUI-Distributed's config: %s", error)
        if server_id == MASTER:
            picked = _local(request_pick(prompt_id, node_id, index, client_id))
        else:
            target = next((worker for worker in workers if worker["id"] == server_id), None)
            if target is None:
                known = [MASTER] + [worker["id"] for worker in workers]
                return 400, {"error": f"server {server_id!r} is not part of this job (its servers: {known})"}
            picked = await _steer_worker(session, target, jobs, PICK_ROUTE, {"node": node_id, "index": index})
        if picked["status"] != 200:
            return picked["status"], {**picked["answer"], "server": server_id}
        others = [worker for worker in workers if worker["id"] != server_id]
        reports = [picked]
        if server_id != MASTER:
            reports.append(_local(request_finish(prompt_id, node_id, client_id)))
        reports += await asyncio.gather(*[
            _steer_worker(session, worker, jobs, FINISH_ROUTE, {"node_id": node_id}) for worker in others])
    return 200, {"picking": True, "index": index, "server": server_id, "prompt_id": prompt_id, "node_id": node_id,
                 "servers": reports}


def parse_job_pick_request(body: object) -> tuple[Optional[tuple], Optional[str]]:
    """((prompt_id, node_id, index, server, client_id), None), else (None, what is wrong)."""
    args, problem = parse_pick_request(body)
    if problem is not None:
        return None, problem
    server_id = body.get("server", MASTER)
    if isinstance(server_id, int) and not isinstance(server_id, bool):
        server_id = str(server_id)
    if not isinstance(server_id, str) or not server_id or len(server_id) > 200:
        return None, "server must be \"master\" or a worker id of ComfyUI-Distributed's config"
    prompt_id, node_id, index, client_id = args
    return (prompt_id, node_id, index, server_id, client_id), None


def register_distributed_routes() -> bool:
    """Add the job routes to ComfyUI's server when ComfyUI-Distributed is installed; returns whether it did."""
    server = prompt_server()
    if server is None or not distributed_installed():
        return False
    server.routes.post(JOB_FINISH_ROUTE)(json_route(parse_finish_request, finish_job))
    server.routes.post(JOB_PICK_ROUTE)(json_route(parse_job_pick_request, pick_in_job))
    logging.info("nested diffusion: ComfyUI-Distributed found: job-wide finish-now and pick routes registered")
    return True
