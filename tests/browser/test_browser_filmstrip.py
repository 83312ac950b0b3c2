"""The live filmstrip on the node and "keep only this", in a real browser (Playwright + Debian's chromium).

The same conventions as tests/browser/test_browser_steering.py (whose page fixture and helpers this module imports).

* ``test_filmstrip_shows_candidate_events_and_posts_the_pick`` drives the web extension alone: it dispatches
  ``nested_diffusion.candidates`` / ``.picked`` / ``.outer_step`` events through the app's API event target, as the
  websocket would, and checks what the node shows (one labelled image per candidate, at most 64, latest step
  first), the enlarged view, the body "keep only this" POSTs (the route answered in the page, so no run is
  needed), and the "Finish now" button a SamplerCustom gets once it runs a nested sampler.
* ``test_filmstrip_fills_during_a_run_and_keep_only_this_continues_one_item`` runs the demo for real on the exact
  exemplar model: K x B images arrive during a 4 x 4 run. Then a long run of the digits demo (the learned model,
  whose calls take as long as a small real model's): a real click on "keep only this" as soon as it is offered
  makes the run continue with that item only, and "Finish now" ends it.

Screenshots go to test-artifacts/{filmstrip_events,filmstrip,filmstrip_pick}.png; with NESTED_UPDATE_DOCS=1
filmstrip.png (the 4 x 4 run) also goes to docs/steering/.
"""
from __future__ import annotations

import base64
import io
import json

import pytest
from comfyui_nested_diffusion.protocol import CANDIDATES_EVENT, OUTER_STEP_EVENT, PICK_ROUTE, PICKED_EVENT
from comfyui_nested_diffusion.tools import workflow_checks as wc
from test_browser import ARTIFACTS, browser, load_graph, sync_api  # noqa: F401  (browser is a fixture)
from test_browser_steering import (  # noqa: F401  (page is a fixture)
    DEMO,
    close_toasts,
    frame,
    ids_by_title,
    page,
    screenshot,
    set_widgets,
    start_log,
    without_nodes,
)

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")

DIGITS_DEMO = wc.EXAMPLES_DIR / "nested_vs_vanilla_digits.json"
COLOURS = [(230, 60, 60), (60, 160, 230), (240, 200, 40), (80, 200, 90)]


