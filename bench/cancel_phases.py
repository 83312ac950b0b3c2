"""Where the time goes between Cancel and the end of a large-batch run, phase by phase, against KSampler on the same
server in the same run.

Batch 64 at 128 px, the exact exemplar model, one client (its own client id). Each trial queues a prompt, posts
``POST /interrupt`` (with its prompt id) the moment a chosen websocket event arrives, and times it until
``execution_interrupted`` arrives. The phases of a NestedKSampler run and the event that triggers the Cancel:

* planning: dpmpp_3m_sde + kl_optimal, 1000 x 9, outer_step auto (the slowest plan the tests know): half the
  planning time after the sampler node's ``executing`` event (ComfyUI itself checks for a Cancel just before a
  node runs); the planning time is the median from the node's start to its first ``progress`` event, less one
  model call, in reference trials cancelled there;
* first inner diffusion: euler 300 x 10: the node's first ``progress`` event (after its first model call);
* later inner diffusion: the same, three model calls' time after the third outer step's event (ComfyUI 0.33.0's
  ProgressBar passes on no update under 0.5% of the total, so there is no event to react to inside it);
* filmstrip decoding: euler 300 x 1: an early ``nested_diffusion.outer_step`` event (the per-item previews of the
  filmstrip are decoded and encoded right after it; the early ones fit the run's allowance);
* between outer steps: the same, a later outer step's event, where the filmstrip budget skips the event (the outer
  step and the next model call follow).

KSampler: euler 300 steps, cancelled at its 1st, 3rd and 6th ``progress`` event (during the next step's model call;
three trials per repeat),
and dpmpp_3m_sde + kl_optimal with 9000 steps as long after its ``executing`` event (its setup and first step). The time of one
model call is the median interval between KSampler's ``progress`` events (a 12-step run per repeat, not cancelled,
and the steps before each Cancel). Written: every trial (delay, the events
that arrived between the Cancel and its end), and per phase the median and max delay, also in model calls.

    OMP_NUM_THREADS=1 scripts/python.sh -m comfyui_nested_diffusion.bench.cancel_phases [--repeats 3]
    OMP_NUM_THREADS=1 NESTED_ENGINE=0.33.0 scripts/python.sh -m comfyui_nested_diffusion.bench.cancel_phases
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

BATCH, SIZE = 64, 128
FIRST_SEED = 32_000_001
OUTER_STEP_EVENT, CANDIDATES_EVENT = "nested_diffusion.outer_step", "nested_diffusion.candidates"


def command_line() -> str:
    engine = os.environ.get("NESTED_ENGINE")
    prefix = f"NESTED_ENGINE={engine} " if engine else ""
    return (f"OMP_NUM_THREADS=1 {prefix}scripts/python.sh -m comfyui_nested_diffusion.bench.cancel_phases "
            + shlex.join(sys.argv[1:]))


def comfyui_version() -> str:
    from comfyui_nested_diffusion.tools.comfy_env import comfyui_path

    text = (Path(comfyui_path()) / "comfyui_version.py").read_text()
    return text.split('"')[1] if '"' in text else text.strip()


def graph(exemplar_defaults: dict, sampler_type: str, seed: int, inputs: dict) -> dict:
    from comfyui_nested_diffusion.tools.api_graphs import exemplar_graph

    return exemplar_graph(sampler_type, {"seed": seed, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                                         "denoise": 1.0, **inputs}, size=SIZE, batch=BATCH,
                          exemplar_defaults=exemplar_defaults, prefix="bench_cancel_phases")


Trigger = Callable[[dict, dict], bool]  # (event, what the trial has seen so far) -> cancel now


def on_executing(node: str, wait: float = 0.0) -> Trigger:
    """``wait`` seconds after ``node`` starts (ComfyUI itself checks for a Cancel just before a node runs)."""
    def trigger(event: dict, seen: dict) -> bool:
        if event["type"] == "executing" and event["data"].get("node") == node:
            time.sleep(wait)
            return True
        return False
    return trigger


def on_progress(count: int, node: str, after_outer_step: int = 0) -> Trigger:
    """The ``count``-th progress event of ``node`` (after outer step ``after_outer_step``'s event, if any)."""
    def trigger(event: dict, seen: dict) -> bool:
        if event["type"] != "progress" or event["data"].get("node") != node:
            return False
        if seen["outer_step"] < after_outer_step:
            return False
        seen["progress_after"] = seen.get("progress_after", 0) + 1
        return seen["progress_after"] == count
    return trigger


def on_outer_step(step: int, wait: float = 0.0) -> Trigger:
    """``wait`` seconds after outer step ``step``'s event."""
    def trigger(event: dict, seen: dict) -> bool:
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == step:
            time.sleep(wait)
            return True
        return False
    return trigger


def trial(client, prompt: dict, trigger: Trigger, node: str) -> dict:
    """Queue ``prompt``, Cancel when ``trigger`` holds; the delay to ``execution_interrupted`` and what came between."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ExecutionInterrupted

    prompt_id = client.queue_prompt(prompt)
    seen = {"outer_step": 0}
    sent: Optional[float] = None
    node_started: Optional[float] = None
    progress_times: list[float] = []
    after: list[str] = []
    interrupted_at = None
    try:
        for event in client.stream(prompt_id, timeout=600):
            now = time.monotonic()
            if event["type"] == "executing" and event["data"].get("node") == node:
                node_started = now
            if event["type"] == OUTER_STEP_EVENT:
                seen["outer_step"] = event["data"]["outer_step"]
            if event["type"] == "progress" and event["data"].get("node") == node:
                progress_times.append(now)
            if sent is not None:
                after.append(event["type"])
                if event["type"] == "execution_interrupted":
                    interrupted_at = now
            elif trigger(event, seen):
                sent = time.monotonic()
                client.interrupt(prompt_id)
                seen["cancelled_after"] = event["type"]
    except ExecutionInterrupted:
        pass
    if interrupted_at is None:
        interrupted_at = time.monotonic()
    intervals = [b - a for a, b in zip(progress_times, progress_times[1:]) if sent is None or b <= sent]
    return {"delay": None if sent is None else round(interrupted_at - sent, 4), "outer_step": seen["outer_step"],
            "cancelled_after_node_start": None if None in (sent, node_started) else round(sent - node_started, 4),
            "events_after_cancel": [kind for kind in after if kind != "preview_image"],
            "previews_after_cancel": after.count("preview_image"),
            "filmstrip_at_the_step": CANDIDATES_EVENT in after[:2],
            "progress_intervals": [round(i, 4) for i in intervals]}


def phases(defaults: dict, repeats: int, seeds) -> list[tuple[str, str, Callable[[], dict], Callable[[dict], Trigger]]]:
    """(sampler, phase, a fresh prompt, the trigger given what the trials before measured) for every trial."""
    from comfyui_nested_diffusion.tools.api_graphs import SAMPLER

    def nested(inner: int, outer: int = 300, **inputs) -> Callable[[], dict]:
        return lambda: graph(defaults, "NestedKSampler", next(seeds), {
            "outer_steps": outer, "inner_steps": inner, "outer_step": "renoise", **inputs})

    def ksampler(**inputs) -> Callable[[], dict]:
        return lambda: graph(defaults, "KSampler", next(seeds), {"steps": 300, **inputs})

    def fixed(trigger: Trigger) -> Callable[[dict], Trigger]:
        return lambda measured: trigger

    def into_planning(measured: dict) -> Trigger:  # half way through the plan, as timed by the reference trial
        return on_executing(SAMPLER, wait=measured["planning_seconds"] / 2)

    slow_plan = {"sampler_name": "dpmpp_3m_sde", "scheduler": "kl_optimal"}
    planned = nested(9, outer=1000, **slow_plan, outer_step="auto")
    never: Trigger = lambda event, seen: False  # noqa: E731
    rows = []
    for repeat in range(repeats):
        rows += [
            ("KSampler", "reference (12 steps, not cancelled)", ksampler(steps=12), fixed(never)),
            *[("KSampler", "between steps", ksampler(), fixed(on_progress(k, SAMPLER))) for k in (1, 3, 6)],
            ("NestedKSampler", "reference: planning + first model call (1000 x 9, dpmpp_3m_sde + kl_optimal, auto)",
             planned, fixed(on_progress(1, SAMPLER))),
            ("KSampler", "setup (9000 steps, dpmpp_3m_sde + kl_optimal)", ksampler(steps=9000, **slow_plan),
             into_planning),
            ("NestedKSampler", "planning (1000 x 9, dpmpp_3m_sde + kl_optimal, auto)", planned, into_planning),
            ("NestedKSampler", "first inner diffusion (300 x 10)", nested(10), fixed(on_progress(1, SAMPLER))),
            ("NestedKSampler", "later inner diffusion (300 x 10)", nested(10),
             lambda measured: on_outer_step(3, wait=3 * measured["model_call"])),
            ("NestedKSampler", "filmstrip decoding (300 x 1)", nested(1), fixed(on_outer_step((1, 2, 3)[repeat % 3]))),
            ("NestedKSampler", "between outer steps (300 x 1)", nested(1),
             fixed(on_outer_step((25, 26, 27)[repeat % 3]))),
        ]
    return rows


def measure(measured: dict, trials: list[dict]) -> None:
    """The model call's time (KSampler's step) and the planning's (node start to first model call, less one call)
    from the trials so far."""
    intervals = [i for row in trials if row["sampler"] == "KSampler" for i in row["progress_intervals"]]
    if intervals:
        measured["model_call"] = statistics.median(intervals)
    starts = [row["cancelled_after_node_start"] for row in trials if row["phase"].startswith("reference: planning")]
    if starts and "model_call" in measured:
        measured["planning_seconds"] = max(0.0, statistics.median(starts) - measured["model_call"])


def summarise(trials: list[dict], model_call: float) -> dict:
    by_phase: dict = {}
    for row in trials:
        if row["delay"] is None:  # the reference runs
            continue
        by_phase.setdefault((row["sampler"], row["phase"]), []).append(row["delay"])
    return {f"{sampler}: {phase}": {
        "delays": delays, "median": round(statistics.median(delays), 3), "max": round(max(delays), 3),
        "max_in_model_calls": round(max(delays) / model_call, 2)}
        for (sampler, phase), delays in by_phase.items() if delays and all(d is not None for d in delays)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="default: bench/results/cancel_phases_<ComfyUI version>.json")
    args = parser.parse_args()

    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, widget_defaults
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer

    version = comfyui_version()
    seeds = iter(range(FIRST_SEED, FIRST_SEED + 10_000))
    trials = []
    with ComfyServer(env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}) as server:
        with ComfyAPIClient(server.url) as client:
            defaults = widget_defaults(client.object_info("NestedExemplarModel")["NestedExemplarModel"])
            from comfyui_nested_diffusion.tools.api_graphs import SAMPLER

            measured: dict = {}
            for sampler, phase, prompt, trigger in phases(defaults, args.repeats, seeds):
                row = {"sampler": sampler, "phase": phase, **trial(client, prompt(), trigger(measured), SAMPLER)}
                trials.append(row)
                measure(measured, trials)
                print(f"{sampler}: {phase}: {row['delay']} s (outer step {row['outer_step']}, after the Cancel: "
                      f"{row['events_after_cancel']})", flush=True)
    intervals = [i for row in trials if row["sampler"] == "KSampler" for i in row["progress_intervals"]]
    model_call = statistics.median(intervals)
    nested_intervals = [i for row in trials if "x 10" in row["phase"] for i in row["progress_intervals"]]
    nested_call = statistics.median(nested_intervals) if nested_intervals else None
    summary = summarise(trials, model_call)
    print(f"ComfyUI {version}: one KSampler step (a batch-64 model call) {model_call:.3f} s (median of "
          f"{len(intervals)}); between a nested run's progress events at 300 x 10: "
          f"{nested_call if nested_call is None else round(nested_call, 3)} s")
    for name, row in summary.items():
        print(f"  {name}: median {row['median']} s, max {row['max']} s ({row['max_in_model_calls']} model calls)")
    out = Path(args.out or f"bench/results/cancel_phases_{version}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": command_line(), "comfyui": version, "batch": BATCH, "size": SIZE,
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                               "load_average": os.getloadavg(), "model_call_seconds": round(model_call, 4),
                               "nested_progress_interval_seconds": nested_call,
                               "summary": summary, "trials": trials}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
