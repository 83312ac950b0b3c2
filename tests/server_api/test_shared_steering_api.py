"""Steering on a shared server, tried as a careless or hostile client would: a pick must not poison ComfyUI's cache,
steering needs the run's own client id, and a run's planning and websocket traffic stay bounded.

Every test drives the session's real ComfyUI server (the comfy_server fixture) over HTTP and the websocket with the
pack's exact exemplar model, with clients of their own (their own client ids).
"""
from __future__ import annotations

import itertools
import time

import requests
from api_helpers import SAMPLER, SAVE, nested_prompt, of_type
from comfyui_nested_diffusion.protocol import CANDIDATES_EVENT, FINISH_ROUTE, PICK_ROUTE, PICKED_EVENT, RUNNING_ROUTE
from comfyui_nested_diffusion.tools.api_graphs import custom_sampler_graph
from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient
from test_reliability_api import attempt, ran

_SEEDS = itertools.count(25_000_001)  # seeds no other test file uses


def fresh_seed() -> int:
    return next(_SEEDS)


def batch_prompt(ex: dict, *, batch: int = 4, outer: int = 12, inner: int = 4, seed: int | None = None) -> dict:
    """NestedKSampler at ``batch``, its images saved; no OuterStepPreview."""
    prompt = nested_prompt(fresh_seed() if seed is None else seed, outer_steps=outer, inner_steps=inner,
                           prefix="steering", exemplar_defaults=ex)
    prompt["2"]["inputs"]["batch_size"] = batch
    del prompt["7"]
    return prompt


def saved_images(client, prompt_id: str) -> list:
    return client.history(prompt_id)["outputs"][SAVE]["images"]


def run_with_a_pick(client, prompt: dict, index: int, node: str = SAMPLER) -> tuple[str, list]:
    """Queue ``prompt`` and pick batch item ``index`` as soon as the first candidates arrive."""
    prompt_id = client.queue_prompt(prompt)
    events = []
    for event in client.stream(prompt_id, timeout=180):
        events.append(event)
        if event["type"] == CANDIDATES_EVENT and event["data"]["outer_step"] == 1:
            assert client.pick(prompt_id, node, index)["picking"] is True
    assert len(of_type(events, PICKED_EVENT)) == 1, "the pick was not applied"
    return prompt_id, events


# -- a pick must not poison the cache ------------------------------------------------------------------------------
def test_the_identical_prompt_after_a_picked_run_samples_again(comfy_server, exemplar_defaults):
    """Client A picks batch item 2 of a batch of 4 and gets one image. Client C then queues the identical prompt: it
    was served A's single picked image from ComfyUI's cache without sampling. Now it samples and gets all four; the
    same prompt once more (a full run before it) is cached as usual."""
    prompt = batch_prompt(exemplar_defaults)
    with ComfyAPIClient(comfy_server.url) as a, ComfyAPIClient(comfy_server.url) as c:
        picked_id, _ = run_with_a_pick(a, prompt, 2)
        assert len(saved_images(a, picked_id)) == 1
        again = attempt(c, prompt)
        assert again.kind == "ok", again.describe()
        assert ran(again, SAMPLER), "the picked run's image was served from the cache to another client"
        assert len(saved_images(c, again.prompt_id)) == 4
        third = attempt(c, prompt)
        assert third.kind == "ok" and not ran(third, SAMPLER), "a full run must still be served from the cache"
        assert len(saved_images(c, third.prompt_id)) == 4


def test_a_picked_run_through_nested_sampler_makes_samplercustomadvanced_sample_again(comfy_server, exemplar_defaults):
    prompt = custom_sampler_graph({}, steps=13, scheduler="normal", denoise=1.0, cfg=1.0, noise_seed=fresh_seed(),
                                  batch=4, size=32, exemplar_defaults=exemplar_defaults, prefix="steering_custom")
    with ComfyAPIClient(comfy_server.url) as a, ComfyAPIClient(comfy_server.url) as c:
        picked_id, _ = run_with_a_pick(a, prompt, 1)
        assert len(saved_images(a, picked_id)) == 1
        again = attempt(c, prompt)
        assert again.kind == "ok", again.describe()
        assert ran(again, SAMPLER), "SamplerCustomAdvanced served the picked run's image from the cache"
        assert len(saved_images(c, again.prompt_id)) == 4


