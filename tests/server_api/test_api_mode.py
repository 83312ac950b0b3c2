"""The pack in a real ComfyUI server, driven over HTTP + websocket like any API user would.

One server (CPU, previews on; the `comfy_server` fixture in conftest.py) is shared by the session and driven
with tools/comfy_api_client.py. The model is the pack's exact exemplar-mixture model (no weights needed),
decoded with ComfyUI's built-in 'pixel_space' VAE, so every run takes well under a second.
"""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from api_helpers import (
    BATCH,
    INNER,
    OUTER,
    OUTER_STEP_EVENT,
    PREVIEW,
    SAMPLER,
    SAVE,
    SIZE,
    check_outer_step_events,
    decode,
    mean_abs_difference,
    nested_prompt,
    of_type,
    previews_per_outer_step,
)
from comfyui_nested_diffusion.tools.comfy_api_client import (
    ComfyAPIClient,
    ExecutionError,
    ExecutionInterrupted,
    PromptValidationError,
)
from PIL import Image


def test_nodes_are_registered_with_their_schema(client):
    info = client.object_info()
    expected = {
        "NestedKSampler": "Nested KSampler (anytime)",
        "InnerSolverSelect": "Inner Solver (nested)",
        "OuterStepPreview": "Outer Step Preview (nested)",
    }
    for node, display_name in expected.items():
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["display_name"] == display_name
        assert info[node]["category"] == "sampling/nested"
    assert "NestedExemplarModel" in info

    sampler = info["NestedKSampler"]
    assert sampler["input_order"]["required"] == [
        "model", "seed", "outer_steps", "inner_steps", "cfg", "sampler_name", "scheduler",
        "positive", "negative", "latent_image", "denoise",
    ]
    assert list(sampler["input"]["required"]) == sampler["input_order"]["required"]
    assert sampler["input_order"]["optional"] == ["inner_solver", "outer_eta", "max_nfe", "max_seconds", "outer_step",
                                                  "update_seconds"]
    assert sampler["input"]["optional"]["inner_solver"][0] == "NESTED_INNER_SOLVER"
    assert sampler["output"] == ["LATENT", "LATENT"]
    assert sampler["output_name"] == ["samples", "outer_previews"]
    assert info["OuterStepPreview"]["output_node"] is True

    def options(node: str, name: str) -> list:
        spec = info[node]["input"]["required"][name]
        return spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 combo, or a V1 list

    assert options("NestedKSampler", "sampler_name") == options("KSampler", "sampler_name")
    assert options("NestedKSampler", "scheduler") == options("KSampler", "scheduler")
    assert options("InnerSolverSelect", "sampler_name") == options("KSampler", "sampler_name")


def test_update_seconds_choice_is_in_the_outer_step_events(client, exemplar_defaults):
    """update_seconds: each outer_step event names the target and its inner steps; the totals follow the re-plan."""
    prompt = nested_prompt(seed=11, prefix="nested_update_seconds", exemplar_defaults=exemplar_defaults)
    prompt[SAMPLER]["inputs"]["update_seconds"] = 0.02
    prompt_id = client.queue_prompt(prompt)
    events = list(client.stream(prompt_id, timeout=120))
    assert of_type(events, "execution_success")
    steps = [e["data"] for e in of_type(events, OUTER_STEP_EVENT, SAMPLER)]
    assert [s["outer_step"] for s in steps] == list(range(1, len(steps) + 1))
    assert {s["update_seconds"] for s in steps} == {0.02}
    inner = [s["inner_steps"] for s in steps]
    assert inner[0] == INNER and sum(inner) == OUTER * INNER  # the first as planned, then the budget re-planned
    assert [s["nfe"] for s in steps] == [sum(inner[:k + 1]) for k in range(len(steps))]  # euler: a call a step
    assert [s["next_inner_steps"] for s in steps] == [*inner[1:], None]
    assert steps[-1]["outer_steps"] == len(steps) and steps[-1]["nfe_total"] == OUTER * INNER


