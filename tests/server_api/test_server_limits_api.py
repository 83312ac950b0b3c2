"""A shared ComfyUI server stays up: bounded planning, memory and previews, Finish now per client, honest
caching. Each test holds one rule through the HTTP and websocket API of the session's real
ComfyUI server (the comfy_server fixture), with the exemplar model. docs/reliability.md has the figures."""
from __future__ import annotations

import itertools
import time

import psutil
import pytest
import requests
from api_helpers import OUTER_STEP_EVENT, PREVIEW, SAMPLER, SAVE, nested_prompt, of_type
from comfyui_nested_diffusion.protocol import FINISH_ROUTE, RUNNING_ROUTE
from comfyui_nested_diffusion.tools.comfy_api_client import ExecutionError, ExecutionInterrupted
from test_reliability_api import ALLOWED_MAX, assert_server_recovers, attempt, check_clear_answer, ran, with_inputs

MiB = 2**20
_SEEDS = itertools.count(13_000_001)  # seeds no other test file uses


def fresh_seed() -> int:
    return next(_SEEDS)


def server_rss(comfy_server) -> int:
    process = psutil.Process(comfy_server.process.pid)
    return process.memory_info().rss + sum(child.memory_info().rss for child in process.children(recursive=True))


def lean_prompt(ex, *, outer: int, inner: int, scheduler: str = "normal", denoise: float = 1.0, batch: int = 1,
                preview: bool = False, seed: int | None = None, **inputs) -> dict:
    """nested_prompt with one image (batch 1), OuterStepPreview only when asked, and the given sampler inputs."""
    prompt = nested_prompt(fresh_seed() if seed is None else seed, outer_steps=outer, inner_steps=inner,
                           prefix="limits", exemplar_defaults=ex)
    prompt["2"]["inputs"]["batch_size"] = batch
    with_inputs(prompt, scheduler=scheduler, denoise=denoise, **inputs)
    if not preview:
        del prompt[PREVIEW]
    return prompt


# -- the schedule cache and 100-million-sigma schedules ----------------------------------------------------------
def test_huge_schedules_fail_cleanly_and_leave_no_memory_behind(comfy_server, client, exemplar_defaults):
    """100 outer x 10000 inner at denoise 0.01 asked for a schedule of 10^8 sigmas (400 MB) and kept it: RSS went
    1779 -> 2160 -> 2542 -> 2923 MiB over three such prompts. Now: at most KSampler's 10^6, a cache bounded by bytes,
    and RSS after ten such prompts within 50 MiB of before."""
    def huge(inner):
        return lean_prompt(exemplar_defaults, outer=100, inner=inner, scheduler="karras", denoise=0.01)

    warmup = attempt(client, huge(10000))
    check_clear_answer(warmup, "inner_steps", [r"karras", ALLOWED_MAX])
    before = server_rss(comfy_server)
    seconds = []
    for inner in range(9999, 9989, -1):
        started = time.monotonic()
        outcome = attempt(client, huge(inner))
        seconds.append(time.monotonic() - started)
        check_clear_answer(outcome, "inner_steps", [r"karras", ALLOWED_MAX])
    grown = (server_rss(comfy_server) - before) / MiB
    print(f"\nRSS {before / MiB:.0f} MiB -> +{grown:.1f} MiB after 10 prompts; slowest {max(seconds):.2f} s")
    assert grown < 50, f"server RSS grew by {grown:.0f} MiB over 10 prompts"
    assert max(seconds) < 10, seconds
    assert_server_recovers(comfy_server, client, exemplar_defaults)