def jpeg_data_url(colour, step: int) -> str:
    """A 32x32 test candidate: a colour, with a white bar whose width says the outer step."""
    image = Image.new("RGB", (32, 32), colour)
    ImageDraw.Draw(image).rectangle((2, 2, 2 + 6 * step, 8), fill=(255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def candidates(node, prompt_id, step, steps, batch=4, nfe_per_step=10, picked=None, indices=None) -> dict:
    indices = indices if indices is not None else list(range(batch))
    return {"node": str(node), "display_node": str(node), "prompt_id": prompt_id, "outer_step": step,
            "outer_steps": steps, "nfe": nfe_per_step * step, "nfe_total": nfe_per_step * steps,
            "batch_indices": indices, "images": [jpeg_data_url(COLOURS[i % 4], step) for i in indices],
            "picked": picked}


def dispatch(page, kind: str, detail: dict) -> None:  # noqa: F811
    """Hand the extension an event as the websocket would: through the app's API event target."""
    page.evaluate("""([kind, detail]) => {
        const api = app.api;
        if (typeof api.dispatchCustomEvent === 'function') api.dispatchCustomEvent(kind, detail);
        else api.dispatchEvent(new CustomEvent(kind, {detail}));
    }""", [kind, detail])


def strip(page, node_id):  # noqa: F811
    return page.locator(f'.nested-filmstrip[data-node="{node_id}"]')


def figures(page, node_id) -> list:  # noqa: F811
    """What the node's filmstrip shows, in its order: [(outer step, batch index, label, has keep button)]."""
    return page.evaluate("""(id) => [...document.querySelectorAll(`.nested-filmstrip[data-node="${id}"] figure`)]
        .map(f => [Number(f.dataset.outerStep), Number(f.dataset.batchIndex), f.dataset.label,
                   !!f.querySelector('button.nested-keep')])""", str(node_id))


def test_filmstrip_shows_candidate_events_and_posts_the_pick(page, comfy_server):  # noqa: F811
    demo = wc.load(DEMO)
    ids = ids_by_title(demo)
    sampler = ids["Nested KSampler (anytime)"]
    vanilla = {ids["Vanilla KSampler (same NFEs)"], ids["Decode vanilla"], ids["Save vanilla"], ids["Note"]}
    load_graph(page, without_nodes(demo, vanilla), "filmstrip_events")
    assert page.evaluate("(id) => app.graph.getNodeById(id).widgets.some(w => w.name === 'nested_filmstrip')",
                         sampler) is False  # no strip before a run

    dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-1", 1, 4))
    dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-1", 2, 4))
    strip(page, sampler).wait_for(state="visible", timeout=5_000)
    shown = figures(page, sampler)
    assert [(step, index) for step, index, _, _ in shown] == [(2, i) for i in range(4)] + [(1, i) for i in range(4)]
    assert shown[0][2] == "outer 2/4 · 20 NFE · #0" and shown[7][2] == "outer 1/4 · 10 NFE · #3"
    caption = strip(page, sampler).locator("figure figcaption").first.inner_text()
    assert caption.split() == ["outer", "2/4", "20", "NFE", "·", "#0"]  # on the node, in two lines
    assert [keep for *_, keep in shown] == [True] * 4 + [False] * 4  # only the latest step's candidates
    assert page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'nested_filmstrip')"
                         "?.serialize", sampler) is False
    framed = frame(page, [sampler])
    ARTIFACTS.mkdir(exist_ok=True)  # synthetic images: a test artifact only, never the docs' picture
    page.screenshot(path=str(ARTIFACTS / "filmstrip_events.png"),
                    clip={key: framed[key] for key in ("x", "y", "width", "height")})

    # a click enlarges a candidate; Escape closes it
    strip(page, sampler).locator('figure[data-outer-step="1"][data-position="3"] img').click()
    overlay = page.locator(".nested-filmstrip-overlay")
    overlay.wait_for(state="visible", timeout=5_000)
    assert "outer 1/4 · 10 NFE · #3" in overlay.inner_text()
    assert overlay.locator("img").bounding_box()["width"] >= 300
    page.keyboard.press("Escape")
    overlay.wait_for(state="detached", timeout=5_000)

    # "keep only this" POSTs the pick route with the tab's client id; the route is answered here in the page
    posted = []

    def answer(route):
        posted.append(json.loads(route.request.post_data))
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"picking": True, "index": posted[-1]["index"], "batch_size": 4}))

    page.route(f"**{PICK_ROUTE}", answer)
    try:
        strip(page, sampler).locator('figure[data-outer-step="2"][data-position="1"] button').click()
        page.get_by_text("Keeping only batch item 1").first.wait_for(state="visible", timeout=10_000)
    finally:
        page.unroute(f"**{PICK_ROUTE}")
    client_id = page.evaluate("() => app.api.clientId ?? app.api.initialClientId")
    assert posted == [{"prompt_id": "synthetic-1", "node": str(sampler), "index": 1, "client_id": client_id}]
    assert isinstance(client_id, str) and client_id
    # the run answers with the picked event, then candidates of the kept item only
    dispatch(page, PICKED_EVENT, {"node": str(sampler), "prompt_id": "synthetic-1", "index": 1, "batch_index": 1,
                                  "outer_step": 2})
    dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-1", 3, 4, picked=1, indices=[1]))
    assert "kept #1 after outer 2" in strip(page, sampler).locator(".nested-filmstrip-head").inner_text()
    shown = figures(page, sampler)
    assert [(step, index) for step, index, _, _ in shown][:2] == [(3, 1), (2, 0)]
    assert not any(keep for *_, keep in shown)
    outlined = page.evaluate("""(id) => [...document.querySelectorAll(`.nested-filmstrip[data-node="${id}"] figure`)]
        .map(f => [Number(f.dataset.batchIndex), f.classList.contains('nested-kept')])""", str(sampler))
    assert outlined == [[index, index == 1] for index, _ in outlined]  # the kept item, before and after the pick
    assert sum(kept for _, kept in outlined) == 3  # outer steps 1 and 2 and the new step 3

    # a candidate the server had no preview image for (preview method "none"): a placeholder, no broken image
    no_preview = candidates(sampler, "synthetic-1", 4, 4, picked=1, indices=[1])
    no_preview["images"] = [None]
    dispatch(page, CANDIDATES_EVENT, no_preview)
    latest = strip(page, sampler).locator("figure").first
    assert latest.locator(".nested-no-preview").inner_text() == "no preview" and latest.locator("img").count() == 0

    # a refused pick says why
    dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-2", 1, 4))
    page.route(f"**{PICK_ROUTE}", lambda route: route.fulfill(
        status=409, content_type="application/json", body=json.dumps({"error": "nothing to pick in: test refusal"})))
    try:
        strip(page, sampler).locator('figure[data-position="0"] button').click()
        page.get_by_text("nothing to pick in: test refusal").first.wait_for(state="visible", timeout=10_000)
    finally:
        page.unroute(f"**{PICK_ROUTE}")
    assert len(figures(page, sampler)) == 4  # a new prompt: the strip shows that run

    # bounded: the latest 64 images; each outer step costs the page only its own images (the strip is built
    # incrementally), and the live row's "keep only this" buttons are the same elements from step to step, so a
    # pointer click finds them where they were even when outer steps arrive every few milliseconds
    dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-3", 1, 20))
    page.evaluate("""(id) => {
        window.__keepButton = document.querySelector(
            `.nested-filmstrip[data-node="${id}"] figure[data-position="2"] button.nested-keep`);
        window.__figuresMade = 0;
        const make = Document.prototype.createElement;
        window.__restoreCreate = () => { document.createElement = make; };
        document.createElement = function (tag, ...rest) {
            if (String(tag).toLowerCase() === 'figure') window.__figuresMade += 1;
            return make.call(this, tag, ...rest);
        };
    }""", str(sampler))
    try:
        for step in range(2, 21):
            dispatch(page, CANDIDATES_EVENT, candidates(sampler, "synthetic-3", step, 20))
    finally:
        made = page.evaluate("() => { window.__restoreCreate(); return window.__figuresMade; }")
    assert made == 4 * 19, f"{made} figures made for 19 outer steps of 4 candidates"
    assert page.evaluate("""(id) => window.__keepButton === document.querySelector(
        `.nested-filmstrip[data-node="${id}"] figure[data-position="2"] button.nested-keep`)""", str(sampler))
    shown = figures(page, sampler)
    assert len(shown) == 64 and shown[0][0] == 20 and shown[-1][0] == 5

    # the run ends: no more keep buttons, the images stay
    dispatch(page, "execution_success", {"prompt_id": "synthetic-3"})
    assert len(figures(page, sampler)) == 64 and not any(keep for *_, keep in figures(page, sampler))

    # SamplerCustom running a NestedSampler reports its own node id: it gets "Finish now" and the filmstrip
    custom = page.evaluate("""() => {
        const node = LiteGraph.createNode('SamplerCustom');
        node.pos = [40, 900];
        app.graph.add(node);
        return node.id;
    }""")
    names = "(id) => app.graph.getNodeById(id).widgets.map(w => w.name)"
    assert "Finish now" not in page.evaluate(names, custom)
    dispatch(page, OUTER_STEP_EVENT, {"node": str(custom), "display_node": str(custom), "prompt_id": "synthetic-4",
                                      "outer_step": 1, "outer_steps": 4, "nfe": 10, "nfe_total": 40, "sigma": 1.0})
    dispatch(page, CANDIDATES_EVENT, candidates(custom, "synthetic-4", 1, 4, batch=2))
    assert {"Finish now", "nested_filmstrip"} <= set(page.evaluate(names, custom))
    assert len(figures(page, custom)) == 2
    fits = page.evaluate("(id) => { const n = app.graph.getNodeById(id); return n.computeSize()[1] <= n.size[1]; }",
                         custom)
    assert fits, "the node grew to hold the button and the strip"
    # the button asks the server (no run of this tab's: it says so)
    page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'Finish now').callback()", custom)
    page.get_by_text("Nothing to finish").first.wait_for(state="visible", timeout=10_000)
    close_toasts(page)
    assert page.page_errors == [], page.page_errors


