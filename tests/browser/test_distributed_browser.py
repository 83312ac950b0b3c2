"""The workers' candidates on the master's page, in a real browser: a master and two workers (tests/
test_distributed_api.py's cluster, workers started with --enable-cors-header as ComfyUI-Distributed starts its own),
the editor open on the master with the ComfyUI-Distributed example, the job queued with the page's client id.
Under the Nested KSampler a panel shows each worker's latest candidates, labelled with the worker; "keep only this"
on worker 1's candidate keeps it there and finishes the master and worker 2 (five finals collected). What the
workers' events cost the page is printed (events and bytes per outer step).

Screenshot: test-artifacts/distributed_job_strip.png.
"""
from __future__ import annotations

import json
import time

import pytest
import requests
from test_browser import ARTIFACTS, browser, dismiss_templates_dialog, load_graph, open_editor  # noqa: F401
from test_browser_steering import frame, widget_center
from test_distributed_api import cluster, needs_distributed, wait_history  # noqa: F401

WORKER_EXTRA_ARGS = ["--enable-cors-header", "*"]
OUTER, INNER, SECONDS = 4, 10, 0.12


@pytest.fixture(scope="module")
def master_page(browser, cluster):  # noqa: F811
    context, page = open_editor(browser, cluster["master"].url, width=1800, height=1100)
    dismiss_templates_dialog(page)
    yield page
    context.close()


def example(outer: int = OUTER, inner: int = INNER):
    from comfyui_nested_diffusion.tools import distributed_workflow as dw

    editor = json.loads((dw.OUT_DIR / f"{dw.NAME}.json").read_text(encoding="utf-8"))
    prompt = json.loads((dw.OUT_DIR / f"{dw.NAME}_api.json").read_text(encoding="utf-8"))
    sampler = str(dw.SAMPLER_NODE)
    prompt["99"] = {"class_type": "NestedDiffusionTestSlowModel",
                    "inputs": {"model": prompt[sampler]["inputs"]["model"], "seconds_per_call": SECONDS}}
    prompt[sampler]["inputs"].update(model=["99", 0], outer_steps=outer, inner_steps=inner)
    prompt[str(dw.SEED_NODE)]["inputs"]["seed"] = int(time.time()) % 100000  # a new seed: nothing cached
    return editor, prompt, sampler


def queue_job_and_wait_for_worker_rows(page, master_url: str, prompt: dict, client_id: str, sampler: str) -> tuple[str, str]:
    """Queue ``prompt`` on the master for both workers; wait until each worker's row shows a candidate. Returns
    (the master's prompt id, the CSS selector of the node's worker rows)."""
    answer = requests.post(f"{master_url}/distributed/queue", timeout=60, json={
        "prompt": prompt, "client_id": client_id, "enabled_worker_ids": ["1", "2"]})
    assert answer.status_code == 200, answer.text
    rows = f'.nested-job-strip[data-node="{sampler}"] .nested-job-row'
    page.wait_for_function(f"() => ['1', '2'].every(w => document.querySelector(`{rows}[data-server=\"${{w}}\"] "
                           "figure img[src^=\"data:\"]`))", timeout=60_000)
    return answer.json()["prompt_id"], rows


@needs_distributed
def test_workers_candidates_show_on_the_master_page_and_a_worker_pick_keeps_it(master_page, cluster):  # noqa: F811
    page = master_page
    editor, prompt, sampler = example()
    load_graph(page, editor, "distributed_example")
    assert page.evaluate("() => !!window.nestedJobStrip"), "the relay is on where ComfyUI-Distributed's nodes are"
    client_id = page.evaluate("() => app.api.clientId ?? app.api.initialClientId")
    try:
        page.wait_for_function("() => [...window.nestedJobStrip.sockets.values()].filter(s => s.readyState === 1)"
                               ".length === 2", timeout=15_000)
    except Exception:
        print(page.evaluate("() => [...window.nestedJobStrip.sockets.entries()].map(([k, s]) => [k, s.url, s.readyState])"),
              page.page_errors, cluster["1"].log_text()[-2000:])
        raise
    prompt_id, rows = queue_job_and_wait_for_worker_rows(page, cluster["master"].url, prompt, client_id, sampler)
    labels = page.locator(f"{rows} > span").all_inner_texts()
    assert sorted(label.split()[0] for label in labels) == ["w1", "w2"]  # each worker's row, by its name
    page.wait_for_function(f"() => !document.querySelector(`{rows}[data-server=\"1\"] button`).disabled",
                           timeout=10_000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "distributed_job_strip.png"))
    page.locator(f'{rows}[data-server="1"] figure:not(.nested-old)[data-position="1"] button').click()
    entry = wait_history(cluster["master"].url, prompt_id, 90)
    assert entry["status"]["status_str"] == "success", entry["status"]
    finals = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"
              and "final" in node["inputs"]["filename_prefix"]]
    assert len(entry["outputs"][finals[0]]["images"]) == 2 + 1 + 2  # worker 1 kept one, the others finished
    received = page.evaluate("() => window.nestedJobStrip.received")
    assert received["events"] >= 2
    print(f"\nworkers' candidates on the page: {received['events']} events, {received['bytes']} bytes "
          f"({received['bytes'] / received['events']:.0f} bytes per outer step of a batch of 2, 16x16 previews); "
          "the master sends nothing for them")
    assert not page.page_errors, page.page_errors


@needs_distributed
def test_finish_now_button_on_the_master_finishes_every_server(master_page, cluster):  # noqa: F811
    page = master_page
    outer = 6
    editor, prompt, sampler = example(outer=outer)
    load_graph(page, editor, "distributed_finish")
    client_id = page.evaluate("() => app.api.clientId ?? app.api.initialClientId")
    page.wait_for_function("() => [...window.nestedJobStrip.sockets.values()].filter(s => s.readyState === 1)"
                           ".length === 2", timeout=15_000)
    frame(page, [int(sampler)])  # the button must be on screen
    prompt_id, rows = queue_job_and_wait_for_worker_rows(page, cluster["master"].url, prompt, client_id, sampler)
    x, y = widget_center(page, int(sampler), "Finish now")
    page.mouse.click(x, y)
    page.get_by_text("Finishing now").first.wait_for(state="visible", timeout=10_000)
    entry = wait_history(cluster["master"].url, prompt_id, 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    finals = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"
              and "final" in node["inputs"]["filename_prefix"]]
    assert len(entry["outputs"][finals[0]]["images"]) == 3 * 2
    steps = [int(text.split("outer ")[1].split("/")[0]) for text in page.locator(f"{rows} > span").all_inner_texts()]
    assert len(steps) == 2 and max(steps) < outer, steps  # both workers finished early
    shown = page.locator(f"{rows} figure").count()  # every outer step of both workers' runs, newest first
    assert shown == 2 * sum(steps), (shown, steps)
    assert not page.page_errors, page.page_errors