# -- clear errors, not raw exceptions -----------------------------------------------------------------------------
RAW_BEFORE = [
    # IndexError: index -1001 is out of bounds (ddim_uniform gives 1000 sigmas when asked for 2000)
    ("outer_steps=1000 inner_steps=1 ddim_uniform denoise=0.5",
     lambda ex: lean_prompt(ex, outer=1000, inner=1, scheduler="ddim_uniform", denoise=0.5),
     "denoise", [r"ddim_uniform", r"outer_steps", r"higher denoise"]),
    # ValueError: Exceeds the limit (4300 digits) for integer string conversion
    ("step_schedule entry of 5000 digits",
     lambda ex: nested_prompt(fresh_seed(), step_schedule="9" * 5000 + ",5,5,5", exemplar_defaults=ex),
     "step_schedule", [r"from 1 to 10000"]),
    ("step_schedule of 100000 characters",
     lambda ex: nested_prompt(fresh_seed(), step_schedule="5," * 50000 + "x", exemplar_defaults=ex),
     "step_schedule", [r"positive integers", r"characters\)"]),
]


@pytest.mark.parametrize("build, input_name, allowed", [pytest.param(*case[1:], id=case[0]) for case in RAW_BEFORE])
def test_what_raised_raw_exceptions_gets_a_clear_answer(comfy_server, client, exemplar_defaults, build, input_name,
                                                        allowed):
    outcome = attempt(client, build(exemplar_defaults))
    check_clear_answer(outcome, input_name, allowed)
    assert len(outcome.message) < 600, f"a {len(outcome.message)}-character message"
    assert_server_recovers(comfy_server, client, exemplar_defaults)


# -- planning time -----------------------------------------------------------------------------------------------
def planning_seconds(comfy_server, client, prompt: dict) -> tuple[float, str]:
    """Seconds from the sampler node's start to its first model call (its first progress event; then the prompt is
    cancelled) or to its error; and which of the two ended the wait ("runs" or the error message)."""
    prompt_id = client.queue_prompt(prompt)
    started = ended = None
    outcome = "runs"
    try:
        for event in client.stream(prompt_id, timeout=300):
            data = event.get("data") or {}
            if event["type"] == "executing" and data.get("node") == SAMPLER and started is None:
                started = time.monotonic()
            elif event["type"] == "progress" and data.get("node") == SAMPLER and ended is None:
                ended = time.monotonic()
                requests.post(f"{comfy_server.url}/interrupt", json={"prompt_id": prompt_id}, timeout=10)
    except ExecutionError as error:
        ended, outcome = time.monotonic(), error.exception_message
    except ExecutionInterrupted:
        pass
    assert started is not None and ended is not None, "the sampler never started or never ended its planning"
    return ended - started, outcome


# (outer, inner, scheduler, denoise, what the user gets): inputs that take minutes to plan without the bounds in
# docs/reliability.md ("Planning is bounded").
SLOW_PLANS = [(20, 2000, "normal", 1.0, "at most 1501 inner steps"), (100, 1000, "normal", 1.0, "at most 901 inner steps"),
              (4, 250, "normal", 0.01, "at most 101 inner steps"), (50, 200, "normal", 1.0, "runs")]


def test_slow_plans_take_about_a_second(comfy_server, client, exemplar_defaults):
    measured = {}
    for outer, inner, scheduler, denoise, expected in SLOW_PLANS:
        prompt = lean_prompt(exemplar_defaults, outer=outer, inner=inner, scheduler=scheduler, denoise=denoise)
        seconds, outcome = planning_seconds(comfy_server, client, prompt)
        measured[(outer, inner, scheduler, denoise)] = round(seconds, 2)
        assert expected in outcome, outcome
    print(f"\nplanning seconds: {measured}")
    assert max(measured.values()) < 3.0, measured  # "about a second", with room for a loaded machine
    assert_server_recovers(comfy_server, client, exemplar_defaults)


# -- an early-finished result is not cached as the full run --------------------------------------------------------
def post_finish(comfy_server, body: dict):
    return requests.post(f"{comfy_server.url}{FINISH_ROUTE}", json=body, timeout=10)


def outer_steps_run(outcome_or_events) -> list[int]:
    events = getattr(outcome_or_events, "events", outcome_or_events)
    return [e["data"]["outer_step"] for e in of_type(events, OUTER_STEP_EVENT, SAMPLER)]