# -- no steering without the run's client id --------------------------------------------------------------------
def test_steering_without_the_runs_client_id_is_refused_and_changes_nothing(comfy_server, client, exemplar_defaults):
    """A client that sends no client_id listed every run (its prompt and node) and then picked in or finished
    another client's run (200: the victim's batch of 4 became 1 image). Now the listing without a client id shows
    nothing of other clients', pick and finish without it are 403, and the run ends untouched."""
    url, outer = comfy_server.url, 30
    prompt_id = client.queue_prompt(batch_prompt(exemplar_defaults, outer=outer, inner=3))
    answers: dict = {}
    steps = []
    for event in client.stream(prompt_id, timeout=180):
        if event["type"] == CANDIDATES_EVENT and event["data"]["outer_step"] == 1:
            answers["anonymous listing"] = requests.get(f"{url}{RUNNING_ROUTE}", timeout=10).json()["running"]
            answers["empty client id listing"] = requests.get(f"{url}{RUNNING_ROUTE}?client_id=", timeout=10).json()
            answers["own listing"] = client.running()
            body = {"prompt_id": prompt_id, "node": SAMPLER, "node_id": SAMPLER, "index": 1}
            answers["pick"] = requests.post(f"{url}{PICK_ROUTE}", json=body, timeout=10)
            answers["finish"] = requests.post(f"{url}{FINISH_ROUTE}", json=body, timeout=10)
            answers["null client id"] = requests.post(f"{url}{PICK_ROUTE}", json={**body, "client_id": None}, timeout=10)
        elif event["type"] == "nested_diffusion.outer_step":
            steps.append(event["data"]["outer_step"])
    assert all(run["prompt_id"] != prompt_id for run in answers["anonymous listing"]), answers["anonymous listing"]
    assert answers["empty client id listing"] == {"running": []}
    assert [(run["prompt_id"], run["node_id"]) for run in answers["own listing"]] == [(prompt_id, SAMPLER)]
    for name in ("pick", "finish", "null client id"):
        assert answers[name].status_code == 403, (name, answers[name].status_code, answers[name].text)
        assert "client_id" in answers[name].json()["error"]
    assert steps == list(range(1, outer + 1)), "the run was steered by a request without its client id"
    assert len(saved_images(client, prompt_id)) == 4
    assert client.running() == []


def test_a_prompt_queued_without_a_client_id_is_steered_without_one(comfy_server, exemplar_defaults):
    """A script that queues without a client_id (ComfyUI allows it) can still list and finish its run."""
    url, outer = comfy_server.url, 200
    prompt = batch_prompt(exemplar_defaults, batch=1, outer=outer, inner=3)
    prompt_id = requests.post(f"{url}/prompt", json={"prompt": prompt}, timeout=30).json()["prompt_id"]
    with ComfyAPIClient(url) as watcher:
        listing, answer, other = None, None, None
        for _ in range(600):
            listing = requests.get(f"{url}{RUNNING_ROUTE}", timeout=10).json()["running"]
            if listing:
                other = requests.post(f"{url}{FINISH_ROUTE}", json={"prompt_id": prompt_id, "node_id": SAMPLER,
                                                                     "client_id": watcher.client_id}, timeout=10)
                answer = requests.post(f"{url}{FINISH_ROUTE}", json={"prompt_id": prompt_id, "node_id": SAMPLER},
                                       timeout=10)
                break
            time.sleep(0.05)
        assert [(run["prompt_id"], run["node_id"]) for run in listing] == [(prompt_id, SAMPLER)]
        assert other.status_code == 403
        assert answer.status_code == 200 and answer.json()["finishing"] is True
        for _ in range(600):
            entry = watcher.history(prompt_id)
            if entry.get("status", {}).get("completed"):
                break
            time.sleep(0.1)
        assert entry["status"]["status_str"] == "success"
        assert len(entry["outputs"][SAVE]["images"]) == 1