def test_a_fast_model_does_not_flood_the_page_with_progress(client, exemplar_defaults):
    """The exemplar model makes hundreds of calls a second. Unthrottled, every call was a progress message (two with
    progress_state), and a browser on 2 busy cores fell so far behind that "keep only this" and "Finish now"
    reached the server after the run had ended. Between outer steps progress now goes out at most every 0.1 s;
    every outer step's update is still sent, and the bar still ends at the run's total."""
    outer, inner = 60, 40
    prompt_id = client.queue_prompt(nested_prompt(seed=12, outer_steps=outer, inner_steps=inner,
                                                  prefix="nested_progress_rate", exemplar_defaults=exemplar_defaults))
    arrived = []
    events = list(client.stream(prompt_id, on_event=lambda event: arrived.append(time.monotonic()), timeout=300))
    assert of_type(events, "execution_success")
    sampler_events = [i for i, e in enumerate(events) if e["data"].get("node") == SAMPLER]
    seconds = arrived[sampler_events[-1]] - arrived[sampler_events[0]]
    progress = of_type(events, "progress", SAMPLER)
    values = [e["data"]["value"] for e in progress]
    assert values == sorted(values) and values[-1] == outer * inner
    assert {e["data"]["max"] for e in progress} == {outer * inner}
    # at most one update per 0.1 s between outer steps, plus one per outer step (and the first)
    assert len(progress) <= seconds / 0.1 + outer + 2, (len(progress), seconds)
    assert len(progress) < outer * inner / 2, "progress still goes out on every model call"


def test_prompt_streams_outer_steps_previews_and_progress(client, exemplar_defaults):
    prompt_id = client.queue_prompt(nested_prompt(seed=7, prefix="nested_stream", exemplar_defaults=exemplar_defaults))
    events = list(client.stream(prompt_id, timeout=120))

    assert of_type(events, "execution_success")
    assert events[-1]["type"] == "executing" and events[-1]["data"]["node"] is None
    check_outer_step_events(events, prompt_id)

    # Binary previews: all sent while the sampler node was executing, at least one per outer step.
    executing = [e["data"]["node"] for e in of_type(events, "executing")]
    assert SAMPLER in executing
    start = events.index(next(e for e in events if e["type"] == "executing" and e["data"]["node"] == SAMPLER))
    after = [i for i, e in enumerate(events) if e["type"] == "executing" and i > start]
    window = events[start:after[0]]
    previews = of_type(window, "preview_image", SAMPLER)
    assert len(previews) >= OUTER
    assert len(of_type(events, "preview_image", SAMPLER)) == len(previews), "sampler previews outside its execution"
    groups = previews_per_outer_step(window)
    assert [len(group) >= 1 for group in groups[:OUTER]] == [True] * OUTER, [len(g) for g in groups]
    for preview in previews:
        data = preview["data"]
        assert data["binary_type"] == 4 and data["prompt_id"] == prompt_id  # this client asked for metadata
        image = decode(data["image"])
        assert image.format == {"image/jpeg": "JPEG", "image/png": "PNG"}[data["image_type"]]
        assert image.width > 0 and image.height > 0

    # Progress is counted in NFEs over the whole nested run.
    progress = of_type(events, "progress", SAMPLER)
    assert progress and {e["data"]["max"] for e in progress} == {OUTER * INNER}
    values = [e["data"]["value"] for e in progress]
    assert values == sorted(values) and values[-1] == OUTER * INNER

    # History: the saved result and the labelled anytime images.
    entry = client.history(prompt_id)
    assert entry["status"]["completed"] is True and entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    saved = outputs[SAVE]["images"]
    assert len(saved) == BATCH
    shown = outputs[PREVIEW]
    assert len(shown["images"]) == OUTER * BATCH
    labels = shown["nested_labels"]
    assert len(labels) == OUTER * BATCH
    assert labels[0].startswith(f"outer 1/{OUTER}") and labels[-1].startswith(f"outer {OUTER}/{OUTER}")
    assert f"{OUTER * INNER} NFE" in labels[-1]
    assert shown["nested_previews"] == [{"outer_step": k, "outer_steps": OUTER, "batch_index": i, "nfe": k * INNER}
                                        for k in range(1, OUTER + 1) for i in range(BATCH)]

    finals = []
    for item in saved:
        image = decode(client.fetch_output(item))
        assert image.format == "PNG" and image.size == (SIZE, SIZE)
        finals.append(image.convert("RGB"))
    labelled = decode(client.fetch_output(shown["images"][0]))
    assert labelled.format == "PNG" and labelled.width >= SIZE
    # ComfyUI 0.38 adds its own keys to each entry ("metadata"; "id", "preview_id" with assets): same file
    assert client.fetch_output({**saved[0], "metadata": {"width": SIZE}, "id": "a1", "preview_id": "a2"}) == \
        client.fetch_output(saved[0])

    # The last preview is the last inner result, i.e. the returned sample (batch item 0). The preview is
    # upscaled (bilinear) and JPEG-encoded: sample it at the source pixel centres. Measured: 1-2 against
    # item 0, ~85 against item 1.
    last = decode(previews[-1]["data"]["image"]).convert("RGB")
    assert last.width % SIZE == 0 and last.width == last.height
    last = last.resize((SIZE, SIZE), Image.NEAREST)
    assert mean_abs_difference(last, finals[0]) < 8, "the final preview does not show the returned sample"