def test_an_early_finished_result_is_not_served_from_the_cache(comfy_server, client, exemplar_defaults):
    """Finish a 60-outer-step prompt after step 1, queue the identical prompt: it was served from the cache in 0.0 s,
    labelled "outer 1/60". Now it samples again (and a third identical prompt after the full run is cached)."""
    prompt = lean_prompt(exemplar_defaults, outer=60, inner=4, preview=True)
    prompt_id = client.queue_prompt(prompt)
    events = []
    for event in client.stream(prompt_id, timeout=120):
        events.append(event)
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1:
            assert post_finish(comfy_server, {"prompt_id": prompt_id, "node_id": SAMPLER,
                                              "client_id": client.client_id}).status_code == 200
    assert 1 <= len(outer_steps_run(events)) < 60
    again = attempt(client, prompt)
    assert again.kind == "ok" and ran(again, SAMPLER), "the early-finished result was served from the cache"
    assert outer_steps_run(again) == list(range(1, 61))
    assert client.history(again.prompt_id)["outputs"][PREVIEW]["nested_labels"][-1].startswith("outer 60/60")
    third = attempt(client, prompt)
    assert third.kind == "ok" and not ran(third, SAMPLER), "a full run must still be served from the cache"


@pytest.mark.parametrize("budget, samples_again", [({"max_seconds": 0.01}, True), ({"max_nfe": 8}, False)])
def test_a_budget_stop_is_cached_only_when_the_inputs_decide_it(comfy_server, client, exemplar_defaults, budget,
                                                                 samples_again):
    """max_seconds depends on the machine's speed: the next identical prompt samples again. max_nfe stops at the same
    outer step every time (a function of the inputs), so its result is as cacheable as a full run's."""
    prompt = lean_prompt(exemplar_defaults, outer=30, inner=4, **budget)
    first = attempt(client, prompt)
    assert first.kind == "ok" and ran(first, SAMPLER) and len(outer_steps_run(first)) < 30, first.describe()
    again = attempt(client, prompt)
    assert again.kind == "ok" and ran(again, SAMPLER) is samples_again


def test_an_early_finish_through_nested_sampler_makes_samplercustom_sample_again(comfy_server, client,
                                                                                  exemplar_defaults):
    prompt = lean_prompt(exemplar_defaults, outer=4, inner=4)
    prompt["40"] = {"class_type": "NestedSampler", "inputs": {"max_seconds": 0.01}}
    prompt["41"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 41,
                                                               "denoise": 1.0}}
    prompt[SAMPLER] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": fresh_seed(), "cfg": 1.0, "positive": ["1", 1],
        "negative": ["1", 1], "sampler": ["40", 0], "sigmas": ["41", 0], "latent_image": ["2", 0]}}
    first = attempt(client, prompt)
    assert first.kind == "ok" and ran(first, SAMPLER) and len(outer_steps_run(first)) < 40, first.describe()
    again = attempt(client, prompt)
    assert again.kind == "ok" and ran(again, SAMPLER), "SamplerCustom served the time-budget result from the cache"


# -- connecting outer_previews after a run ------------------------------------------------------------------------
def test_connecting_outer_previews_after_a_cached_run_works(comfy_server, client, exemplar_defaults):
    """Queue the graph without OuterStepPreview, then with it: the second prompt must show every outer step's images.
    A run keeps them only where a node takes outer_previews; the server's prompt handler marks that in the sampler's
    inputs, which are ComfyUI's cache key, so the sampler samples again instead of serving the cached run without
    them. The same prompt again is cached."""
    from comfyui_nested_diffusion.protocol import OUTER_PREVIEWS_MARK

    seed = fresh_seed()
    without = attempt(client, lean_prompt(exemplar_defaults, outer=4, inner=3, batch=2, seed=seed))
    assert without.kind == "ok" and ran(without, SAMPLER), without.describe()
    assert client.history(without.prompt_id)["prompt"][2][SAMPLER]["inputs"][OUTER_PREVIEWS_MARK] is False
    for attempt_number in range(2):
        connected = attempt(client, lean_prompt(exemplar_defaults, outer=4, inner=3, batch=2, seed=seed, preview=True))
        assert connected.kind == "ok", connected.describe()
        assert ran(connected, SAMPLER) is (attempt_number == 0)  # a new cache key, then cached as usual
        entry = client.history(connected.prompt_id)
        assert entry["prompt"][2][SAMPLER]["inputs"][OUTER_PREVIEWS_MARK] is True
        labels = entry["outputs"][PREVIEW]["nested_labels"]
        assert len(labels) == 8 and labels[0].startswith("outer 1/4") and labels[-1].startswith("outer 4/4")