# -- outer_previews taken through a negative output index -----------------------------------------------------------
def test_outer_step_preview_linked_by_a_negative_index_shows_the_images(client, exemplar_defaults):
    """``"previews": ["3", -1]``: the mark said nobody takes outer_previews, and OuterStepPreview failed with "it holds
    no images" on both engines."""
    from comfyui_nested_diffusion.protocol import OUTER_PREVIEWS_MARK

    prompt = nested_prompt(fresh_seed(), outer_steps=3, inner_steps=2, prefix="steering_negative",
                           exemplar_defaults=exemplar_defaults)
    prompt["7"]["inputs"]["previews"] = [SAMPLER, -1]
    outcome = attempt(client, prompt)
    assert outcome.kind == "ok", outcome.describe()
    entry = client.history(outcome.prompt_id)
    assert entry["prompt"][2][SAMPLER]["inputs"][OUTER_PREVIEWS_MARK] is True
    assert len(entry["outputs"]["7"]["nested_labels"]) == 3 * 2


# -- update_seconds never places more outer steps than the nodes allow ------------------------------------------------
def test_a_tiny_update_seconds_keeps_within_the_outer_step_maximum():
    """1000 x 10 with update_seconds 1e-9 became 9991 outer steps (2322 ran in 90 s, 73 MB of previews). The pacer
    now gives every inner process at least the steps that keep the whole run within 1000 outer steps."""
    from comfyui_nested_diffusion.nested_core.pacing import MAX_OUTER_STEPS, IntervalPacer

    total, done, outer = 1000 * 10, 10, 1
    pacer = IntervalPacer(1e-9, total)
    counts = pacer.update(done, 10, 10, 0.01)
    while counts:
        assert outer + len(counts) <= MAX_OUTER_STEPS and sum(counts) == total - done
        done += counts[0]
        outer += 1
        counts = pacer.update(done, counts[0], counts[0], 0.01 * counts[0])
    assert done == total and outer <= MAX_OUTER_STEPS
    # a stage that may have fewer, or connected sigmas that gave more, keep their own bound
    assert len(IntervalPacer(1e-9, 4000, max_outer_steps=200).update(10, 10, 10, 0.01)) <= 199


def test_a_tiny_update_seconds_run_reports_at_most_1000_outer_steps(client, exemplar_defaults):
    prompt = batch_prompt(exemplar_defaults, batch=1, outer=1000, inner=10)
    prompt[SAMPLER]["inputs"]["update_seconds"] = 1e-9
    prompt_id = client.queue_prompt(prompt)
    totals = []
    for event in client.stream(prompt_id, timeout=300):
        if event["type"] == "nested_diffusion.outer_step":
            totals.append(event["data"]["outer_steps"])
            if len(totals) == 3:
                client.finish(prompt_id, SAMPLER)
    assert 3 <= len(totals) and max(totals) <= 1000, totals


# -- a pick at a stage boundary ----------------------------------------------------------------------------------
def picking_stages(ex: dict, *, batch: int = 4, inner: int = 120) -> dict:
    """Stage 1 (outer step 1 of 3, leftover noise) -> Pick Candidate (index 0) -> stage 2 -> saved; the stage's
    outer_previews and the picked_preview decoded and saved too."""
    prompt = batch_prompt(ex, batch=batch, outer=3, inner=inner)
    stage = {k: v for k, v in prompt[SAMPLER]["inputs"].items() if k not in ("seed", "denoise")}
    prompt[SAMPLER] = {"class_type": "NestedKSamplerAdvanced", "inputs": {
        **stage, "add_noise": "enable", "noise_seed": fresh_seed(), "start_at_outer_step": 0, "end_at_outer_step": 1,
        "return_with_leftover_noise": "enable"}}
    prompt["9"] = {"class_type": "NestedPickCandidate",
                   "inputs": {"samples": [SAMPLER, 0], "outer_previews": [SAMPLER, 1], "index": 0, "vae": ["4", 0]}}
    prompt["20"] = {"class_type": "NestedKSamplerAdvanced", "inputs": {
        **stage, "latent_image": ["9", 0], "add_noise": "disable", "noise_seed": 0, "start_at_outer_step": 1,
        "end_at_outer_step": 3, "return_with_leftover_noise": "disable"}}
    prompt["5"]["inputs"]["samples"] = ["20", 0]
    for node, link, prefix in (("21", [SAMPLER, 1], "steering_candidates"), ("23", ["9", 1], "steering_picked")):
        prompt[node] = {"class_type": "VAEDecode", "inputs": {"samples": link, "vae": ["4", 0]}}
        prompt[str(int(node) + 1)] = {"class_type": "SaveImage", "inputs": {"images": [node, 0], "filename_prefix": prefix}}
    return prompt