def load_nested_half(page, path, model_title: str, name: str) -> tuple:  # noqa: F811
    """A nested-vs-vanilla demo without its vanilla half (and its note): (sampler, save, latent, model) node ids."""
    demo = wc.load(path)
    ids = ids_by_title(demo)
    vanilla = {ids["Vanilla KSampler (same NFEs)"], ids["Decode vanilla"], ids["Save vanilla"], ids["Note"]}
    load_graph(page, without_nodes(demo, vanilla), name)
    return ids["Nested KSampler (anytime)"], ids["Save nested"], ids["Empty pixel latent"], ids[model_title]


def test_filmstrip_fills_during_a_run_and_keep_only_this_continues_one_item(page, comfy_server):  # noqa: F811
    """A 4 x 4 run of batch 4 fills the strip with 16 labelled images; a long
    run of the digits demo, "keep only this" clicked on batch item 2 as soon as it is offered: the run continues only
    that item (picked event, one-image candidates), then Finish now ends it and Save shows the one kept image."""
    sampler, save, latent, model = load_nested_half(page, DEMO, "Exemplar Mixture Model (testing)", "filmstrip")
    set_widgets(page, latent, {"batch_size": 4})
    set_widgets(page, sampler, {"seed": 20_261_201, "outer_steps": 4, "inner_steps": 10})
    page.evaluate("""(kinds) => {
        window.__film = [];
        if (window.__filmListening) return;
        window.__filmListening = true;
        for (const kind of kinds)
            app.api.addEventListener(kind, (e) => window.__film.push({kind, ...e.detail, images: e.detail.images?.length}));
    }""", [CANDIDATES_EVENT, PICKED_EVENT])
    start_log(page)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__steer.done || window.__steer.error !== null", timeout=120_000)
    assert page.evaluate("() => window.__steer.error") is None
    events = page.evaluate("() => window.__film")
    assert [(e["outer_step"], e["images"]) for e in events] == [(k, 4) for k in range(1, 5)]
    shown = figures(page, sampler)
    assert len(shown) == 16
    assert [(step, index) for step, index, _, _ in shown] == [(k, i) for k in range(4, 0, -1) for i in range(4)]
    assert shown[0][2] == "outer 4/4 · 40 NFE · #0"
    assert not any(keep for *_, keep in shown)  # the run is over
    close_toasts(page)
    screenshot(page, "filmstrip", frame(page, [model, sampler, save]))

    # A long run on the learned digits model (a real UNet: its calls cost what a small model's do, so the run lasts
    # minutes, not the seconds the exact exemplar model needs): keep batch item 2 as soon as it is offered.
    sampler, save, latent, model = load_nested_half(page, DIGITS_DEMO, "Digits Model (nested demo)", "filmstrip_pick")
    outer = 1000
    set_widgets(page, latent, {"batch_size": 4})
    set_widgets(page, sampler, {"seed": 20_261_202, "outer_steps": outer})
    page.evaluate("() => { window.__film = []; }")
    start_log(page)
    page.evaluate("async () => { await app.queuePrompt(0, 1); }")
    keep = strip(page, sampler).locator('figure[data-position="2"] button.nested-keep')
    keep.first.wait_for(state="visible", timeout=60_000)
    # A real pointer click: the live row's buttons stay put while new outer steps arrive. The timeouts are generous
    # because on 2 CPU cores the server's sampling and the page's canvas drawing share the machine, and every round
    # trip to the page can take seconds; the assertions below still tell a lost Finish (the run would go all 1000
    # outer steps) from a taken one.
    keep.first.click(timeout=90_000)
    page.get_by_text("Keeping only batch item 2").first.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("""([picked, candidates]) => window.__film.some(e => e.kind === picked)
        && window.__film.filter(e => e.kind === candidates && e.images === 1).length >= 2
        || window.__steer.done || window.__steer.error !== null""", arg=[PICKED_EVENT, CANDIDATES_EVENT],
                           timeout=120_000)
    page.evaluate("""(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'Finish now').callback()""",
                  sampler)
    page.wait_for_function("() => window.__steer.done || window.__steer.error !== null", timeout=180_000)
    assert page.evaluate("() => window.__steer.error") is None
    events = page.evaluate("() => window.__film")
    picked = [e for e in events if e["kind"] == PICKED_EVENT]
    assert len(picked) == 1 and picked[0]["index"] == 2 and picked[0]["batch_index"] == 2
    k = picked[0]["outer_step"]
    steps = [e for e in events if e["kind"] == CANDIDATES_EVENT]
    assert all(e["images"] == 4 for e in steps if e["outer_step"] <= k)
    after = [e for e in steps if e["outer_step"] > k]
    assert len(after) >= 2 and all(e["images"] == 1 and e["batch_indices"] == [2] for e in after)
    assert len(steps) < outer
    executed = {e["node"]: e["images"] for e in page.evaluate("() => window.__steer.events") if e["type"] == "executed"}
    assert executed.get(str(save)) == 1
    shown = figures(page, sampler)
    assert len(shown) == min(64, sum(e["images"] for e in steps))
    assert shown[0][1] == 2 and "kept #2" in strip(page, sampler).locator(".nested-filmstrip-head").inner_text()
    close_toasts(page)
    framed = frame(page, [model, sampler, save])
    page.screenshot(path=str(ARTIFACTS / "filmstrip_pick.png"),
                    clip={key: framed[key] for key in ("x", "y", "width", "height")})
    assert page.page_errors == [], page.page_errors
    print(json.dumps({"picked_at_outer_step": k, "outer_steps_run": len(steps)}))