def test_connecting_a_pick_after_a_cached_stage_works(comfy_server, client, exemplar_defaults):
    """The same with NestedPickCandidate taking outer_previews: the stage samples again, and the pick has its images."""
    from test_reliability_api import pick_prompt

    stage = pick_prompt(exemplar_defaults, 1)
    pick = stage.pop("9")
    stage["5"]["inputs"]["samples"] = [SAMPLER, 0]
    stage[SAVE] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "limits_stage"}}
    first = attempt(client, stage)
    assert first.kind == "ok" and ran(first, SAMPLER), first.describe()
    stage["9"] = pick
    picked = attempt(client, stage)
    assert picked.kind == "ok" and ran(picked, SAMPLER), picked.describe()
    assert len(client.history(picked.prompt_id)["outputs"]["9"]["images"]) == 2


# -- OuterStepPreview memory and disk -------------------------------------------------------------------------------
class PeakRSS:
    """The server's peak resident memory while a block runs (sampled every 50 ms)."""

    def __init__(self, comfy_server):
        import threading

        self.server, self.peak, self.start = comfy_server, 0, server_rss(comfy_server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, server_rss(self.server))
            self._stop.wait(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    @property
    def grown_mib(self) -> float:
        return (self.peak - self.start) / MiB


def test_outer_step_preview_of_a_long_big_batch_run_is_bounded(comfy_server, client, exemplar_defaults):
    """Outer 100, inner 1, batch 16, 32 px: 33 s, peak RSS +3.1 GB, 1600 PNGs in temp/ and a 200 KB `executed`
    message before. Now at most 64 images are kept and shown: evenly spread outer steps and always the latest."""
    import json
    from pathlib import Path

    temp = Path(comfy_server.base_dir) / "temp"
    before = {path for path in temp.rglob("*") if path.is_file()}
    prompt = lean_prompt(exemplar_defaults, outer=100, inner=1, batch=16, preview=True)
    started = time.monotonic()
    with PeakRSS(comfy_server) as memory:
        outcome = attempt(client, prompt)
    seconds = time.monotonic() - started
    assert outcome.kind == "ok", outcome.describe()
    shown = client.history(outcome.prompt_id)["outputs"][PREVIEW]
    written = {path for path in temp.rglob("*") if path.is_file()} - before
    print(f"\n{seconds:.1f} s, peak RSS +{memory.grown_mib:.0f} MiB, {len(written)} files, "
          f"{len(json.dumps(shown))} bytes of output message")
    metadata = shown["nested_previews"]
    assert len(shown["images"]) == len(metadata) == len(shown["nested_labels"]) <= 64 and len(written) <= 64
    steps = sorted({item["outer_step"] for item in metadata})
    assert steps[0] == 1 and steps[-1] == 100 and len(steps) >= 3, steps
    assert all([item["batch_index"] for item in metadata if item["outer_step"] == step] == list(range(16)) for step in steps)
    assert len(json.dumps(shown)) < 20_000
    assert memory.grown_mib < 1024, f"peak RSS grew by {memory.grown_mib:.0f} MiB"


# -- Finish now per client ----------------------------------------------------------------------------------------
def test_finish_now_finishes_only_the_clients_own_runs(comfy_server, client, exemplar_defaults):
    """An idle editor's button (another client, same node id) ended someone else's 300-step run after 12 steps. Now the
    listing and the route take the client's id: another client sees nothing to finish and is refused (403)."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient

    url = comfy_server.url
    prompt_id = client.queue_prompt(lean_prompt(exemplar_defaults, outer=300, inner=3))
    answers, steps = {}, []
    with ComfyAPIClient(url) as other:
        for event in client.stream(prompt_id, timeout=300):
            if event["type"] != OUTER_STEP_EVENT:
                continue
            steps.append(event["data"]["outer_step"])
            if steps[-1] == 1:
                answers["other's listing"] = requests.get(f"{url}{RUNNING_ROUTE}",
                                                          params={"client_id": other.client_id}, timeout=10).json()
                answers["own listing"] = requests.get(f"{url}{RUNNING_ROUTE}",
                                                      params={"client_id": client.client_id}, timeout=10).json()
                answers["other's finish"] = post_finish(comfy_server, {"prompt_id": prompt_id, "node_id": SAMPLER,
                                                                       "client_id": other.client_id})
            elif steps[-1] == 6:
                answers["own finish"] = post_finish(comfy_server, {"prompt_id": prompt_id, "node_id": SAMPLER,
                                                                   "client_id": client.client_id})
    assert answers["other's listing"] == {"running": []}
    assert [(run["prompt_id"], run["node_id"]) for run in answers["own listing"]["running"]] == [(prompt_id, SAMPLER)]
    refused = answers["other's finish"]
    assert refused.status_code == 403 and "another client" in refused.json()["error"]
    assert answers["own finish"].status_code == 200
    assert 6 <= len(steps) < 300 and steps == list(range(1, len(steps) + 1))  # ended by its own client, after step 6
    assert client.history(prompt_id)["status"]["status_str"] == "success"


def test_the_extension_sends_the_tabs_client_id():
    """The web button lists and finishes with its tab's client id, on the current frontend and the legacy one."""
    from pathlib import Path

    source = (Path(__file__).resolve().parents[2] / "web" / "nested_diffusion.js").read_text(encoding="utf-8")
    assert "api.clientId ?? api.initialClientId" in source
    assert "${RUNNING_ROUTE}?client_id=" in source
    assert source.count("client_id: clientId") == 2  # finish and pick


def test_the_extension_spells_the_names_protocol_py_defines():
    """web/nested_diffusion.js cannot import protocol.py: its copies of the event and route names must match."""
    from pathlib import Path

    from comfyui_nested_diffusion import protocol

    source = (Path(__file__).resolve().parents[2] / "web" / "nested_diffusion.js").read_text(encoding="utf-8")
    for name in ("OUTER_STEP_EVENT", "CANDIDATES_EVENT", "PICKED_EVENT", "FINISH_ROUTE", "PICK_ROUTE", "RUNNING_ROUTE"):
        assert f'const {name} = "{getattr(protocol, name)}";' in source, name


# -- the load test's mixed workload --------------------------------------------------------------------------------
def test_mixed_workload_from_four_clients(comfy_server):
    """A reduced `scripts/load_test.py --mixed` (NESTED_MIXED_PROMPTS for more): good prompts, bad inputs, Cancels and
    Finish-nows at random moments from 4 clients, each also trying to finish the others' runs. Memory is asserted by
    the script's full run on a server of its own (this shared server's memory moves with the other tests)."""
    import os

    from comfyui_nested_diffusion.scripts import load_test

    prompts = int(os.environ.get("NESTED_MIXED_PROMPTS", "32"))
    lines: list[str] = []
    result = load_test.run_load_test(comfy_server.url, prompts=prompts, clients=4, warmup=8, mixed=True,
                                     pid=comfy_server.process.pid, check_memory=False, timeout=300, log=lines.append)
    load_test.report(result, log=lines.append)
    summary = "\n".join(lines)
    assert result["pass"] and result["violations"] == [], summary
    assert result["outcomes"].get("unfinished", 0) == 0, summary
    assert result["outcomes"].get("error", 0) == result["kinds"]["bad"], summary  # only bad inputs fail
    assert result["outcomes"].get("interrupted", 0) <= result["kinds"]["cancel"], summary
    assert "200" not in result["foreign_finish_answers"], summary