def test_a_pick_during_a_stage_shows_the_kept_image_and_the_next_stage_gets_the_whole_batch(client,
                                                                                             exemplar_defaults):
    """A client picks candidate 1 while stage 1's only outer step runs. Pick Candidate (index 0) must show the kept
    candidate and hand it on in every slot of the stage's batch: it showed another candidate's image (the last of
    the step) and the final output was 1 image instead of the batch of 4. The same prompt again (it samples again:
    the pick made its result depend on more than its inputs) shows where each candidate ends without a pick."""
    from api_helpers import decode, mean_abs_difference

    batch, picked = 4, 1
    prompt = picking_stages(exemplar_defaults, batch=batch)
    prompt_id = client.queue_prompt(prompt)
    events = []
    for event in client.stream(prompt_id, timeout=300):
        events.append(event)
        data = event.get("data") or {}
        if event["type"] == "progress" and data.get("node") == SAMPLER and not of_type(events, "steering_picked"):
            events.append({"type": "steering_picked", "data": client.pick(prompt_id, SAMPLER, picked)})
    applied = of_type(events, PICKED_EVENT, SAMPLER)
    assert len(applied) == 1 and applied[0]["data"]["index"] == picked

    def images(run_id: str, node: str) -> list:
        return [decode(client.fetch_output(image)).convert("RGB")
                for image in client.history(run_id)["outputs"][node]["images"]]

    kept, shown = images(prompt_id, "22"), images(prompt_id, "24")
    assert len(shown) == 1 and mean_abs_difference(shown[0], kept[-1]) < 0.5
    assert len(client.history(prompt_id)["outputs"][SAVE]["images"]) == batch, "the next stage lost the batch"

    unpicked = attempt(client, prompt)
    assert unpicked.kind == "ok" and ran(unpicked, SAMPLER), unpicked.describe()
    candidates = images(unpicked.prompt_id, "22")
    assert len(candidates) == batch
    distances = [mean_abs_difference(shown[0], candidate) for candidate in candidates]
    assert distances.index(min(distances)) == picked and distances[picked] < 1.0, distances


# -- planning is bounded for any accepted input ------------------------------------------------------------------
# (sampler, scheduler, outer, inner): 17.8 s, 14.9 s, 20.8 s and 0.5 s from the sampler's start to its first model
# call on a 2-core machine, measuring every one of the 1000 inner schedules' costs (SDE solvers draw Brownian-tree
# noise even on the stand-in).
PLANS = [("dpmpp_3m_sde", "kl_optimal", 1000, 9), ("dpmpp_2m_sde", "karras", 1000, 8),
         ("dpmpp_3m_sde", "normal", 300, 30), ("euler", "karras", 1000, 8), ("dpmpp_2m_sde", "normal", 2, 5000)]


def test_any_accepted_input_reaches_its_first_model_call_in_about_a_second(comfy_server, client, exemplar_defaults):
    from test_server_limits_api import planning_seconds

    measured = {}
    for sampler, scheduler, outer, inner in PLANS:
        prompt = batch_prompt(exemplar_defaults, batch=1, outer=outer, inner=inner)
        prompt[SAMPLER]["inputs"].update(sampler_name=sampler, scheduler=scheduler)
        seconds, outcome = planning_seconds(comfy_server, client, prompt)
        assert outcome == "runs", outcome
        measured[(sampler, scheduler, outer, inner)] = round(seconds, 2)
    print(f"\nseconds to the first model call: {measured}")
    assert max(measured.values()) < 2.0, measured  # the target is 1 s; a busy shared 2-core machine adds to it


# -- websocket traffic and Cancel with a large batch -----------------------------------------------------------------
TRAFFIC_BATCH, TRAFFIC_SIZE, TRAFFIC_STEPS = 64, 128, 40
# Both samplers conditioned on the plainest exemplar: their previews show the same image, and the smallest JPEGs
# (11 KB at 512 px) make KSampler's stream, and so the bound, the smallest.
TRAFFIC_EXEMPLAR = "red disc"
EXEMPLAR_PROMPT = "20"


