"""'Finish now' through the API: a running nested prompt ends at its next model call, keeps its latest
image, and the graph goes on; malformed, unknown or stale requests get a clear 4xx answer."""
from __future__ import annotations

import requests
from api_helpers import OUTER_STEP_EVENT, SAMPLER, SAVE, nested_prompt, of_type
from comfyui_nested_diffusion.protocol import FINISH_ROUTE, RUNNING_ROUTE


def post_finish(server, body, raw: bool = False):
    data = body if raw else None
    return requests.post(f"{server.url}{FINISH_ROUTE}", json=None if raw else body, data=data, timeout=10)


def test_finish_now_returns_the_latest_inner_result_and_the_graph_goes_on(comfy_server, client, exemplar_defaults):
    outer = 200
    prompt_id = client.queue_prompt(nested_prompt(seed=77, outer_steps=outer, prefix="nested_finish",
                                              exemplar_defaults=exemplar_defaults))
    events, answers = [], []
    for event in client.stream(prompt_id, timeout=120):
        events.append(event)
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 2:
            listing = requests.get(f"{comfy_server.url}{RUNNING_ROUTE}", params={"client_id": client.client_id},
                                   timeout=10).json()["running"]
            answers.append((any(entry["prompt_id"] == prompt_id and entry["node_id"] == SAMPLER
                                    for entry in listing), None))
            answers.append((None, post_finish(comfy_server, {"prompt_id": prompt_id, "node_id": SAMPLER,
                                                             "client_id": client.client_id})))
    assert answers[0][0] is True
    response = answers[1][1]
    assert response.status_code == 200 and response.json()["finishing"] is True
    steps = of_type(events, OUTER_STEP_EVENT, SAMPLER)
    assert 2 <= len(steps) < outer  # it finished the inner diffusion it was in, then stopped
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"][SAVE]["images"]) == 2  # downstream decode + save ran on the kept image
    assert requests.get(f"{comfy_server.url}{RUNNING_ROUTE}", timeout=10).json()["running"] == []


def test_finish_with_nothing_running_is_409(comfy_server):
    response = post_finish(comfy_server, {"prompt_id": "no-such-prompt", "node_id": "3"})
    assert response.status_code == 409
    assert "nothing to finish" in response.json()["error"]


def test_malformed_finish_requests_are_400(comfy_server):
    assert post_finish(comfy_server, b"{not json", raw=True).status_code == 400
    for body in ([], {"prompt_id": "x"}, {"prompt_id": 5, "node_id": "3"}, {"prompt_id": "", "node_id": "3"},
                 {"prompt_id": "x" * 500, "node_id": "3"}):
        response = post_finish(comfy_server, body)
        assert response.status_code == 400, body
        assert "prompt_id" in response.json()["error"] or "JSON" in response.json()["error"]


def test_finish_naming_another_prompt_is_404_and_changes_nothing(comfy_server, client, exemplar_defaults):
    outer = 120
    prompt_id = client.queue_prompt(nested_prompt(seed=78, outer_steps=outer, prefix="nested_not_finished",
                                              exemplar_defaults=exemplar_defaults))
    answers = []
    events = []
    for event in client.stream(prompt_id, timeout=120):
        events.append(event)
        if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1:
            answers.append(post_finish(comfy_server, {"prompt_id": "stale-prompt", "node_id": SAMPLER}))
            answers.append(post_finish(comfy_server, {"prompt_id": prompt_id, "node_id": "999"}))
    assert [answer.status_code for answer in answers] == [404, 404]
    assert "no running nested sampler" in answers[0].json()["error"]
    assert len(of_type(events, OUTER_STEP_EVENT, SAMPLER)) == outer  # the run was not touched
    assert client.history(prompt_id)["status"]["status_str"] == "success"
