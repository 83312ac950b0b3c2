"""Steering a nested run from ComfyUI's graph editor, in a real browser (Playwright + Debian's chromium).

The same conventions as tests/browser/test_browser.py (whose browser fixture and helpers this module imports): the
shared test server (tests/conftest.py), Debian's ``/usr/bin/chromium``, the Templates dialog a fresh user gets
dismissed first. Three ways to steer a run, each run for real on the exact exemplar model:

* **Finish now**: a Nested KSampler with 300 outer steps is queued; after its first
  ``nested_diffusion.outer_step`` event the test clicks the node's "Finish now" button on the canvas (a real
  mouse click at the widget's position). The run must end early with success, and the graph must go on:
  Save Image shows the batch, and fewer outer-step events than outer steps arrived.
* **Pick a candidate** (paper Figure 7, ``example_workflows/exemplar_pick_candidate_nested.json``): Pick
  Candidate shows the 4 candidates of outer step 1, every final image is a variation of the picked one, and
  picking another candidate and queueing again re-runs only the pick and stage 2 (ComfyUI's cache).
* **Add detail to the prompt** (paper Figure 8, ``example_workflows/exemplar_prompt_refine_nested.json``):
  stage 1 samples the broad prompt, every final image is what the stage 2 prompt names.

Screenshots go to test-artifacts/{finish_now,pick_candidate,prompt_refine}.png; with NESTED_UPDATE_DOCS=1 they
also replace the pictures in docs/steering/ (shown in docs/steering.md).
"""
from __future__ import annotations

import io
import json
import os
import shutil
import time
from typing import Optional

import pytest
from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT, RUNNING_ROUTE
from comfyui_nested_diffusion.tools import workflow_checks as wc
from test_browser import (  # noqa: F401  (browser is a fixture)
    ARTIFACTS,
    browser,
    dismiss_templates_dialog,
    load_graph,
    open_editor,
    sync_api,
)

requests = pytest.importorskip("requests")
Image = pytest.importorskip("PIL.Image")

DOCS = wc.REPO_ROOT / "docs" / "steering"
DEMO = wc.EXAMPLES_DIR / "nested_vs_vanilla_exemplar.json"
PICK = wc.EXAMPLES_DIR / "exemplar_pick_candidate_nested.json"
REFINE = wc.EXAMPLES_DIR / "exemplar_prompt_refine_nested.json"
# A seed no other test queues these workflows with (so the server really samples), whose 4 candidates are
# 4 different exemplars.
SEED = 7


# The parts of the window the editor's own panels cover (CSS pixels): the tab bar, workflow name and Run
# button on top, the side toolbar on the left. frame() keeps the nodes out from under them.
INSETS = {"left": 70, "top": 150, "right": 20, "bottom": 20}


@pytest.fixture(scope="module")
def page(browser, comfy_server):  # noqa: F811
    # 1600 x 1200: the screenshots stay legible in a README; the framed nodes are drawn at a zoom >= 0.6,
    # where LiteGraph still draws text.
    context, page = open_editor(browser, comfy_server.url, width=1600, height=1200)
    dismiss_templates_dialog(page)
    tidy_for_screenshots(page)
    yield page
    context.close()


# -- helpers ----------------------------------------------------------------------------------------------------
def tidy_for_screenshots(page) -> None:
    """No minimap, canvas info or canvas menu over the nodes, and no announcement banner."""
    page.evaluate("""async () => {
        const settings = app.extensionManager?.setting;
        for (const [key, value] of [['Comfy.Minimap.Visible', false], ['Comfy.Graph.CanvasInfo', false],
                                    ['Comfy.Graph.CanvasMenu', false]]) {
            try { await settings?.set(key, value); } catch (error) { console.warn(key, error); }
        }
        const text = [...document.querySelectorAll('span, div')].find(
            e => e.childElementCount === 0 && e.textContent.includes('Introducing Nodes 2.0'));
        let banner = text;
        while (banner && banner.querySelectorAll('button').length < 2) banner = banner.parentElement;
        const buttons = banner ? [...banner.querySelectorAll('button')] : [];
        buttons[buttons.length - 1]?.click();  // its close button (the other one opens the announcement)
        app.canvas.show_info = false;
    }""")
    page.wait_for_timeout(300)