def counting_client(url: str) -> ComfyAPIClient:
    """A client that counts the bytes of every websocket message it receives (``received``, ``by_type``), the largest
    of each type (``largest``) and the pixel size of every preview image (``preview_sizes``)."""
    import collections
    import io
    import json

    from PIL import Image

    client = ComfyAPIClient(url).connect()
    client.received = 0
    client.by_type = collections.Counter()
    client.largest = collections.Counter()
    client.preview_sizes = []
    receive = client.ws.recv_data

    def counted(*args, **kwargs):
        opcode, message = receive(*args, **kwargs)
        client.received += len(message or b"")
        kind = json.loads(message)["type"] if opcode == 1 else f"binary {int.from_bytes(message[:4], 'big')}"
        client.by_type[kind] += len(message or b"")
        client.by_type[f"{kind} (messages)"] += 1
        client.largest[kind] = max(client.largest[kind], len(message or b""))
        if kind == "binary 4":  # a preview with metadata: type, metadata length, metadata, JPEG
            jpeg = message[8 + int.from_bytes(message[4:8], "big"):]
            client.preview_sizes.append(Image.open(io.BytesIO(jpeg)).size)
        return opcode, message

    client.ws.recv_data = counted
    return client


def large_batch_prompt(ex: dict, sampler_type: str, inputs: dict, exemplar: str = "") -> dict:
    """Batch 64 at 128 px; with ``exemplar`` an Exemplar Prompt naming it conditions the sampler."""
    from comfyui_nested_diffusion.tools.api_graphs import EXEMPLAR, exemplar_graph

    prompt = exemplar_graph(sampler_type, {"seed": fresh_seed(), "cfg": 1.0, "sampler_name": "euler",
                                           "scheduler": "normal", "denoise": 1.0, **inputs}, size=TRAFFIC_SIZE,
                            batch=TRAFFIC_BATCH, exemplar_defaults=ex, prefix="steering_traffic")
    if exemplar:
        prompt[EXEMPLAR_PROMPT] = {"class_type": "NestedExemplarPrompt", "inputs": {"model": [EXEMPLAR, 0], "text": exemplar}}
        prompt[SAMPLER]["inputs"].update(positive=[EXEMPLAR_PROMPT, 0], negative=[EXEMPLAR_PROMPT, 0])
    return prompt


def traffic(client, prompt: dict) -> dict:
    """One run's websocket bytes: ``total``, ``previews`` (ComfyUI's binary preview messages), ``filmstrip`` (the
    candidates events), ``largest_filmstrip`` (one event), ``preview_sizes`` (each preview's pixel size)."""
    client.received = 0
    client.by_type.clear()
    client.largest.clear()
    client.preview_sizes = []
    client.run(prompt, timeout=600)
    print(f"\n{prompt[SAMPLER]['class_type']}: bytes by message type {dict(client.by_type)}")
    return {"total": client.received, "previews": client.by_type["binary 4"],
            "filmstrip": client.by_type[CANDIDATES_EVENT], "largest_filmstrip": client.largest[CANDIDATES_EVENT],
            "preview_sizes": list(client.preview_sizes)}


def test_a_large_batch_sends_at_most_twice_ksamplers_bytes_per_model_call_for_the_same_image(comfy_server, pack,
                                                                                          exemplar_defaults):
    """Batch 64 at 128 px, one model call per outer step, a client watching: the filmstrip sent 64 thumbnails after
    every outer step (261 KB against KSampler's 20 KB per step). What is bounded now:

    * ComfyUI's progress previews: one per model call, at the same pixel size as KSampler's one per step (the first
      batch item's x0, which the server scales to --preview-size);
    * the filmstrip: within a budget that does not depend on the images (nodes/filmstrip.py: 1/32 byte per preview
      pixel per model call, 8 KB at 512 px, plus 256 KB per run), overshot by one event at most;
    * the whole stream: at most 2x KSampler's bytes per model call plus that per-run allowance, where both runs
      show the same image. The JPEG of each preview depends on the image (11 KB for a plain disc, 57 KB for
      stripes), and without a prompt the first item lands on another exemplar in each run, which alone made the
      previews 0.3-2.7x KSampler's (bench/preview_traffic.py), so both samplers here are conditioned on one."""
    from comfyui_nested_diffusion.nodes.filmstrip import ALLOWANCE, SHARE

    client = counting_client(comfy_server.url)
    try:
        ksampler = traffic(client, large_batch_prompt(exemplar_defaults, "KSampler", {"steps": TRAFFIC_STEPS},
                                                      TRAFFIC_EXEMPLAR))
        nested = traffic(client, large_batch_prompt(exemplar_defaults, "NestedKSampler", {
            "outer_steps": TRAFFIC_STEPS, "inner_steps": 1, "outer_step": "renoise"}, TRAFFIC_EXEMPLAR))
    finally:
        client.close()
    print(f"websocket bytes per model call: KSampler {ksampler['total'] / TRAFFIC_STEPS:.0f} (previews "
          f"{ksampler['previews'] / TRAFFIC_STEPS:.0f}), nested {nested['total'] / TRAFFIC_STEPS:.0f} (previews "
          f"{nested['previews'] / TRAFFIC_STEPS:.0f}, filmstrip {nested['filmstrip'] / TRAFFIC_STEPS:.0f}): "
          f"{nested['total'] / ksampler['total']:.2f}x")
    assert len(nested["preview_sizes"]) == len(ksampler["preview_sizes"]) == TRAFFIC_STEPS
    assert set(nested["preview_sizes"]) == set(ksampler["preview_sizes"]), (nested["preview_sizes"][:3],
                                                                          ksampler["preview_sizes"][:3])
    width, height = nested["preview_sizes"][0]
    assert 0 < nested["filmstrip"] <= SHARE * width * height * TRAFFIC_STEPS + ALLOWANCE + nested["largest_filmstrip"]
    assert nested["total"] <= 2.0 * ksampler["total"] + ALLOWANCE + nested["largest_filmstrip"], (nested, ksampler)


