"""'Keep only this' (a pick) through the API: ``POST /nested_diffusion/pick`` and the run control behind it.

Three groups:

* ``RunControl`` and ``request_pick`` in process (nodes/steering.py): the interface the sampler codes against, and
  every answer of the pick rule (409 nothing runs, 404 unknown run, 403 another client's run, 400 out of range,
  409 a second pick, 200).
* The route on the shared test server: malformed bodies (400), nothing running (409), and, against a live run,
  another client's pick (403), an unknown prompt or node (404), and stale picks after the run ended (404/409).
* The sampler honouring a pick (``test_sampler_keeps_only_the_picked_item``): the ``nested_diffusion.candidates``
  events, the ``nested_diffusion.picked`` event, the batch shrinking to the kept item, and the kept item ending
  where it would have in the full batch.
"""
from __future__ import annotations

import base64
import importlib
import threading

import pytest
import requests
from api_helpers import OUTER_STEP_EVENT, SAMPLER, SAVE, decode, mean_abs_difference, nested_prompt, of_type
from comfyui_nested_diffusion.protocol import CANDIDATES_EVENT, PICK_ROUTE, PICKED_EVENT


def post_pick(server, body, raw: bool = False):
    return requests.post(f"{server.url}{PICK_ROUTE}", json=None if raw else body,
                         data=body if raw else None, timeout=10)


@pytest.fixture(scope="module")
def steering(pack):
    from comfyui_nested_diffusion.tools.comfy_env import PACK_MODULE_NAME

    return importlib.import_module(f"{PACK_MODULE_NAME}.nodes.steering")


# -- in process: RunControl and request_pick ---------------------------------------------------------------------
def test_run_control_is_the_interface_the_sampler_reads(steering):
    control = steering.RunControl()
    assert control.finish_requested() is False
    control.request_finish()
    assert control.finish_requested() is True

    assert control.take_pick() is None and control.batch_size is None
    stale = steering.RunControl()
    stale.set_batch_size(4)
    stale.offer_pick(3)
    assert stale.take_pick(2) is None and stale.picked is None  # a pick the batch no longer holds is dropped
    control.set_batch_size(4)
    assert control.batch_size == 4
    for bad in (0, -1, 2.0, True, "4"):
        with pytest.raises(ValueError):
            control.set_batch_size(bad)
    assert control.offer_pick(2)[0] == 200
    assert control.pending_pick == 2 and control.picked is None
    assert control.offer_pick(3) == (200, {"picking": True, "index": 3, "batch_size": 4, "replaced": 2})
    assert control.take_pick(4) == 3  # once ...
    assert control.take_pick() is None  # ... then it is applied
    assert control.picked == 3
    control.set_batch_size(1)
    status, answer = control.offer_pick(0)
    assert status == 409 and "one pick per run" in answer["error"]