def ids_by_title(workflow: dict) -> dict:
    return {node.get("title"): node["id"] for node in workflow["nodes"] if node.get("title")}


def without_nodes(workflow: dict, drop: set) -> dict:
    """The workflow without the nodes ``drop`` (and their links and the groups)."""
    workflow = json.loads(json.dumps(workflow))
    gone = {link[0] for link in workflow["links"] if link[1] in drop or link[3] in drop}
    workflow["nodes"] = [node for node in workflow["nodes"] if node["id"] not in drop]
    workflow["links"] = [link for link in workflow["links"] if link[0] not in gone]
    for node in workflow["nodes"]:
        for output in node.get("outputs") or []:
            if output.get("links"):
                output["links"] = [link for link in output["links"] if link not in gone] or None
    workflow["groups"] = []
    return workflow


def set_widgets(page, node_id: int, values: dict) -> None:
    page.evaluate("""([id, values]) => {
        const node = app.graph.getNodeById(id);
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find(w => w.name === name);
            if (!widget) throw new Error(`node ${id} has no widget ${name}`);
            widget.value = value;
        }
    }""", [node_id, values])


def start_log(page) -> None:
    """Record what the server sends while a prompt runs (install before queueing)."""
    page.evaluate("""(outerStepEvent) => {
        const log = window.__steer = {events: [], done: false, error: null};
        if (window.__steerListening) return;
        window.__steerListening = true;
        const api = app.api;
        const push = (entry) => window.__steer.events.push({...entry, t: performance.now()});
        api.addEventListener(outerStepEvent, (e) => push({type: 'outer_step', ...e.detail}));
        api.addEventListener('executing', (e) => push({type: 'executing', node: e.detail == null ? null : String(e.detail)}));
        api.addEventListener('execution_cached', (e) => push({type: 'cached', nodes: (e.detail.nodes ?? []).map(String)}));
        api.addEventListener('executed', (e) => push({type: 'executed', node: String(e.detail.node),
                                                      images: (e.detail.output?.images ?? []).length}));
        api.addEventListener('execution_success', () => { window.__steer.done = true; });
        api.addEventListener('execution_error', (e) => { window.__steer.error = e.detail; });
    }""", OUTER_STEP_EVENT)
    page.evaluate("() => { window.__steer.events = []; window.__steer.done = false; window.__steer.error = null; }")


def queue_and_wait(page, timeout_ms: int = 60_000) -> list:
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__steer.done || window.__steer.error !== null", timeout=timeout_ms)
    log = page.evaluate("() => window.__steer")
    assert log["error"] is None, log["error"]
    return log["events"]


def wait_for_images(page, node_id: int, count: int) -> None:
    """The node shows ``count`` images, all loaded."""
    page.wait_for_function("""([id, count]) => {
        const node = app.graph.getNodeById(id);
        return (app.nodeOutputs[String(id)]?.images ?? []).length === count && node.imgs?.length === count
            && node.imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", arg=[node_id, count], timeout=15_000)


def output_images(page, server, node_id: int) -> list:
    """The images a node's output lists (app.nodeOutputs), fetched from the server as PIL RGB images."""
    items = page.evaluate("(id) => app.nodeOutputs[String(id)]?.images ?? []", node_id)
    images = []
    for item in items:
        answer = requests.get(f"{server.url}/view", params={"filename": item["filename"], "subfolder": item["subfolder"],
                                                            "type": item["type"]}, timeout=30)
        answer.raise_for_status()
        images.append(Image.open(io.BytesIO(answer.content)).convert("RGB"))
    return images


def unlabelled(image):
    """A labelled preview tile (Outer Step Preview, Pick Candidate) back at 32x32: the square above the label,
    enlarged 8x with nearest, sampled at the block centres."""
    return image.crop((0, 0, image.width, image.width)).resize((32, 32), Image.NEAREST)


def mean_abs(a, b) -> float:
    return sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())) / len(a.tobytes())


