"""The pack in ComfyUI's own graph editor, driven by a real browser (Playwright + Debian's chromium).

Needs the Python package ``playwright`` (requirements-test.txt) and ``/usr/bin/chromium`` (scripts/setup_env.sh
installs Debian's ``chromium`` when it runs as root); never ``playwright install``: its browser downloads are
not reachable here. Without either, the tests are skipped with the reason.

Against the shared test server (tests/conftest.py), the page: dismisses the Templates dialog a fresh user
gets, checks that the pack's nodes are registered, opens the pack's examples from the Templates dialog, checks
that the frontend turns every editor-format example into exactly its API-format twin, and runs the demo
workflow: the Nested KSampler's preview must update during the run (a preview per outer step, before that
step's ``nested_diffusion.outer_step`` event) and Outer Step Preview must show one image per outer step and
batch item. A screenshot of the finished run goes to test-artifacts/browser_demo.png.
"""
from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (requirements-test.txt)")
requests = pytest.importorskip("requests")

from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT  # noqa: E402
from comfyui_nested_diffusion.tools import workflow_checks as wc  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_server import PACK_DIR_NAME  # noqa: E402

CHROMIUM = os.environ.get("NESTED_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = wc.REPO_ROOT / "test-artifacts"
SCREENSHOT = ARTIFACTS / "browser_demo.png"
DEMO = wc.EXAMPLES_DIR / "nested_vs_vanilla_exemplar.json"
SAMPLER, VANILLA, SAVE_NESTED, SAVE_VANILLA, PREVIEW = "3", "4", "7", "9", "10"
PACK_NODES = ("NestedKSampler", "NestedSampler", "InnerSolverSelect", "OuterStepPreview", "NestedExemplarModel")

if not Path(CHROMIUM).exists():
    pytest.skip(f"no chromium at {CHROMIUM}: run scripts/setup_env.sh as root (apt-get install -y chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


def open_editor(browser, url: str, width: int, height: int):
    """A new browser context on the graph editor, once the app and its node types are loaded; page errors are
    collected in ``page.page_errors``."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url, wait_until="load", timeout=60_000)
    page.wait_for_function(
        "() => window.app && window.app.graph && window.app.api && window.LiteGraph"
        " && Object.keys(LiteGraph.registered_node_types).length > 100", timeout=60_000)
    page.page_errors = errors
    return context, page


@pytest.fixture(scope="module")
def page(browser, comfy_server):
    # Wide enough that the demo fits at a zoom where LiteGraph still draws text (below ~0.6 it draws boxes).
    context, page = open_editor(browser, comfy_server.url, width=2400, height=1150)
    yield page
    context.close()


def templates_dialog(page):
    return page.locator("[role=dialog]").filter(has_text="Templates")


def dismiss_templates_dialog(page) -> bool:
    """A fresh user folder opens the Templates dialog on first load: close it (Escape, else its close button).
    Returns whether it was open."""
    if getattr(page, "templates_checked", False) and not templates_dialog(page).first.is_visible():
        return False
    page.templates_checked = True
    dialog = templates_dialog(page)
    try:
        dialog.first.wait_for(state="visible", timeout=5_000)
    except sync_api.TimeoutError:
        return False
    page.keyboard.press("Escape")
    try:
        dialog.first.wait_for(state="hidden", timeout=3_000)
    except sync_api.TimeoutError:
        dialog.first.locator("button").filter(has=page.locator(".pi-times, .icon-\\[lucide--x\\]")).first.click()
        dialog.first.wait_for(state="hidden", timeout=3_000)
    return True


def load_graph(page, workflow: dict, name: str) -> None:
    page.evaluate("""async ([workflow, name]) => {
        await app.loadGraphData(workflow, true, true, name,
                                {showMissingNodesDialog: false, showMissingModelsDialog: false});
    }""", [workflow, name])


def test_pack_nodes_are_registered_in_litegraph(page, comfy_server):
    print(f"templates dialog on first load: {dismiss_templates_dialog(page)}")
    info = requests.get(f"{comfy_server.url}/object_info", timeout=30).json()
    ours = sorted(name for name, node in info.items() if PACK_DIR_NAME in str(node.get("python_module", "")))
    assert set(PACK_NODES) <= set(ours)
    registered = page.evaluate("(names) => names.filter(n => n in LiteGraph.registered_node_types)", ours)
    assert registered == ours
    categories = page.evaluate("(names) => names.map(n => LiteGraph.registered_node_types[n].category)", ours)
    assert all(category.startswith("sampling/nested") for category in categories), categories


def test_the_editor_runs_the_frontend_under_test(page):
    """The browser tests ran on the frontend they claim: NESTED_FRONTEND's (e.g. 1.58.1, the newest on the
    registry, served with --front-end-root) or else the frontend package the engine installed (0.3.75: 1.32.9,
    0.33.0: 1.49.6)."""
    from importlib.metadata import version

    expected = os.environ.get("NESTED_FRONTEND") or version("comfyui-frontend-package")
    served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    print(f"frontend {served}")
    assert served == expected


def test_finish_now_notices_use_the_frontends_current_toast_api(page):
    """The extension adds its button from its own nodeCreated hook, and its notices use toast.info /
    success / warning where the frontend has them (toast.add is deprecated there), toast.add on older ones. Finish
    now on a node that is not sampling says so in a toast."""
    result = page.evaluate("""async () => {
        const toast = app.extensionManager?.toast;
        const calls = [];
        const spied = ["add", "info", "success", "warning"].filter((name) => typeof toast?.[name] === "function");
        const originals = Object.fromEntries(spied.map((name) => [name, toast[name]]));
        for (const name of spied) toast[name] = function (...args) { calls.push(name); return originals[name].apply(this, args); };
        const node = LiteGraph.createNode("NestedKSampler");
        app.graph.add(node);
        const buttons = node.widgets.filter((widget) => widget.name === "Finish now");
        buttons[0].callback();
        for (let i = 0; i < 100 && calls.length === 0; i++) await new Promise((done) => setTimeout(done, 50));
        for (const name of spied) toast[name] = originals[name];
        app.graph.remove(node);
        return { buttons: buttons.length, calls, hasInfo: typeof toast?.info === "function" };
    }""")
    print(f"toast API: {result}")
    assert result["buttons"] == 1
    assert result["calls"] == (["info"] if result["hasInfo"] else ["add"])
    page.get_by_text("Nothing to finish").first.wait_for(timeout=10_000)  # the notice is shown


def test_templates_dialog_offers_the_examples_with_thumbnails(page):
    dismiss_templates_dialog(page)
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = templates_dialog(page).first
    dialog.wait_for(state="visible", timeout=10_000)
    dialog.get_by_text(PACK_DIR_NAME, exact=True).first.click()
    card = dialog.get_by_text("nested_vs_vanilla_exemplar", exact=True).first
    card.wait_for(state="visible", timeout=10_000)
    # The thumbnails of the visible cards load (the frontend fetches <name>.jpg beside <name>.json).
    page.wait_for_function("""() => {
        const images = [...document.querySelectorAll('[role=dialog] img')];
        return images.length >= 3 && images.slice(0, 3).every(i => i.complete && i.naturalWidth > 0);
    }""", timeout=15_000)
    card.click()  # load it, as a user would
    page.wait_for_function("() => app.graph.nodes.some(n => n.type === 'NestedKSampler')", timeout=15_000)
    types = page.evaluate("() => app.graph.nodes.map(n => n.type).sort()")
    expected = sorted(node["type"] for node in wc.load(DEMO)["nodes"])
    assert types == expected
    dialog.wait_for(state="hidden", timeout=5_000)


@pytest.fixture(scope="module")
def frontend_prompts(page, comfy_server) -> dict:
    """name -> (the prompt app.graphToPrompt makes of the editor example, its API twin, /object_info)."""
    dismiss_templates_dialog(page)
    info = requests.get(f"{comfy_server.url}/object_info", timeout=30).json()
    prompts = {}
    for name, editor, api in wc.example_pairs():
        load_graph(page, wc.load(editor), name)
        prompts[name] = page.evaluate("async () => (await app.graphToPrompt()).output"), wc.load(api)
    return prompts, info


def ui_only_inputs(prompt: dict, info: dict) -> list[str]:
    """Inputs of a prompt that are no input of their node (e.g. a button widget the frontend sent along)."""
    return [f"node {node_id} ({node['class_type']}) input {name!r} = {value!r}"
            for node_id, node in prompt.items() for name, value in node["inputs"].items()
            if name not in {spec[0] for spec in wc.input_specs(info[node["class_type"]])}]


def test_the_frontend_turns_every_editor_example_into_its_api_twin(frontend_prompts):
    """app.graphToPrompt (what the Run button sends) of each editor-format example equals its *_api.json
    (inputs that are no input of their node are left to the test below)."""
    prompts, info = frontend_prompts
    assert len(prompts) >= 8
    problems = {}
    for name, (prompt, api) in prompts.items():
        leaks = set(ui_only_inputs(prompt, info))
        cleaned = {node_id: {**node, "inputs": {k: v for k, v in node["inputs"].items()
                                                if f"node {node_id} ({node['class_type']}) input {k!r} = {v!r}" not in leaks}}
                   for node_id, node in prompt.items()}
        difference = wc.api_differences(api, cleaned, info)
        if difference:
            problems[name] = difference
    assert problems == {}


def test_ui_only_widgets_stay_out_of_the_prompt(frontend_prompts):
    prompts, info = frontend_prompts
    leaks = {name: ui_only_inputs(prompt, info) for name, (prompt, _) in prompts.items()}
    assert {name: found for name, found in leaks.items() if found} == {}


def test_demo_workflow_runs_in_the_editor_with_live_previews(page):
    dismiss_templates_dialog(page)
    demo = wc.load(DEMO)
    load_graph(page, demo, "nested_vs_vanilla_exemplar")
    seed = random.randrange(1, 2**31)  # a seed no earlier prompt used: the server must really sample
    page.evaluate("""([seed, ids]) => {
        for (const id of ids) {
            const widget = app.graph.getNodeById(Number(id)).widgets.find(w => w.name === 'seed');
            widget.value = seed;
        }
    }""", [seed, [SAMPLER, VANILLA]])
    nodes = {str(n["id"]): n for n in demo["nodes"]}
    outer = nodes[SAMPLER]["widgets_values"][2]
    batch = nodes["2"]["widgets_values"][2]

    # Listen before queueing: previews (with the node that sent them), outer-step events, and what the node
    # shows as its preview image right after each preview arrived.
    page.evaluate("""([samplerId, outerStepEvent]) => {
        const log = window.__nested = {events: [], shown: [], done: null, error: null};
        const stamp = () => log.events.length;
        const api = app.api;
        api.addEventListener('b_preview_with_metadata', (e) => {
            const node = String(e.detail.displayNodeId ?? e.detail.nodeId);
            log.events.push({type: 'preview', node, size: e.detail.blob.size});
            if (node === samplerId) {
                // The frontend's own listener (registered at startup) has just stored this preview as the
                // node's preview image: record what the node now shows.
                const shown = (app.nodePreviewImages ?? {})[samplerId];
                log.shown.push(shown ? shown.join(' ') : null);
            }
        });
        api.addEventListener(outerStepEvent, (e) => log.events.push({type: 'outer_step', ...e.detail}));
        api.addEventListener('executing', (e) => log.events.push({type: 'executing', node: e.detail}));
        api.addEventListener('executed', (e) => log.events.push({type: 'executed', node: String(e.detail.node),
                                                               images: (e.detail.output?.images ?? []).length}));
        api.addEventListener('execution_success', (e) => { log.done = stamp(); });
        api.addEventListener('execution_error', (e) => { log.error = e.detail; });
    }""", [SAMPLER, OUTER_STEP_EVENT])
    started = time.monotonic()
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__nested.done !== null || window.__nested.error !== null", timeout=90_000)
    log = page.evaluate("() => window.__nested")
    assert log["error"] is None, log["error"]
    run_seconds = time.monotonic() - started

    events = log["events"]
    steps = [e for e in events if e["type"] == "outer_step" and str(e.get("node")) == SAMPLER]
    assert [e["outer_step"] for e in steps] == list(range(1, outer + 1)), steps
    # The node's preview updates during the run: before every outer-step event, a preview from the sampler.
    previous = 0
    for step in steps:
        index = events.index(step)
        previews = [e for e in events[previous:index] if e["type"] == "preview" and e["node"] == SAMPLER]
        assert previews and all(p["size"] > 0 for p in previews), f"no preview before outer step {step['outer_step']}"
        previous = index
    # ... and the node really shows them: its preview image changed with the previews.
    shown = [s for s in log["shown"] if s]
    assert len(shown) == len(log["shown"]) and len(set(shown)) == len(shown) >= outer, log["shown"]

    # After the run: Outer Step Preview shows one image per outer step and batch item; the saves their batch.
    outputs = page.evaluate("(ids) => ids.map(id => (app.nodeOutputs[id]?.images ?? []).length)",
                            [PREVIEW, SAVE_NESTED, SAVE_VANILLA])
    assert outputs == [outer * batch, batch, batch]
    executed = {e["node"]: e["images"] for e in events if e["type"] == "executed"}
    assert executed.get(PREVIEW) == outer * batch
    page.wait_for_function("""([id, count]) => {
        const node = app.graph.getNodeById(Number(id));
        return node.imgs?.length === count && node.imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", arg=[PREVIEW, outer * batch], timeout=15_000)

    page.evaluate("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.exists() and SCREENSHOT.stat().st_size > 10_000
    assert run_seconds < 90
    assert page.page_errors == [], page.page_errors
    print(json.dumps({"seed": seed, "run_seconds": round(run_seconds, 1), "previews_shown": len(set(shown))}))