def cancel_delays(client, prompt: dict, is_step, at=(1, 3, 6)) -> tuple[list[float], list[float]]:
    """Seconds from ``POST /interrupt`` to ``execution_interrupted``, cancelling at the event for which
    ``is_step(event, k)`` holds, for each ``k`` in ``at``; and the seconds between the sampler's ``progress`` events
    before each Cancel."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ExecutionInterrupted

    delays, intervals = [], []
    for after_step in at:
        prompt[SAMPLER]["inputs"]["seed"] = fresh_seed()
        prompt_id = client.queue_prompt(prompt)
        sent, progress = None, []
        try:
            for event in client.stream(prompt_id, timeout=300):
                if sent is None and event["type"] == "progress" and event["data"].get("node") == SAMPLER:
                    progress.append(time.monotonic())
                if sent is None and is_step(event, after_step):
                    sent = time.monotonic()
                    client.interrupt(prompt_id)
        except ExecutionInterrupted:
            delays.append(time.monotonic() - sent)
        intervals += [b - a for a, b in zip(progress, progress[1:])]
    return delays, intervals


def after_outer_step(event: dict, k: int) -> bool:
    return event["type"] == "nested_diffusion.outer_step" and event["data"]["outer_step"] == k


def later(is_step, seconds: float):
    """``is_step``, holding ``seconds`` before it says so: ComfyUI 0.33.0's ProgressBar passes on no update under
    0.5% of the total, so inside an inner diffusion there is no event to react to."""
    def waited(event: dict, k: int) -> bool:
        if is_step(event, k):
            time.sleep(seconds)
            return True
        return False
    return waited


def test_cancel_during_a_large_batch_run_stops_it_within_a_model_call_of_ksampler(comfy_server, client,
                                                                                 exemplar_defaults):
    """Cancel in each phase of a batch-64 run: during an inner diffusion (on ComfyUI 0.33.0, whose ProgressBar skips
    its hook for small updates, the run went on to the end of the inner diffusion: 19 s with dpmpp_3m_sde), while
    the filmstrip's 64 previews are decoded (the run stopped 0.13-0.76 s later where KSampler stopped within 0.07 s:
    the decodes did not look for Cancel), and after a later outer step (the outer step and the next model call
    follow). The exemplar model's
    batch-64 call (about 0.3 s on 2 loaded cores) holds no ComfyUI layer that looks for Cancel, so both samplers
    stop only once the model call running when Cancel arrives has ended. The bound is relative to that call,
    timed on the same server in the same test: in every phase the median delay is at most one model call (the
    slowest KSampler's run had) beyond KSampler's slowest Cancel (the load of a shared machine comes and goes within
    the test: KSampler's median there was once 0.91 s where its calls took 0.76 s, and a later outer step's median
    1.38 s against 0.60 + 0.60 s at load 8), and while decoding, where no model call runs, at most half a model
    call (bench/cancel_phases.py has the phases with their times, planning included)."""
    import statistics

    def delays_of(inner: int, at, is_step) -> list[float]:
        return cancel_delays(client, large_batch_prompt(exemplar_defaults, "NestedKSampler", {
            "outer_steps": 300, "inner_steps": inner, "outer_step": "renoise"}), is_step, at)[0]

    ksampler, intervals = cancel_delays(client, large_batch_prompt(exemplar_defaults, "KSampler", {"steps": 300}),
                                        lambda event, k: event["type"] == "progress" and event["data"].get("value") == k)
    model_call = statistics.median(intervals)
    slowest_call = max(intervals)  # the load of a shared machine comes and goes: a call during a phase may take this
    phases = {
        "inner diffusion": delays_of(10, (1, 2, 3), later(after_outer_step, 2 * model_call)),  # its 3rd call of 10
        "filmstrip decoding": delays_of(1, (1, 2, 3), after_outer_step),
        "after a later outer step": delays_of(1, (24, 26, 28), after_outer_step),
    }
    print(f"\none model call (a KSampler step): {model_call:.3f} s; seconds from POST /interrupt to "
          f"execution_interrupted: KSampler {[round(d, 3) for d in ksampler]}, "
          + ", ".join(f"{phase} {[round(d, 3) for d in delays]}" for phase, delays in phases.items()))
    assert len(ksampler) == 3 and all(len(delays) == 3 for delays in phases.values()), phases
    for phase, delays in phases.items():
        assert statistics.median(delays) <= max(ksampler) + slowest_call, (phase, delays, ksampler, slowest_call)
    assert statistics.median(phases["filmstrip decoding"]) <= 0.5 * model_call, (phases, model_call)


def test_the_filmstrip_goes_only_to_a_connected_client_within_its_budget(pack):
    """The rule behind the traffic bound (nodes/filmstrip.py): nothing while the prompt's client is not connected,
    smaller thumbnails for larger batches, and events only while their bytes fit a budget per model call that
    counts the previews' pixels, not their JPEG bytes."""
    import json
    from types import SimpleNamespace

    from comfyui_nested_diffusion.nodes.filmstrip import FilmstripBudget, client_watching, sent_pixels, thumbnail_side
    from PIL import Image

    assert client_watching(SimpleNamespace(sockets={"a": object()}, client_id="a"))
    assert not client_watching(SimpleNamespace(sockets={"b": object()}, client_id="a"))  # its tab was closed
    assert client_watching(SimpleNamespace(sockets={"b": object()}, client_id=None))  # broadcast to everyone
    assert not client_watching(SimpleNamespace(sockets={}, client_id=None))
    assert [thumbnail_side(batch) for batch in (1, 4, 16, 64, 4096)] == [256, 128, 64, 32, 32]

    # Pixels as the server sends them (scaled to fit max_size, small images enlarged), whatever the image shows.
    assert sent_pixels(("JPEG", Image.new("RGB", (128, 128)), 512)) == 512 * 512
    assert sent_pixels(("JPEG", Image.new("RGB", (64, 32)), 512)) == 512 * 256
    assert sent_pixels(("JPEG", Image.new("RGB", (1024, 768)), 512)) == 512 * 384
    assert sent_pixels(None) == 0
    plain, noisy = (FilmstripBudget(share=1 / 32, allowance=1000) for _ in range(2))
    plain.count_preview(("JPEG", Image.new("RGB", (64, 64)), 512))
    noisy.count_preview(("JPEG", Image.effect_noise((64, 64), 50).convert("RGB"), 512))
    assert plain.budget(10) == noisy.budget(10) == 8192 * 10 + 1000

    budget = FilmstripBudget(share=1 / 32, allowance=1000)
    event = {"images": ["x" * 20000], "outer_step": 1}
    event_bytes = len(json.dumps({"type": CANDIDATES_EVENT, "data": event}))  # as the server sends it
    sent = 0
    for calls in range(1, 51):
        budget.count_preview(("JPEG", Image.new("RGB", (64, 64)), 512))
        if budget.fits(calls):
            budget.count_event(CANDIDATES_EVENT, event)
            sent += 1
    assert 0 < sent < 50 and budget.skipped == 50 - sent
    assert budget.filmstrip_bytes == sent * event_bytes
    assert budget.filmstrip_bytes <= 8192 * 50 + 1000 + event_bytes  # overshoot: at most one event