def test_other_clients_get_no_events_of_this_prompt(comfy_server, client, exemplar_defaults):
    observer = ComfyAPIClient(comfy_server.url, client_id=f"observer-{uuid.uuid4().hex}").connect()
    seen: list[dict] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            seen.extend(observer.events(timeout=0.5))

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    try:
        prompt_id = client.queue_prompt(nested_prompt(seed=11, prefix="nested_private", exemplar_defaults=exemplar_defaults))
        events = list(client.stream(prompt_id, timeout=120))
        check_outer_step_events(events, prompt_id)
    finally:
        stop.set()
        thread.join(timeout=10)
        observer.close()
    assert not thread.is_alive()
    # The observer was listening: it got the queue-status broadcasts of this prompt...
    assert any(e["type"] == "status" and e["data"]["status"]["exec_info"]["queue_remaining"] >= 1 for e in seen)
    # ... but none of the events ComfyUI (and the pack) address to the prompt's own client.
    assert of_type(seen, OUTER_STEP_EVENT) == []
    assert of_type(seen, "preview_image") == []
    assert of_type(seen, "progress") == []


def test_bad_inputs_give_clear_errors_and_the_server_recovers(comfy_server, client, exemplar_defaults):
    with pytest.raises(PromptValidationError) as rejected:
        client.queue_prompt(nested_prompt(seed=21, outer_steps=0, exemplar_defaults=exemplar_defaults))
    error = rejected.value
    assert error.status_code == 400
    assert SAMPLER in error.node_errors
    assert any((item.get("extra_info") or {}).get("input_name") == "outer_steps"
               for item in error.node_errors[SAMPLER]["errors"])
    assert "outer_steps" in str(error)

    prompt_id = client.queue_prompt(nested_prompt(seed=22, step_schedule="1,x", exemplar_defaults=exemplar_defaults))
    with pytest.raises(ExecutionError) as failed:
        list(client.stream(prompt_id, timeout=120))
    assert failed.value.node_type == "InnerSolverSelect"
    assert "step_schedule" in failed.value.exception_message
    assert client.history(prompt_id)["status"]["status_str"] == "error"

    # A good prompt right after, on a client that takes plain (type 1) preview frames.
    with ComfyAPIClient(comfy_server.url, preview_metadata=False) as legacy:
        prompt_id = legacy.queue_prompt(nested_prompt(seed=23, prefix="nested_after_error",
                                                  exemplar_defaults=exemplar_defaults))
        events = list(legacy.stream(prompt_id, timeout=120))
    check_outer_step_events(events, prompt_id)
    previews = of_type(events, "preview_image", SAMPLER)
    assert len(previews) >= OUTER
    assert {p["data"]["binary_type"] for p in previews} == {1}
    assert all(decode(p["data"]["image"]).format in ("JPEG", "PNG") for p in previews)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    assert len(entry["outputs"][SAVE]["images"]) == BATCH


def test_interrupt_stops_a_nested_run_between_outer_steps(client, exemplar_defaults):
    outer = 200  # long enough to still be running when the interrupt arrives
    prompt_id = client.queue_prompt(nested_prompt(seed=31, outer_steps=outer, prefix="nested_cut",
                                              exemplar_defaults=exemplar_defaults))
    events = []
    with pytest.raises(ExecutionInterrupted):
        for event in client.stream(prompt_id, timeout=120):
            events.append(event)
            if event["type"] == OUTER_STEP_EVENT and event["data"]["outer_step"] == 1:
                client.interrupt(prompt_id)
    steps = of_type(events, OUTER_STEP_EVENT, SAMPLER)
    assert 1 <= len(steps) < outer
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert SAVE not in entry.get("outputs", {})