def frame(page, node_ids: list, pad: int = 20, max_scale: float = 1.0, avoid: Optional[dict] = None) -> dict:
    """Zoom and pan the canvas so that the nodes ``node_ids`` fill the part of it no panel covers (LiteGraph:
    screen = (canvas position + ds.offset) * ds.scale); returns where they are on the page. With ``avoid`` (a
    bounding box on the page, e.g. a toast's), they go right below it when it sits in the upper half of the window
    (older frontends show toasts top right) and right above it otherwise (1.5x shows them bottom right)."""
    insets, align = dict(INSETS), "centre"
    if avoid is not None:
        if avoid["y"] + avoid["height"] / 2 < page.viewport_size["height"] / 2:
            insets["top"], align = max(INSETS["top"], avoid["y"] + avoid["height"] + 10), "top"
        else:
            insets["bottom"], align = max(INSETS["bottom"], page.viewport_size["height"] - avoid["y"] + 10), "bottom"
    framed = page.evaluate("""([ids, pad, maxScale, insets, align]) => {
        const nodes = ids.map(id => app.graph.getNodeById(id));
        const title = LiteGraph.NODE_TITLE_HEIGHT;
        const x0 = Math.min(...nodes.map(n => n.pos[0])) - pad;
        const y0 = Math.min(...nodes.map(n => n.pos[1] - title)) - pad;
        const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + pad;
        const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + pad;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const width = rect.width - insets.left - insets.right, height = rect.height - insets.top - insets.bottom;
        const scale = Math.min(width / (x1 - x0), height / (y1 - y0), maxScale);
        app.canvas.ds.scale = scale;
        const w = (x1 - x0) * scale, h = (y1 - y0) * scale;
        const left = insets.left + (width - w) / 2, topY = insets.top + ({top: 0, bottom: height - h}[align] ?? (height - h) / 2);
        app.canvas.ds.offset = [left / scale - x0, topY / scale - y0];
        app.canvas.setDirty(true, true);
        return {scale, x: left, y: topY, width: w, height: h};
    }""", [node_ids, pad, max_scale, insets, align])
    page.wait_for_timeout(300)
    assert framed["scale"] >= 0.6, f"zoom {framed['scale']:.2f}: LiteGraph draws no text below 0.6"
    return framed


def close_toasts(page) -> None:
    for button in page.locator(".p-toast-close-button").all():
        try:
            button.click(timeout=2_000)
        except sync_api.Error:
            pass  # it went away by itself
    page.wait_for_timeout(200)


