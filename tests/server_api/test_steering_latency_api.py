"""Steering acts at the next model call, through a real server: on a model that sleeps per call (as a large model on a
GPU takes its time), a pick stops evaluating the other batch items at once, and Finish now ends the run within one
model call of the request, with the latest finished image.

The model is the exemplar model behind the test server's own ``NestedDiffusionTestSlowModel`` node
(tests/server_nodes/), which counts every evaluation and the batch items it evaluated.
"""
from __future__ import annotations

import time

import requests
from api_helpers import OUTER_STEP_EVENT, SAMPLER, SAVE, exemplar_graph, of_type
from comfyui_nested_diffusion.protocol import CANDIDATES_EVENT, FINISH_ROUTE, PICK_ROUTE

SLOW = "20"


def slow_prompt(seed: int, outer: int, inner: int, batch: int, seconds: float, exemplar_defaults: dict, prefix: str):
    sampler = {"seed": seed, "outer_steps": outer, "inner_steps": inner, "cfg": 1.0, "sampler_name": "euler",
               "scheduler": "normal", "denoise": 1.0}
    prompt = exemplar_graph("NestedKSampler", sampler, size=16, batch=batch, exemplar_defaults=exemplar_defaults,
                            prefix=prefix)
    prompt[SLOW] = {"class_type": "NestedDiffusionTestSlowModel",
                    "inputs": {"model": prompt[SAMPLER]["inputs"]["model"], "seconds_per_call": seconds}}
    prompt[SAMPLER]["inputs"]["model"] = [SLOW, 0]
    return prompt


def model_calls(server) -> dict:
    return requests.get(f"{server.url}/nested_diffusion_tests/model_calls", timeout=10).json()


def steer_on_first_outer_step(server, client, prompt: dict, route: str, body: dict) -> dict:
    """Queue ``prompt``; on its first outer-step event post ``body`` to ``route``. The model's counts before, at the
    answer and after the run, the answer, the seconds from the post to the end of the run, and the events."""
    before = model_calls(server)
    prompt_id = client.queue_prompt(prompt)
    events, seen = [], {}
    for event in client.stream(prompt_id, timeout=300):
        events.append(event)
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1 and not seen:
            seen["posted"] = time.monotonic()
            seen["answer"] = requests.post(f"{server.url}{route}", timeout=10,
                                           json={**body, "prompt_id": prompt_id, "client_id": client.client_id})
            seen["at_answer"] = model_calls(server)
    seen["seconds"] = time.monotonic() - seen["posted"]
    seen.update(before=before, after=model_calls(server), events=events, prompt_id=prompt_id)
    return seen


def counted(seen: dict, key: str, name: str) -> int:
    return seen[key][name] - seen["before"][name]


def test_a_pick_evaluates_only_the_kept_item_from_the_next_model_call(comfy_server, client, exemplar_defaults):
    """Batch 4, 4 x 6 at 0.1 s per call: 96 batch items evaluated without a pick; a pick on the first outer-step
    event leaves 24 before it, at most the calls in flight until the answer at 4 items, then one per call."""
    batch, outer, inner = 4, 4, 6
    seen = steer_on_first_outer_step(comfy_server, client, slow_prompt(9101, outer, inner, batch, 0.1, exemplar_defaults,
                                     "steer_pick"), PICK_ROUTE, {"node": SAMPLER, "index": 1})
    assert seen["answer"].status_code == 200, seen["answer"].text
    calls, items = counted(seen, "after", "calls"), counted(seen, "after", "items")
    calls_at_answer, items_at_answer = counted(seen, "at_answer", "calls"), counted(seen, "at_answer", "items")
    assert calls == outer * inner, seen
    # after the answer: at most one call of the whole batch (in flight), then the kept item alone
    assert items - items_at_answer <= batch + (calls - calls_at_answer - 1), seen
    assert items <= 0.5 * batch * outer * inner, (items, seen["after"])
    entry = client.history(seen["prompt_id"])
    assert entry["status"]["status_str"] == "success" and len(entry["outputs"][SAVE]["images"]) == 1
    assert [len(e["data"].get("batch_indices", [])) for e in of_type(seen["events"], CANDIDATES_EVENT, SAMPLER)
            ][1:] == [1] * (outer - 1)


def test_finish_now_ends_the_run_within_one_model_call(comfy_server, client, exemplar_defaults):
    """4 x 25 at 0.2 s per call (20 s of model time): Finish now on the first outer-step event ends the run after at
    most the call in flight, with outer step 1's image; the running inner diffusion is dropped."""
    outer, inner, batch = 4, 25, 2
    seen = steer_on_first_outer_step(comfy_server, client, slow_prompt(9102, outer, inner, batch, 0.2, exemplar_defaults,
                                     "steer_finish"), FINISH_ROUTE, {"node_id": SAMPLER})
    assert seen["answer"].status_code == 200, seen["answer"].text
    assert counted(seen, "after", "calls") - counted(seen, "at_answer", "calls") <= 1, seen
    assert seen["seconds"] < 0.2 * 2 + 3.0, seen["seconds"]  # decode and save of the kept image included
    assert len(of_type(seen["events"], OUTER_STEP_EVENT, SAMPLER)) == 1
    entry = client.history(seen["prompt_id"])
    assert entry["status"]["status_str"] == "success" and len(entry["outputs"][SAVE]["images"]) == batch