def test_run_control_is_thread_safe(steering):
    """Many threads offering picks while one takes them: every pick is taken at most once, and exactly one is
    applied."""
    control = steering.RunControl()
    control.set_batch_size(64)
    taken = []
    start = threading.Barrier(9)

    def offer(i):
        start.wait()
        for _ in range(200):
            control.offer_pick(i)

    def take():
        start.wait()
        for _ in range(2000):
            index = control.take_pick()
            if index is not None:
                taken.append(index)

    threads = [threading.Thread(target=offer, args=(i,)) for i in range(8)] + [threading.Thread(target=take)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    last = control.take_pick()  # a pick offered after the taker's last look
    if last is not None:
        taken.append(last)
    assert len(taken) == 1, taken
    assert control.picked == taken[0]


def test_request_pick_answers(steering):
    status, answer = steering.request_pick("p", "3", 0, "alice")
    assert status == 409 and "no nested sampler is running" in answer["error"]
    with steering.finishable_run("p", "3", client_id="alice") as control, \
            steering.finishable_run("q", "5", client_id="bob"):
        # the sampler has not reported its batch size yet: no pick can be checked
        status, answer = steering.request_pick("p", "3", 0, "alice")
        assert status == 409 and "batch size" in answer["error"]
        control.set_batch_size(4)
        entry = {"prompt_id": "p", "node_id": "3", "batch_size": 4, "picked": None}
        assert steering.running_runs("alice") == [entry]
        status, answer = steering.request_pick("p", "4", 0, "alice")
        assert status == 404 and answer["running"] == [entry]  # only alice's runs
        assert steering.request_pick("q", "5", 0, "alice")[0] == 403
        status, answer = steering.request_pick("p", "3", 4, "alice")
        assert status == 400 and "0..3" in answer["error"]
        status, answer = steering.request_pick("p", "3", 1, "alice")
        assert status == 200 and answer == {"picking": True, "index": 1, "batch_size": 4, "prompt_id": "p",
                                            "node_id": "3"}
        assert control.take_pick() == 1
        control.set_batch_size(1)
        assert steering.running_runs("alice")[0]["picked"] == 1
        status, answer = steering.request_pick("p", "3", 0, "alice")
        assert status == 409 and "one pick per run" in answer["error"]
    with steering.finishable_run("r", "7", client_id="alice") as control:
        control.set_batch_size(1)
        status, answer = steering.request_pick("r", "7", 1, "alice")
        assert status == 400 and "batch size is 1" in answer["error"]
        # finish goes on working on the same control
        assert steering.request_finish("r", "7", "alice")[0] == 200 and control.finish_requested()
    assert steering.request_pick("p", "3", 0, "alice")[0] == 409  # stale: nothing runs any more


def test_parse_pick_request(steering):
    parse = steering.parse_pick_request
    assert parse({"prompt_id": "p", "node": "3", "index": 2, "client_id": "c"}) == (("p", "3", 2, "c"), None)
    assert parse({"prompt_id": "p", "node_id": 3, "index": 0}) == (("p", "3", 0, None), None)
    for body, words in (([], "JSON object"), ({"prompt_id": "p", "index": 0}, "node"),
                        ({"prompt_id": "p", "node": "3"}, "index"), ({"prompt_id": "p", "node": "3", "index": "1"}, "index"),
                        ({"prompt_id": "p", "node": "3", "index": 1.0}, "index"),
                        ({"prompt_id": "p", "node": "3", "index": True}, "index"),
                        ({"prompt_id": "p", "node": "3", "index": -1}, "out of range"),
                        ({"prompt_id": "p", "node": "3", "index": 0, "client_id": 5}, "client_id")):
        parsed, problem = parse(body)
        assert parsed is None and words in problem, (body, problem)


# -- the route on the test server --------------------------------------------------------------------------------
def test_malformed_pick_requests_are_400(comfy_server):
    assert post_pick(comfy_server, b"{not json", raw=True).status_code == 400
    for body in ([], {"prompt_id": "x", "index": 0}, {"prompt_id": "x", "node": "3"},
                 {"prompt_id": "x", "node": "3", "index": "0"}, {"prompt_id": "x", "node": "3", "index": 0.5},
                 {"prompt_id": "x", "node": "3", "index": -2}, {"prompt_id": "", "node": "3", "index": 0},
                 {"prompt_id": "x" * 500, "node": "3", "index": 0}):
        response = post_pick(comfy_server, body)
        assert response.status_code == 400, body
        assert response.json()["error"]


def test_pick_with_nothing_running_is_409(comfy_server):
    response = post_pick(comfy_server, {"prompt_id": "no-such-prompt", "node": "3", "index": 0})
    assert response.status_code == 409
    assert "nothing to pick in" in response.json()["error"]


def test_pick_refuses_other_clients_unknown_and_stale_runs(comfy_server, client, exemplar_defaults):
    """Against a live run: another client's pick is 403, an unknown prompt or node 404 (the run is untouched);
    after the run: 409 (nothing runs) or, while another run runs, 404."""
    from comfyui_nested_diffusion.tools.comfy_api_client import SteeringRefused

    outer = 150
    prompt_id = client.queue_prompt(nested_prompt(seed=91, outer_steps=outer, prefix="nested_pick_refused",
                                                  exemplar_defaults=exemplar_defaults))
    answers, listing = [], []
    events = []
    for event in client.stream(prompt_id, timeout=180):
        events.append(event)
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1:
            listing = client.running()
            base = {"prompt_id": prompt_id, "node": SAMPLER, "index": 0}
            answers.append(post_pick(comfy_server, {**base, "client_id": "someone-else"}))
            answers.append(post_pick(comfy_server, {**base, "prompt_id": "stale-prompt", "client_id": client.client_id}))
            answers.append(post_pick(comfy_server, {**base, "node": "999", "client_id": client.client_id}))
            client.finish(prompt_id, SAMPLER)  # and end it early
    assert [a.status_code for a in answers] == [403, 404, 404]
    assert "another client" in answers[0].json()["error"]
    assert any(r["prompt_id"] == prompt_id and r["node_id"] == SAMPLER for r in answers[1].json()["running"])
    assert [set(entry) for entry in listing] == [{"prompt_id", "node_id", "batch_size", "picked"}]
    assert listing[0]["picked"] is None
    assert 1 <= len(of_type(events, OUTER_STEP_EVENT, SAMPLER)) < outer
    assert client.history(prompt_id)["status"]["status_str"] == "success"

    # stale: the run is over
    with pytest.raises(SteeringRefused) as refused:
        client.pick(prompt_id, SAMPLER, 0)
    assert refused.value.status_code == 409
    # stale while another run runs: 404, naming this client's run
    second = client.queue_prompt(nested_prompt(seed=92, outer_steps=outer, prefix="nested_pick_refused",
                                               exemplar_defaults=exemplar_defaults))
    stale = []
    for event in client.stream(second, timeout=180):
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1:
            try:
                client.pick(prompt_id, SAMPLER, 0)
            except SteeringRefused as error:
                stale.append(error)
            client.finish(second, SAMPLER)
    assert [error.status_code for error in stale] == [404]
    assert [r["prompt_id"] for r in stale[0].answer["running"]] == [second]


# -- the sampler honouring the pick ---------------------------------------------------------------------------------
def decode_data_url(url: str):
    head, _, data = url.partition(",")
    assert head == "data:image/jpeg;base64", head
    return decode(base64.b64decode(data))


def test_sampler_keeps_only_the_picked_item(comfy_server, client, exemplar_defaults):
    """Batch 4: after outer step 1 the client picks batch item 2; from the next outer boundary on the run continues
    only that item (candidates events with one image, a picked event, one saved image), which ends where it would
    have in the full batch. Out of range and second picks are refused on the live run."""
    from comfyui_nested_diffusion.tools.comfy_api_client import SteeringRefused

    outer, inner, batch, index = 12, 8, 4, 2

    def prompt(prefix):
        graph = nested_prompt(seed=93, outer_steps=outer, inner_steps=inner, prefix=prefix,
                              exemplar_defaults=exemplar_defaults)
        graph["2"]["inputs"]["batch_size"] = batch
        return graph

    # the full batch, unpicked: where item 2 ends
    full_id, full_events = client.run(prompt("nested_pick_full"), timeout=180)
    full = [decode(client.fetch_output(image)) for image in client.history(full_id)["outputs"][SAVE]["images"]]
    assert len(full) == batch
    full_candidates = of_type(full_events, CANDIDATES_EVENT, SAMPLER)
    assert len(full_candidates) == outer
    assert sum(len(e["data"]["images"]) for e in full_candidates) == outer * batch
    # The same inputs again would be served from ComfyUI's cache, which keeps only what the last prompt used: a
    # prompt in between (another seed) makes the picked run really sample.
    client.run(nested_prompt(seed=95, outer_steps=1, inner_steps=1, prefix="nested_pick_between",
                             exemplar_defaults=exemplar_defaults), timeout=60)

    prompt_id = client.queue_prompt(prompt("nested_pick_kept"))
    events, answers, refused = [], [], []
    for event in client.stream(prompt_id, timeout=180):
        events.append(event)
        if event["type"] == CANDIDATES_EVENT and event["data"]["outer_step"] == 1:
            data = event["data"]
            assert data["batch_indices"] == list(range(batch)) and len(data["images"]) == batch
            for bad in (batch, 7):
                try:
                    client.pick(prompt_id, data["node"], bad)
                except SteeringRefused as error:
                    refused.append(error)
            answers.append(client.pick(prompt_id, data["node"], index))
        elif event["type"] == PICKED_EVENT:
            try:  # a second pick on the same run
                client.pick(prompt_id, SAMPLER, 0)
            except SteeringRefused as error:
                refused.append(error)
    assert [error.status_code for error in refused] == [400, 400, 409]
    assert f"0..{batch - 1}" in refused[0].answer["error"]
    assert "one pick per run" in refused[2].answer["error"]
    assert answers[0]["picking"] is True and answers[0]["index"] == index

    picked = of_type(events, PICKED_EVENT, SAMPLER)
    assert len(picked) == 1
    assert picked[0]["data"]["index"] == index and picked[0]["data"]["batch_index"] == index
    assert picked[0]["data"]["prompt_id"] == prompt_id
    k = picked[0]["data"]["outer_step"]
    assert 1 <= k < outer
    candidates = of_type(events, CANDIDATES_EVENT, SAMPLER)
    assert [e["data"]["outer_step"] for e in candidates] == list(range(1, outer + 1))
    for event in candidates:
        data = event["data"]
        assert data["outer_steps"] == outer and data["prompt_id"] == prompt_id and data["display_node"] == SAMPLER
        assert len(data["images"]) == len(data["batch_indices"])
        for url in data["images"]:
            decode_data_url(url)
        if data["outer_step"] <= k:
            assert data["batch_indices"] == list(range(batch)) and data.get("picked") is None, data["outer_step"]
        else:
            assert data["batch_indices"] == [index] and data["picked"] == index, data["outer_step"]
    saved = client.history(prompt_id)["outputs"][SAVE]["images"]
    assert len(saved) == 1
    kept = decode(client.fetch_output(saved[0]))
    # the kept item continues as it would have in the full batch (euler inner solver, outer eta 0: no noise drawn
    # after the start)
    assert mean_abs_difference(kept.convert("RGB"), full[index].convert("RGB")) < 1.0
    assert client.running() == []


def test_candidates_event_images_are_small_jpeg_previews(client, exemplar_defaults):
    """Every outer step sends one preview per batch item."""
    prompt_id, events = client.run(nested_prompt(seed=94, prefix="nested_candidates",
                                                 exemplar_defaults=exemplar_defaults), timeout=120)
    candidates = of_type(events, CANDIDATES_EVENT, SAMPLER)
    steps = of_type(events, OUTER_STEP_EVENT, SAMPLER)
    assert [e["data"]["outer_step"] for e in candidates] == [e["data"]["outer_step"] for e in steps]
    for event, step in zip(candidates, steps):
        data = event["data"]
        assert data["nfe"] == step["data"]["nfe"] and data["nfe_total"] == step["data"]["nfe_total"]
        assert data["node"] == SAMPLER and data.get("picked") is None and len(data["images"]) == 2
        for url in data["images"]:
            image = decode_data_url(url)
            assert image.format == "JPEG" and max(image.size) <= 256
        assert all(len(url) < 20_000 for url in data["images"])  # small previews: they must not slow sampling