def screenshot(page, name: str, framed: dict, also=None) -> None:
    """The framed nodes (and the element ``also``, e.g. a toast, if it is visible), to test-artifacts/ (and
    docs/steering/ with NESTED_UPDATE_DOCS=1)."""
    ARTIFACTS.mkdir(exist_ok=True)
    x0, y0 = framed["x"], framed["y"]
    x1, y1 = x0 + framed["width"], y0 + framed["height"]
    box = also.bounding_box() if also is not None and also.is_visible() else None
    if box:
        x0, y0 = min(x0, box["x"] - 10), min(y0, box["y"] - 10)
        x1, y1 = max(x1, box["x"] + box["width"] + 10), max(y1, box["y"] + box["height"] + 10)
    viewport = page.viewport_size
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(viewport["width"], x1), min(viewport["height"], y1)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), clip={"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0})
    assert path.stat().st_size > 10_000
    if os.environ.get("NESTED_UPDATE_DOCS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOCS / f"{name}.png")


def widget_center(page, node_id: int, widget_name: str) -> tuple:
    """Where a widget of a node is on the page (CSS pixels), from the node's position and the widget's y as
    LiteGraph last drew it."""
    return tuple(page.evaluate("""([id, name]) => {
        const node = app.graph.getNodeById(id);
        const widget = node.widgets.find(w => w.name === name);
        const y = widget.last_y ?? widget.y;
        const height = widget.computedHeight ?? widget.computeSize?.(node.size[0])[1] ?? LiteGraph.NODE_WIDGET_HEIGHT;
        const [x, yy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2, node.pos[1] + y + height / 2]);
        const rect = app.canvas.canvas.getBoundingClientRect();
        return [rect.left + x, rect.top + yy];
    }""", [node_id, widget_name]))


# -- the tests --------------------------------------------------------------------------------------------------
def test_finish_now_button_ends_the_run_early_and_the_graph_goes_on(page, comfy_server):
    """Click "Finish now" on the Nested KSampler's node after its first outer step: the run keeps that image."""
    demo = wc.load(DEMO)
    ids = ids_by_title(demo)
    sampler, save, preview = (ids["Nested KSampler (anytime)"], ids["Save nested"], ids["Outer Step Preview (nested)"])
    latent = ids["Empty pixel latent"]
    # The demo without its vanilla half (and without its note, which compares the two).
    vanilla = {ids["Vanilla KSampler (same NFEs)"], ids["Decode vanilla"], ids["Save vanilla"], ids["Note"]}
    load_graph(page, without_nodes(demo, vanilla), "finish_now")
    outer = 300
    set_widgets(page, sampler, {"seed": 20_251_125, "outer_steps": outer})
    batch = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'batch_size').value", latent)
    frame(page, [ids["Exemplar Mixture Model (testing)"], sampler, save, preview])  # the button must be on screen

    start_log(page)
    started = time.monotonic()
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("""(id) => window.__steer.error !== null
        || window.__steer.events.some(e => e.type === 'outer_step' && String(e.node) === String(id))""",
                           arg=sampler, timeout=60_000)
    x, y = widget_center(page, sampler, "Finish now")
    page.mouse.click(x, y)  # a real click on the button, as a user would
    clicked = time.monotonic() - started
    # The button's callback asked the server, and the extension says so.
    # by its text: frontends render toasts with different components (PrimeVue's .p-toast-message up to 1.4x)
    toast = page.get_by_text("Finishing now").first
    toast.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => window.__steer.done || window.__steer.error !== null", timeout=60_000)
    log = page.evaluate("() => window.__steer")
    assert log["error"] is None, log["error"]
    run_seconds = time.monotonic() - started

    steps = [e for e in log["events"] if e["type"] == "outer_step" and str(e["node"]) == str(sampler)]
    assert 1 <= len(steps) < outer, f"{len(steps)} outer steps of {outer}: Finish now did not end the run"
    assert [e["outer_step"] for e in steps] == list(range(1, len(steps) + 1))
    executed = {e["node"]: e["images"] for e in log["events"] if e["type"] == "executed"}
    assert executed.get(str(save)) == batch and executed.get(str(preview)) == len(steps) * batch
    wait_for_images(page, save, batch)
    saved = output_images(page, comfy_server, save)
    assert len(saved) == batch and {image.size for image in saved} == {(32, 32)}
    # The kept image is the last inner result: the last outer step Outer Step Preview shows, batch item 1.
    shown = output_images(page, comfy_server, preview)
    assert mean_abs(unlabelled(shown[-batch]), saved[0]) < 1.0
    wait_for_images(page, preview, len(steps) * batch)
    assert requests.get(f"{comfy_server.url}{RUNNING_ROUTE}", timeout=10).json()["running"] == []

    # The nodes right next to (below or above) the toast that says the button was heard, both in the picture.
    box = toast.bounding_box() if toast.is_visible() else None
    framed = frame(page, [ids["Exemplar Mixture Model (testing)"], sampler, save, preview], avoid=box)
    screenshot(page, "finish_now", framed, also=toast)
    close_toasts(page)
    assert page.page_errors == [], page.page_errors
    print(json.dumps({"outer_steps_run": len(steps), "of": outer, "clicked_after_s": round(clicked, 2),
                      "run_seconds": round(run_seconds, 1)}))


def test_pick_candidate_example_shows_the_candidates_and_varies_the_pick(page, comfy_server):
    """Paper Figure 7: the candidates of outer step 1 in Pick Candidate, the pick's variations saved; a new pick
    re-runs only the pick and stage 2."""
    workflow = wc.load(PICK)
    ids = ids_by_title(workflow)
    stage_1, stage_2 = ids["Stage 1: outer step 1 of 4"], ids["Stage 2: outer steps 2-4"]
    pick, save = ids["Pick Candidate: set index, re-queue"], ids["Variations of the pick"]
    candidates_node, stage_2_preview = ids["Stage 1 candidates"], ids["Stage 2 outer steps"]
    load_graph(page, workflow, "exemplar_pick_candidate_nested")
    set_widgets(page, stage_1, {"noise_seed": SEED})
    set_widgets(page, stage_2, {"noise_seed": SEED})
    index = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'index').value", pick)

    start_log(page)
    started = time.monotonic()
    events = queue_and_wait(page)
    first_run = time.monotonic() - started
    for node, count in ((pick, 4), (candidates_node, 4), (save, 4), (stage_2_preview, 3 * 4)):
        wait_for_images(page, node, count)
    candidates = [unlabelled(image) for image in output_images(page, comfy_server, candidates_node)]
    finals = output_images(page, comfy_server, save)
    picked = candidates[index]
    assert sum(mean_abs(other, picked) > 25 for other in candidates) >= 2, "the candidates should differ"
    # Every variation lies on the picked candidate's exemplar (~3 of 255 away; another exemplar: > 40).
    assert all(mean_abs(final, picked) < 12 for final in finals)
    steps = [e["outer_step"] for e in events if e["type"] == "outer_step"]
    assert steps == [1, 2, 3, 4]

    close_toasts(page)
    screenshot(page, "pick_candidate", frame(page, [stage_1, candidates_node, pick, stage_2, save, stage_2_preview]))

    # Pick another candidate and queue again: ComfyUI's cache keeps stage 1; only the pick and stage 2 run.
    other = next(i for i, image in enumerate(candidates) if mean_abs(image, picked) > 25)
    set_widgets(page, pick, {"index": other})
    start_log(page)
    events = queue_and_wait(page)
    ran = {e["node"] for e in events if e["type"] == "executing" and e["node"]}
    cached = {node for e in events if e["type"] == "cached" for node in e["nodes"]}
    assert str(stage_1) in cached and str(stage_1) not in ran
    assert {str(pick), str(stage_2)} <= ran
    wait_for_images(page, save, 4)
    refinished = output_images(page, comfy_server, save)
    assert all(mean_abs(final, candidates[other]) < 12 for final in refinished)
    assert page.page_errors == [], page.page_errors
    print(json.dumps({"pick": index, "repick": other, "first_run_s": round(first_run, 1)}))


