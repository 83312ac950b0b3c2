#!/usr/bin/env python3
"""Load test: many mixed prompts from several API clients at once, on one ComfyUI server with this pack.

    scripts/python.sh -m comfyui_nested_diffusion.scripts.load_test                      # starts its own server: 200 prompts, 4 clients
    scripts/python.sh -m comfyui_nested_diffusion.scripts.load_test --json load.json     # ... and writes the figures as JSON
    scripts/python.sh -m comfyui_nested_diffusion.scripts.load_test --url http://127.0.0.1:8188 --pid 12345   # a running server

Every client has its own websocket and ``client_id`` and runs in its own thread. The prompts alternate between
NestedKSampler (2-3 outer x 2-3 inner steps; every other one also with OuterStepPreview) and a plain KSampler with the same total steps, each with its own
seed, on the pack's exact exemplar model (32x32 pixels, batch 1, no weights needed), decoded by the stock
``pixel_space`` VAE and saved by SaveImage. Client 0 takes plain (type 1) preview frames, the others ask for
previews with metadata (type 4, naming their prompt).

It runs in two phases: ``--warmup`` prompts (default 20), then the rest. Checks, each reported PASS/FAIL:

* every prompt finishes with ``execution_success`` and its history holds the saved image;
* isolation: every websocket event that names a prompt names one of the receiving client's own prompts; every
  preview arrives while one of the client's own prompts is running (and, with metadata, names that prompt);
  each nested prompt's ``nested_diffusion.outer_step`` events are exactly 1..K with its prompt_id, each vanilla
  prompt has none;
* memory: the server's resident memory (its process and children, measured with psutil) after the run is within
  ``--memory-tolerance`` (default 5%) of its value after the warm-up phase.

``--mixed`` makes the workload a mix per client: good nested and vanilla prompts, bad inputs (a clear
``NestedDiffusionError`` expected), prompts the client cancels (``POST /interrupt`` with its prompt_id) at a random
moment after they start, and prompts it ends with Finish now (its own client_id) after a random outer step, also
asking to finish another client's run (which must be refused). Checks on top: every prompt ends (nothing lost) with
the outcome its kind allows, only cancelled prompts are interrupted, finished ones save their image with fewer or
all outer steps, every finish of a foreign run is refused.

Prints the figures and PASS or FAIL; the exit status is 0 on PASS, 1 on FAIL (2 when the server cannot start).
``tests/server_api/test_reliability_api.py`` runs a reduced version through ``run_load_test``.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from comfyui_nested_diffusion.protocol import FINISH_ROUTE, OUTER_STEP_EVENT, RUNNING_ROUTE
from comfyui_nested_diffusion.tools.api_graphs import SAMPLER, SAVE, exemplar_graph
from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, widget_defaults

SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m")
NESTED_SHAPES = ((2, 3), (3, 2))  # (outer, inner)
MIXED_KINDS = ("nested", "vanilla", "bad", "cancel", "nested", "finish", "vanilla", "nested")  # --mixed, by index % 8
STEERED_SHAPE = (12, 3)  # (outer, inner) of the prompts a client cancels or finishes
END_EVENTS = {"execution_success": "success", "execution_error": "error", "execution_interrupted": "interrupted"}


# -- prompts --------------------------------------------------------------------------------------------------
def prompt_spec(index: int, seed_base: int, mixed: bool = False) -> dict:
    """What prompt number ``index`` runs: nested on even numbers, vanilla on odd, solvers and shapes rotating; with
    ``mixed``, MIXED_KINDS (bad inputs, cancelled and finished prompts among them)."""
    outer, inner = NESTED_SHAPES[(index // 2) % len(NESTED_SHAPES)]
    kind = MIXED_KINDS[index % len(MIXED_KINDS)] if mixed else ("nested" if index % 2 == 0 else "vanilla")
    if kind in ("cancel", "finish"):
        outer, inner = STEERED_SHAPE
    steer = random.Random(seed_base * 7919 + index)
    return {
        "index": index,
        "kind": kind,
        "cancel_after": steer.uniform(0.0, 0.6),  # seconds after its execution_start ("cancel")
        "finish_after_step": steer.randint(1, outer),  # outer step after which it asks to finish ("finish")
        "sampler": SAMPLERS[(index // 2) % len(SAMPLERS)],
        "outer": outer,
        "inner": inner,
        "seed": seed_base + index,
        "outer_step_preview": index % 4 == 0,  # every other nested prompt also shows OuterStepPreview's images
    }


def build_prompt(spec: dict, client_index: int, exemplar_defaults: dict, size: int) -> dict:
    inputs = {"seed": spec["seed"], "cfg": 1.0, "sampler_name": spec["sampler"], "scheduler": "normal", "denoise": 1.0}
    if spec["kind"] != "vanilla":
        sampler_type, inputs = "NestedKSampler", {**inputs, "outer_steps": spec["outer"], "inner_steps": spec["inner"]}
        if spec["kind"] == "bad":  # passes validation, refused by the node: max_nfe below one inner diffusion
            inputs["max_nfe"] = 1
    else:
        sampler_type, inputs = "KSampler", {**inputs, "steps": spec["outer"] * spec["inner"]}
    return exemplar_graph(sampler_type, inputs, size=size, exemplar_defaults=exemplar_defaults,
                          prefix=f"load_test/client{client_index}",
                          outer_step_preview=spec["kind"] == "nested" and bool(spec.get("outer_step_preview")))


# -- memory ---------------------------------------------------------------------------------------------------
def find_server_pid(url: str) -> Optional[int]:
    """The pid listening on the URL's port (needs psutil; None if it cannot be seen)."""
    try:
        import psutil

        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for connection in psutil.net_connections(kind="tcp"):
            if connection.laddr and connection.laddr.port == port and connection.status == psutil.CONN_LISTEN:
                return connection.pid
    except Exception:
        return None
    return None