def test_prompt_refine_example_follows_the_added_detail(page, comfy_server):
    """Paper Figure 8: outer step 1 samples the broad prompt, outer steps 2-4 the detailed one."""
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import EXEMPLAR_NAMES, default_exemplars

    exemplars = [Image.fromarray(((e.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8"))
                 for e in default_exemplars(32)]

    def nearest(image) -> str:
        return EXEMPLAR_NAMES[min(range(len(exemplars)), key=lambda k: mean_abs(image, exemplars[k]))]

    workflow = wc.load(REFINE)
    ids = ids_by_title(workflow)
    broad, narrow = ids["Stage 1 prompt (broad)"], ids["Stage 2 prompt (the added detail)"]
    stage_1, stage_2 = ids["Stage 1: outer step 1 of 4"], ids["Stage 2: outer steps 2-4"]
    first_preview, save = ids["Stage 1 (broad prompt)"], ids["Final images"]
    stage_2_preview = ids["Stage 2 outer steps (smiley)"]
    load_graph(page, workflow, "exemplar_prompt_refine_nested")
    set_widgets(page, stage_1, {"noise_seed": SEED})
    set_widgets(page, stage_2, {"noise_seed": SEED})
    texts = page.evaluate("(ids) => ids.map(id => app.graph.getNodeById(id).widgets.find(w => w.name === 'text').value)",
                          [broad, narrow])

    start_log(page)
    queue_and_wait(page)
    for node, count in ((first_preview, 4), (save, 4), (stage_2_preview, 3 * 4)):
        wait_for_images(page, node, count)
    first = [nearest(unlabelled(image)) for image in output_images(page, comfy_server, first_preview)]
    finals = [nearest(image) for image in output_images(page, comfy_server, save)]
    assert set(first) <= {part.strip() for part in texts[0].split(",")}, first
    assert len(set(first)) >= 2, f"the broad prompt should give several exemplars: {first}"
    assert finals == [texts[1]] * 4, finals

    close_toasts(page)
    screenshot(page, "prompt_refine", frame(page, [broad, narrow, first_preview, stage_1, stage_2, save,
                                                   stage_2_preview]))
    assert page.page_errors == [], page.page_errors
    print(json.dumps({"stage_1": first, "final": finals}))