def resident_memory(pid: int) -> int:
    """Resident set size of the process and all its children, in bytes."""
    import psutil

    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


class MemorySampler:
    """Samples the server's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, pid: Optional[int], interval: float = 0.5):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, resident_memory(self.pid))
            except Exception:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> "MemorySampler":
        if self.pid is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


# -- one client -----------------------------------------------------------------------------------------------
class LoadClient:
    """One API client (own websocket, own client_id) that queues its prompts and checks every event it receives."""

    def __init__(self, index: int, url: str, exemplar_defaults: dict, size: int, legacy_previews: bool):
        self.index = index
        self.api = ComfyAPIClient(url, client_id=f"load-{index}-{uuid.uuid4().hex[:8]}",
                                  preview_metadata=not legacy_previews)
        self.api.connect()
        self.legacy_previews = legacy_previews
        self.exemplar_defaults = exemplar_defaults
        self.size = size
        self.own: dict[str, dict] = {}  # prompt_id -> spec
        self.ended: dict[str, str] = {}  # prompt_id -> success / error / interrupted (after its end marker)
        self.outcome: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.running: Optional[str] = None  # the prompt of this client the server is running
        self.outer_steps: dict[str, list[int]] = defaultdict(list)
        self.previews: Counter = Counter()  # prompt_id -> previews received
        self.event_counts: Counter = Counter()
        self.violations: list[str] = []
        self.started_at: dict[str, float] = {}
        self.thread_error: Optional[BaseException] = None
        self.url = url.rstrip("/")
        self.error_types: dict[str, str] = {}
        self.finish_answers: dict[str, int] = {}  # own "finish" prompt -> HTTP status of its finish request
        self.foreign_answers: Counter = Counter()  # HTTP statuses of finishing other clients' runs
        self.timers: list[threading.Timer] = []

    def post(self, path: str, body: dict) -> int:
        import requests

        try:
            return requests.post(f"{self.url}{path}", json=body, timeout=10).status_code
        except Exception as error:  # counted as a violation by the caller's checks
            self.violation(f"POST {path} failed: {error!r}")
            return 0

    def poke_foreign_runs(self, stop: threading.Event) -> None:
        """Every ~0.2 s, try to finish any running prompt that is not this client's (found in ComfyUI's ``GET
        /queue``, which shows every prompt), naming this client and naming none: both must be refused."""
        import requests

        while not stop.wait(0.2):
            try:
                running = requests.get(f"{self.url}/queue", timeout=10).json()["queue_running"]
                if requests.get(f"{self.url}{RUNNING_ROUTE}", timeout=10).json()["running"]:
                    self.violation("the anonymous listing of running nested samplers shows clients' runs")
            except Exception:
                continue
            for prompt_id in {entry[1] for entry in running if len(entry) > 1} - set(self.own):
                for body in ({"client_id": self.api.client_id}, {}):
                    status = self.post(FINISH_ROUTE, {"prompt_id": prompt_id, "node_id": SAMPLER, **body})
                    self.foreign_answers[status] += 1
                    if status == 200:
                        self.violation(f"finished another client's run {prompt_id} with {body or 'no client_id'}")

    def violation(self, text: str) -> None:
        if len(self.violations) < 50:
            self.violations.append(f"client {self.index}: {text}")

    def run_phase(self, specs: list[dict], timeout: float, mixed: bool = False) -> None:
        stop = threading.Event()
        try:
            pending = set()
            for spec in specs:  # queue everything first, then read: every own prompt_id is known before its events
                prompt_id = self.api.queue_prompt(build_prompt(spec, self.index, self.exemplar_defaults, self.size))
                self.own[prompt_id] = spec
                pending.add(prompt_id)
            if mixed:
                threading.Thread(target=self.poke_foreign_runs, args=(stop,), daemon=True).start()
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for event in self.api.events(timeout=min(5.0, max(deadline - time.monotonic(), 0.1))):
                    self.handle(event)
                    pending -= set(self.ended)
                    if not pending or time.monotonic() > deadline:
                        break
            if pending:
                self.violation(f"{len(pending)} prompts did not finish within {timeout:.0f} s")
        except BaseException as error:  # reported by the main thread
            self.thread_error = error
        finally:
            stop.set()
            for timer in self.timers:
                timer.cancel()

    def handle(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data")
        self.event_counts[kind] += 1
        if kind == "preview_image":
            named = data.get("prompt_id")
            if self.running is None or self.running not in self.own:
                self.violation(f"preview (node {data.get('node')}, prompt {named}) while none of its prompts was running")
            elif named is not None and named != self.running:
                self.violation(f"preview naming prompt {named} while its prompt {self.running} was running")
            if not self.legacy_previews and named is None:
                self.violation("preview without metadata although the client asked for it")
            self.previews[named or self.running] += 1
            return
        if not isinstance(data, dict) or "prompt_id" not in data:
            return  # status broadcasts and the like name no prompt
        prompt_id = data["prompt_id"]
        if prompt_id not in self.own:
            self.violation(f"{kind} event of prompt {prompt_id}, which is not this client's")
            return
        spec = self.own[prompt_id]
        if kind == "execution_start":
            self.running = prompt_id
            self.started_at[prompt_id] = time.monotonic()
            if spec.get("kind") == "cancel":
                timer = threading.Timer(spec["cancel_after"], self.post, args=("/interrupt", {"prompt_id": prompt_id}))
                timer.daemon = True
                timer.start()
                self.timers.append(timer)
        elif kind == OUTER_STEP_EVENT:
            if data.get("node") != SAMPLER:
                self.violation(f"outer_step event from node {data.get('node')} of prompt {prompt_id}")
            self.outer_steps[prompt_id].append(data.get("outer_step"))
            if spec.get("kind") == "finish" and data.get("outer_step") == spec["finish_after_step"]:
                self.finish_answers[prompt_id] = self.post(FINISH_ROUTE, {
                    "prompt_id": prompt_id, "node_id": SAMPLER, "client_id": self.api.client_id})
        elif kind in END_EVENTS:
            self.outcome[prompt_id] = END_EVENTS[kind]
            if kind == "execution_error":
                self.error_types[prompt_id] = str(data.get("exception_type"))
                self.errors[prompt_id] = f"{data.get('node_type')}: {data.get('exception_message', '')[:300]}"
        elif kind == "executing" and data.get("node") is None:
            self.ended[prompt_id] = self.outcome.get(prompt_id, "success")
            if self.running == prompt_id:
                self.running = None

    def check_results(self, prompt_ids: list[str]) -> None:
        """After the run: history, outer-step events and previews of every prompt of this client."""
        allowed = {"nested": {"success"}, "vanilla": {"success"}, "bad": {"error"}, "cancel": {"interrupted", "success"},
                   "finish": {"success"}}
        for prompt_id in prompt_ids:
            spec = self.own[prompt_id]
            outcome = self.outcome.get(prompt_id)
            if outcome not in allowed[spec["kind"]]:
                self.violation(f"prompt {spec['index']} ({spec['kind']}, {spec['sampler']}) ended with "
                               f"{outcome}: {self.errors.get(prompt_id, '')}")
                continue
            if spec["kind"] == "bad":
                if not self.error_types.get(prompt_id, "").endswith("NestedDiffusionError") or "max_nfe" not in self.errors[prompt_id]:
                    self.violation(f"prompt {spec['index']} (bad input): not the clear error: {self.errors[prompt_id]}")
                continue
            if outcome == "interrupted":
                if ((self.api.history(prompt_id).get("outputs") or {}).get(SAVE) or {}).get("images"):
                    self.violation(f"prompt {spec['index']} was cancelled but saved an image")
                continue
            entry = self.api.history(prompt_id)
            status = (entry.get("status") or {}).get("status_str")
            images = ((entry.get("outputs") or {}).get(SAVE) or {}).get("images") or []
            if status != "success" or len(images) != 1:
                self.violation(f"prompt {spec['index']}: history status {status!r}, {len(images)} saved images")
            steps = self.outer_steps.get(prompt_id, [])
            expected = list(range(1, spec["outer"] + 1)) if spec["kind"] != "vanilla" else []
            if spec["kind"] == "finish":  # ends after the step it asked at, or later; the answer 404/409 if it had ended
                expected = list(range(1, max(len(steps), spec["finish_after_step"]) + 1))[:spec["outer"]]
                if self.finish_answers.get(prompt_id) not in (200, 404, 409):
                    self.violation(f"prompt {spec['index']}: finish answered {self.finish_answers.get(prompt_id)}")
            if steps != expected:
                self.violation(f"prompt {spec['index']} ({spec['kind']}): outer_step events {steps}, expected {expected}")
            if self.previews[prompt_id] < (len(steps) if spec["kind"] != "vanilla" else 1):
                self.violation(f"prompt {spec['index']} ({spec['kind']}): only {self.previews[prompt_id]} previews")

    def close(self) -> None:
        self.api.close()


def run_phase(clients: list[LoadClient], shares: list[list[dict]], timeout: float, mixed: bool = False) -> float:
    started = time.monotonic()
    threads = [threading.Thread(target=client.run_phase, args=(share, timeout, mixed), daemon=True)
               for client, share in zip(clients, shares)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 30)
    for client in clients:
        if client.thread_error is not None:
            client.violation(f"client thread failed: {client.thread_error!r}")
    return time.monotonic() - started


def interleaving(clients: list[LoadClient]) -> int:
    """How often consecutive executions belonged to different clients (0 would mean no concurrency at all)."""
    starts = sorted((t, client.index) for client in clients for t in client.started_at.values())
    return sum(1 for (_, a), (_, b) in zip(starts, starts[1:]) if a != b)


# -- the whole test -------------------------------------------------------------------------------------------
def run_load_test(url: str, *, prompts: int = 200, clients: int = 4, warmup: int = 20, pid: Optional[int] = None,
                  size: int = 32, memory_tolerance: float = 0.05, check_memory: bool = True,
                  seed_base: Optional[int] = None, timeout: float = 900.0, log=print, mixed: bool = False) -> dict:
    """Run the load test against the server at ``url``; returns the figures and checks (``result["pass"]``)."""
    if prompts < 1 or clients < 1 or not 0 <= warmup < prompts:
        raise ValueError("need prompts >= 1, clients >= 1 and 0 <= warmup < prompts")
    seed_base = int(time.time() * 1000) % 1_000_000_000 if seed_base is None else seed_base
    probe = ComfyAPIClient(url)
    probe.wait_until_up(timeout=60)
    exemplar_defaults = widget_defaults(probe.object_info("NestedExemplarModel")["NestedExemplarModel"])
    probe.close()
    specs = [prompt_spec(index, seed_base, mixed) for index in range(prompts)]
    phases = [specs[:warmup], specs[warmup:]] if warmup else [specs]
    pool = [LoadClient(index, url, exemplar_defaults, size, legacy_previews=index == 0 and clients > 1)
            for index in range(clients)]
    memory_measured = pid is not None
    rss_start = resident_memory(pid) if memory_measured else None
    rss_after_phase, durations = [], []
    try:
        with MemorySampler(pid) as sampler:
            for number, phase in enumerate(phases):
                # contiguous blocks: every client gets nested and vanilla prompts, and all solvers
                shares = [phase[index * len(phase) // clients:(index + 1) * len(phase) // clients]
                          for index in range(clients)]
                log(f"phase {number + 1}/{len(phases)}: {len(phase)} prompts over {clients} clients ...")
                durations.append(run_phase(pool, shares, timeout, mixed))
                if memory_measured:
                    time.sleep(0.5)
                    rss_after_phase.append(resident_memory(pid))
                    log(f"  done in {durations[-1]:.1f} s; server RSS {rss_after_phase[-1] / 2**20:.1f} MiB")
                else:
                    log(f"  done in {durations[-1]:.1f} s")
        for client in pool:
            client.check_results(list(client.own))
    finally:
        for client in pool:
            client.close()

    violations = [text for client in pool for text in client.violations]
    outcomes = Counter(client.outcome.get(prompt_id, "unfinished") for client in pool for prompt_id in client.own)
    rss_warm = rss_after_phase[0] if memory_measured and warmup else rss_start
    rss_end = rss_after_phase[-1] if memory_measured else None
    growth = (rss_end - rss_warm) / rss_warm if memory_measured else None
    memory_ok = None if not (check_memory and memory_measured) else abs(growth) <= memory_tolerance
    total_seconds = sum(durations)
    kinds = Counter(spec["kind"] for spec in specs)
    foreign = Counter()
    for client in pool:
        foreign.update(client.foreign_answers)
    result = {
        "url": url,
        "mixed": mixed,
        "kinds": dict(kinds),
        "finish_answers": dict(Counter(status for client in pool for status in client.finish_answers.values())),
        "foreign_finish_answers": {str(status): count for status, count in foreign.items()},
        "prompts": prompts,
        "clients": clients,
        "warmup_prompts": warmup,
        "nested_prompts": sum(1 for spec in specs if spec["kind"] == "nested"),
        "vanilla_prompts": sum(1 for spec in specs if spec["kind"] == "vanilla"),
        "image_size": size,
        "seed_base": seed_base,
        "outcomes": dict(outcomes),
        "seconds_warmup": round(durations[0], 2) if warmup else 0.0,
        "seconds_total": round(total_seconds, 2),
        "prompts_per_second": round(prompts / total_seconds, 2) if total_seconds else None,
        "interleaved_switches": interleaving(pool),
        "per_client": [{
            "client": client.index,
            "preview_frames": "type 1 (no metadata)" if client.legacy_previews else "type 4 (metadata)",
            "prompts": len(client.own),
            "previews": sum(client.previews.values()),
            "outer_step_events": sum(len(steps) for steps in client.outer_steps.values()),
            "events": sum(client.event_counts.values()),
        } for client in pool],
        "server_pid": pid,
        "rss_start_mib": round(rss_start / 2**20, 1) if memory_measured else None,
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1) if memory_measured else None,
        "rss_after_run_mib": round(rss_end / 2**20, 1) if memory_measured else None,
        "rss_peak_mib": round(max(sampler.peak, rss_end or 0) / 2**20, 1) if memory_measured else None,
        "rss_growth_percent": round(100 * growth, 2) if memory_measured else None,
        "memory_tolerance_percent": round(100 * memory_tolerance, 2),
        "checks": {
            "all_prompts_succeeded": (outcomes.get("success", 0) == prompts if not mixed else
                                      outcomes.get("unfinished", 0) == 0),
            "isolation_and_events": not violations,
            "memory": memory_ok,  # None: not checked
        },
        "violations": violations,
    }
    result["pass"] = all(value is not False for value in result["checks"].values())
    return result


def report(result: dict, log=print) -> None:
    log(f"prompts: {result['prompts']} ({result['nested_prompts']} nested, {result['vanilla_prompts']} vanilla) "
        f"from {result['clients']} clients, {result['image_size']}x{result['image_size']} px")
    log(f"outcomes: {result['outcomes']}")
    if result.get("mixed"):
        log(f"mixed workload: kinds {result['kinds']}; own finish answers {result['finish_answers']}; "
            f"finishing other clients' runs answered {result['foreign_finish_answers']}")
    log(f"time: {result['seconds_total']} s in all ({result['prompts_per_second']} prompts/s), "
        f"warm-up {result['seconds_warmup']} s; executions switched client {result['interleaved_switches']} times")
    for client in result["per_client"]:
        log(f"  client {client['client']} [{client['preview_frames']}]: {client['prompts']} prompts, "
            f"{client['previews']} previews, {client['outer_step_events']} outer_step events, {client['events']} events")
    if result["rss_after_run_mib"] is not None:
        log(f"server RSS: start {result['rss_start_mib']} MiB, after warm-up {result['rss_after_warmup_mib']} MiB, "
            f"after run {result['rss_after_run_mib']} MiB (peak {result['rss_peak_mib']} MiB): "
            f"{result['rss_growth_percent']:+.2f}% (tolerance {result['memory_tolerance_percent']}%)")
    else:
        log("server RSS: not measured (no server pid: pass --pid)")
    for name, ok in result["checks"].items():
        log(f"  {name}: {'skipped' if ok is None else 'PASS' if ok else 'FAIL'}")
    for text in result["violations"][:20]:
        log(f"  ! {text}")
    log("PASS" if result["pass"] else "FAIL")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running ComfyUI server with this pack (default: start one)")
    parser.add_argument("--pid", type=int, help="the server's pid, for the memory check (default: the process "
                                                "listening on --url's port, or the server this script starts)")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=20, help="prompts before the first memory reading")
    parser.add_argument("--size", type=int, default=32, help="image size (16 to 128, a multiple of 8)")
    parser.add_argument("--memory-tolerance", type=float, default=0.05, help="allowed RSS change after warm-up (0.05 = 5%%)")
    parser.add_argument("--no-memory-check", action="store_true")
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: from the clock)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per phase")
    parser.add_argument("--json", help="write the figures to this JSON file")
    parser.add_argument("--mixed", action="store_true", help="good prompts, bad inputs, Cancels and Finish-nows "
                                                             "(see the module docstring)")
    args = parser.parse_args(argv)

    server = None
    url, pid = args.url, args.pid
    started = time.monotonic()
    if url is None:
        from comfyui_nested_diffusion.tools.comfy_server import ComfyServer, ComfyServerError

        server = ComfyServer(startup_timeout=180)
        try:
            server.start()
        except ComfyServerError as error:
            print(f"FAIL: the server did not start: {error}", file=sys.stderr)
            return 2
        url, pid = server.url, server.process.pid
        print(f"started ComfyUI at {url} (pid {pid}) in {server.startup_seconds:.1f} s; log {server.log_path}")
    elif pid is None:
        pid = find_server_pid(url)
    try:
        result = run_load_test(url, prompts=args.prompts, clients=args.clients, warmup=args.warmup, pid=pid,
                               size=args.size, memory_tolerance=args.memory_tolerance,
                               check_memory=not args.no_memory_check, seed_base=args.seed, timeout=args.timeout,
                               mixed=args.mixed)
    finally:
        if server is not None:
            server.stop()
    result["server_started_by_script"] = server is not None
    result["seconds_with_server_start"] = round(time.monotonic() - started, 1)
    result["platform"] = {"python": platform.python_version(), "machine": platform.machine(),
                          "cpus": __import__("os").cpu_count()}
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
