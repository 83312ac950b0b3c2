// Nested Diffusion for ComfyUI: steer a nested run from the node.
// * "Finish now": a button on the nested samplers (and on SamplerCustom / SamplerCustomAdvanced once they run a
//   NestedSampler). While the node samples, the button asks the server to end the run after the current inner
//   diffusion; the node returns that image and the graph goes on (decode, save). Cancel is unchanged.
// * The filmstrip: every batch item's image after every outer step (the nested_diffusion.candidates event), on the
//   node that runs the nested sampler, labelled "outer k/K", NFEs and batch index; it stays after the run (the
//   latest MAX_KEPT images per node); a click enlarges one. While the run runs, each candidate of the latest outer
//   step has "keep only this": the run continues only that batch item from its next model call on.
// Both steer only runs queued by this browser tab: requests carry the tab's client id (the one the tab queues its
// prompts with), and the server refuses other clients' runs. Works with the legacy frontend (api.clientId) and
// the current one (api.clientId, api.initialClientId).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// protocol.py spells the same strings
const OUTER_STEP_EVENT = "nested_diffusion.outer_step";
const CANDIDATES_EVENT = "nested_diffusion.candidates";
const PICKED_EVENT = "nested_diffusion.picked";
const FINISH_ROUTE = "/nested_diffusion/finish";
const PICK_ROUTE = "/nested_diffusion/pick";
const RUNNING_ROUTE = "/nested_diffusion/running";
// only on a master with ComfyUI-Distributed: the same for every server of the prompt's job (nodes/distributed.py)
const JOB_FINISH_ROUTE = "/nested_diffusion/job/finish";
const JOB_PICK_ROUTE = "/nested_diffusion/job/pick";

const FINISHABLE = new Set(["NestedKSampler", "NestedKSamplerAdvanced"]);
const FINISH_BUTTON = "Finish now";
const FILMSTRIP_WIDGET = "nested_filmstrip";
const FILMSTRIP_HEIGHT = 250; // CSS pixels at zoom 1: the strip scrolls inside
const MAX_KEPT = 64; // images kept per node (the oldest go first)

// severity: "info", "success" or "warn". Current frontends have toast.info / success / warning (toast.add is
// deprecated there); older ones (1.32 with ComfyUI 0.3.75) only toast.add.
const TOAST_METHODS = { info: "info", success: "success", warn: "warning" };

function notify(severity, detail) {
  const toast = app.extensionManager?.toast;
  const method = toast?.[TOAST_METHODS[severity]];
  if (typeof method === "function") {
    method.call(toast, "Nested Diffusion", { description: detail, duration: 4000 });
  } else if (toast?.add) {
    toast.add({ severity, summary: "Nested Diffusion", detail, life: 4000 });
  } else {
    console.log(`[nested diffusion] ${detail}`);
  }
}

function isThisNode(run, node) {
  const id = String(node.id);
  return run.node_id === id || run.node_id.endsWith(`:${id}`);
}

function ownClientId() {
  const id = api.clientId ?? api.initialClientId ?? window.sessionStorage?.getItem("clientId");
  return typeof id === "string" && id ? id : null;
}

async function postJson(route, body) {
  const response = await api.fetchApi(route, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    answer = { error: `HTTP ${response.status}` };
  }
  return { ok: response.ok, status: response.status, answer };
}

// The run this node's filmstrip is showing, while it runs: finishing it takes one request, so Finish acts at once
// even when the page is busy (the listing's answer would wait behind the page's queued events first).
function liveRun(node) {
  const strip = node.__nestedFilmstrip;
  if (!strip?.running || !strip.promptId || !strip.eventNode) return null;
  return { prompt_id: strip.promptId, node_id: strip.eventNode };
}

// The server's record of this node's run queued from this tab (before its first image, or when the strip's ended).
async function listedRun(node, clientId) {
  const listing = await api.fetchApi(`${RUNNING_ROUTE}?client_id=${encodeURIComponent(clientId)}`);
  const { running = [] } = await listing.json();
  return running.find((entry) => isThisNode(entry, node)) ?? null;
}

// Where ComfyUI-Distributed's nodes are registered, steering goes to the job route (it steers every server of the
// job, and a prompt that is no job as the plain route does); elsewhere straight to the plain route. A
// server without the job route answers its own 404 or 405, not JSON (postJson then says "HTTP <status>"), and the
// plain route is used from then on.
let jobRoutes = null; // unknown until the first steering request

async function postSteering(jobRoute, route, body, jobFields = {}) {
  jobRoutes ??= !!window.LiteGraph?.registered_node_types?.DistributedCollector;
  if (jobRoutes) {
    const result = await postJson(jobRoute, { ...body, ...jobFields });
    const missing = (result.status === 404 || result.status === 405) && result.answer.error === `HTTP ${result.status}`;
    if (!missing) return result;
    jobRoutes = false;
  }
  return postJson(route, body);
}

async function requestFinish(run, clientId) {
  return postSteering(JOB_FINISH_ROUTE, FINISH_ROUTE,
                      { prompt_id: run.prompt_id, node_id: run.node_id, client_id: clientId });
}

async function finishNow(node) {
  const clientId = ownClientId();
  if (!clientId) {
    notify("warn", "Cannot tell which runs this tab queued (no client id yet): nothing finished.");
    return;
  }
  let result = null;
  const live = liveRun(node);
  if (live) result = await requestFinish(live, clientId);
  if (!result || result.status === 404 || result.status === 409) {
    // no live strip, or its run has ended meanwhile: ask the server what this node runs now
    const run = await listedRun(node, clientId);
    if (!run) {
      notify("info", "Nothing to finish: this node is not sampling a prompt queued from this tab.");
      return;
    }
    result = await requestFinish(run, clientId);
  }
  if (result.ok) {
    notify("success", "Finishing now: the latest finished image will be the result.");
  } else {
    notify("warn", result.answer.error ?? `Finish request refused (${result.status})`);
  }
}

function addFinishButton(node) {
  if (node.widgets?.some((widget) => widget.name === FINISH_BUTTON)) return;
  const button = node.addWidget("button", FINISH_BUTTON, null, () => finishNow(node));
  // not an input: keep it out of saved widget values and out of the queued prompt
  button.serialize = false;
  button.options = { ...(button.options ?? {}), serialize: false };
}

// The node an event names: its id in the graph shown (ids inside a subgraph or group node are "outer:inner").
function nodeFor(id) {
  if (id === undefined || id === null) return null;
  const text = String(id);
  const graphs = [app.graph, app.canvas?.graph].filter(Boolean);
  for (const graph of graphs) {
    const node = graph.getNodeById?.(text) ?? graph.getNodeById?.(Number(text));
    if (node) return node;
  }
  const last = text.split(":").pop();
  for (const graph of graphs) {
    const node = graph.getNodeById?.(last) ?? graph.getNodeById?.(Number(last));
    if (node) return node;
  }
  return null;
}

function redraw() {
  app.graph?.setDirtyCanvas?.(true, true);
}

// -- the filmstrip ------------------------------------------------------------------------------------------------
const STYLE = `
.nested-filmstrip { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; height: 100%;
  padding: 4px; font: 11px/1.25 sans-serif; color: #ddd; background: rgba(0, 0, 0, 0.25); border-radius: 4px;
  overflow: hidden; }
.nested-filmstrip-head { flex: none; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; opacity: 0.85; }
.nested-filmstrip-grid { flex: 1; display: grid; grid-template-columns: repeat(auto-fill, minmax(64px, 1fr));
  gap: 4px; overflow-y: auto; align-content: start; }
.nested-filmstrip figure { margin: 0; display: flex; flex-direction: column; gap: 2px; align-items: stretch; }
.nested-filmstrip figure.nested-kept img { outline: 2px solid #4caf50; }
.nested-filmstrip img { width: 100%; aspect-ratio: 1; object-fit: contain; image-rendering: pixelated;
  cursor: zoom-in; background: #111; }
.nested-filmstrip .nested-no-preview { aspect-ratio: 1; display: flex; align-items: center; justify-content: center;
  font-size: 10px; opacity: 0.6; background: #111; }
.nested-filmstrip figcaption { font-size: 10px; text-align: center; opacity: 0.85; white-space: pre-line; }
.nested-filmstrip button { font-size: 10px; padding: 1px 2px; cursor: pointer; border-radius: 3px;
  border: 1px solid #666; background: #333; color: #eee; }
.nested-filmstrip button:disabled { opacity: 0.5; cursor: default; }
.nested-filmstrip-overlay { position: fixed; inset: 0; z-index: 10000; display: flex; flex-direction: column;
  align-items: center; justify-content: center; gap: 8px; background: rgba(0, 0, 0, 0.8); color: #eee;
  font: 14px sans-serif; cursor: zoom-out; }
.nested-filmstrip-overlay img { width: min(80vmin, 768px); height: min(80vmin, 768px); object-fit: contain;
  image-rendering: pixelated; background: #111; }
`;

function ensureStyle() {
  if (document.getElementById("nested-filmstrip-style")) return;
  const style = document.createElement("style");
  style.id = "nested-filmstrip-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function label(item) {
  return `outer ${item.outerStep}/${item.outerSteps} · ${item.nfe} NFE · #${item.batchIndex}`;
}

function enlarge(item) {
  document.querySelector(".nested-filmstrip-overlay")?.remove();
  const overlay = document.createElement("div");
  overlay.className = "nested-filmstrip-overlay";
  overlay.setAttribute("role", "dialog");
  overlay.setAttribute("aria-label", "Nested Diffusion candidate");
  const image = document.createElement("img");
  image.src = item.src;
  image.alt = label(item);
  const caption = document.createElement("div");
  caption.textContent = `${label(item)} (of ${item.nfeTotal} NFE) · click or Escape to close`;
  overlay.append(image, caption);
  const close = () => {
    overlay.remove();
    document.removeEventListener("keydown", onKey, true);
  };
  const onKey = (event) => {
    if (event.key === "Escape") close();
  };
  overlay.addEventListener("click", close);
  document.addEventListener("keydown", onKey, true);
  document.body.appendChild(overlay);
}

let warnedNoDomWidgets = false;
const strips = new Set(); // every filmstrip made in this page

// The node's filmstrip state and widget, created at its first candidates event; null where the frontend has no
// DOM widgets (then a console warning, once).
function filmstripOf(node) {
  if (node.__nestedFilmstrip) return node.__nestedFilmstrip;
  if (typeof node.addDOMWidget !== "function") {
    if (!warnedNoDomWidgets) {
      console.warn("[nested diffusion] this frontend has no node.addDOMWidget: no filmstrip on the nodes");
      warnedNoDomWidgets = true;
    }
    return null;
  }
  ensureStyle();
  const element = document.createElement("div");
  element.className = "nested-filmstrip";
  element.dataset.node = String(node.id);
  const head = document.createElement("div");
  head.className = "nested-filmstrip-head";
  const grid = document.createElement("div");
  grid.className = "nested-filmstrip-grid";
  element.append(head, grid);
  // keep the canvas from taking wheel and pointer events meant for the strip's scrolling and buttons
  element.addEventListener("wheel", (event) => event.stopPropagation(), { passive: true });
  const strip = { node, element, head, grid, live: [], promptId: null, running: false, outerStep: 0,
                  outerSteps: 0, pickRequested: null, picked: null, eventNode: null, widget: null };
  try {
    strip.widget = node.addDOMWidget(FILMSTRIP_WIDGET, "nested_filmstrip", element, {
      serialize: false,
      hideOnZoom: false,
      getValue: () => undefined,
      setValue: () => {},
      getMinHeight: () => FILMSTRIP_HEIGHT,
      getMaxHeight: () => FILMSTRIP_HEIGHT,
      getHeight: () => FILMSTRIP_HEIGHT,
    });
  } catch (error) {
    console.warn("[nested diffusion] could not add the filmstrip widget:", error);
    return null;
  }
  if (strip.widget) {
    strip.widget.serialize = false;
    strip.widget.computeSize = (width) => [width, FILMSTRIP_HEIGHT];
  }
  node.setSize?.([Math.max(node.size[0], 320), node.size[1] + FILMSTRIP_HEIGHT + 10]);
  node.__nestedFilmstrip = strip;
  for (const other of strips) {
    if (nodeFor(other.node.id) !== other.node) strips.delete(other); // its node is gone (removed, graph reloaded)
  }
  strips.add(strip);
  return strip;
}

async function keepOnly(strip, item) {
  const clientId = ownClientId();
  if (!clientId) {
    notify("warn", "Cannot tell which runs this tab queued (no client id yet): nothing picked.");
    return;
  }
  strip.pickRequested = item.position;
  updateControls(strip);
  let result;
  try {
    result = await postSteering(JOB_PICK_ROUTE, PICK_ROUTE, {
      prompt_id: strip.promptId,
      node: strip.eventNode,
      index: item.position,
      client_id: clientId,
    }, { server: "master" }); // in a ComfyUI-Distributed job: the master keeps it, the workers finish now
  } catch (error) {
    result = { ok: false, status: 0, answer: { error: String(error) } };
  }
  if (result.ok) {
    notify("success", `Keeping only batch item ${item.batchIndex} from the next outer step on.`);
  } else {
    strip.pickRequested = null;
    notify("warn", result.answer.error ?? `Pick refused (${result.status})`);
  }
  updateControls(strip);
}

// The strip is built incrementally, so that a fast model (many outer steps a second) costs the page only the new
// images: the first row holds the latest outer step's candidates ("live" figures, one per batch position, updated
// in place, so that their "keep only this" buttons stay put under the pointer); at every new outer step the live
// row's images move down into the history (newest first), and the oldest go once MAX_KEPT images are shown.
function newFigure() {
  const figure = document.createElement("figure");
  const caption = document.createElement("figcaption");
  figure.append(caption);
  figure.__caption = caption;
  return figure;
}

function showItem(strip, figure, item) {
  figure.__item = item;
  figure.dataset.outerStep = String(item.outerStep);
  figure.dataset.batchIndex = String(item.batchIndex);
  figure.dataset.position = String(item.position);
  figure.dataset.label = label(item);
  figure.__caption.textContent = `outer ${item.outerStep}/${item.outerSteps}\n${item.nfe} NFE · #${item.batchIndex}`;
  const wanted = item.src ? "IMG" : "DIV";
  if (figure.__image?.tagName !== wanted) {
    const image = document.createElement(wanted.toLowerCase());
    if (item.src) {
      image.addEventListener("click", (event) => {
        event.stopPropagation();
        enlarge(figure.__item);
      });
    } else {
      // the server had no previewer for this model (or preview method "none")
      image.className = "nested-no-preview";
      image.textContent = "no preview";
    }
    figure.__image?.remove();
    figure.prepend(image);
    figure.__image = image;
  }
  if (item.src) {
    if (figure.__image.src !== item.src) figure.__image.src = item.src;
    figure.__image.alt = label(item);
    figure.__image.title = `${label(item)}: click to enlarge`;
  }
  figure.classList.toggle("nested-kept", !!strip.picked && item.batchIndex === strip.picked.batch_index);
}

function clearStrip(strip) {
  strip.grid.replaceChildren();
  strip.live = [];
}

// A new outer step's candidates: the live row's images go to the top of the history, the live row shows these.
function addOuterStep(strip, items) {
  const { grid, live } = strip;
  if (live.length && live[0].__item.outerStep !== items[0]?.outerStep) {
    const retired = document.createDocumentFragment();
    for (const figure of live) {
      const copy = newFigure();
      showItem(strip, copy, figure.__item);
      retired.append(copy);
    }
    grid.insertBefore(retired, live[live.length - 1].nextSibling);
  }
  while (live.length > items.length) live.pop().remove();
  while (live.length < items.length) {
    const figure = newFigure();
    grid.insertBefore(figure, live.length ? live[live.length - 1].nextSibling : grid.firstChild);
    live.push(figure);
  }
  items.forEach((item, position) => showItem(strip, live[position], item));
  while (grid.children.length > MAX_KEPT) grid.lastElementChild.remove();
}

// The head line and the live row's buttons: what changes with the run's state, not its images.
function updateControls(strip) {
  const state = strip.picked
    ? `kept #${strip.picked.batch_index} after outer ${strip.picked.outer_step}`
    : strip.running ? "running" : "done";
  strip.head.textContent = strip.grid.children.length
    ? `Candidates · outer ${strip.outerStep}/${strip.outerSteps} · ${state}`
    : "Candidates";
  const offered = strip.running && !strip.picked && strip.live.length > 1;
  const canPick = offered && strip.pickRequested === null;
  for (const figure of strip.live) {
    const button = figure.__button ?? keepButton(strip, figure);
    if (!offered) {
      button.remove();
      continue;
    }
    const text = strip.pickRequested === figure.__item.position ? "keeping..." : "keep only this";
    if (button.textContent !== text) button.textContent = text;
    button.disabled = !canPick;
    if (!button.isConnected) figure.append(button);
  }
  redraw();
}

function keepButton(strip, figure) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "nested-keep";
  button.title = "Continue the run with this candidate only (from the next outer step on)";
  button.addEventListener("click", (event) => {
    event.stopPropagation();
    keepOnly(strip, figure.__item);
  });
  figure.__button = button;
  return button;
}

function onCandidates(detail) {
  if (!detail) return;
  const node = nodeFor(detail.display_node ?? detail.node);
  if (!node) return;
  const strip = filmstripOf(node);
  if (!strip) return;
  if (strip.promptId !== detail.prompt_id) {
    // a new run of this node: the strip shows that one
    Object.assign(strip, { promptId: detail.prompt_id, pickRequested: null, picked: null });
    clearStrip(strip);
  }
  strip.running = true;
  strip.eventNode = String(detail.node);
  strip.outerStep = detail.outer_step;
  strip.outerSteps = detail.outer_steps;
  const images = Array.isArray(detail.images) ? detail.images : [];
  const items = images.map((src, position) => ({
    src,
    position,
    batchIndex: detail.batch_indices?.[position] ?? position,
    outerStep: detail.outer_step,
    outerSteps: detail.outer_steps,
    nfe: detail.nfe,
    nfeTotal: detail.nfe_total,
  }));
  if (items.length) addOuterStep(strip, items);
  updateControls(strip);
}

function onPicked(detail) {
  const node = nodeFor(detail?.display_node ?? detail?.node);
  const strip = node?.__nestedFilmstrip;
  if (!strip || strip.promptId !== detail.prompt_id) return;
  strip.picked = detail;
  strip.pickRequested = null;
  // the kept item's images so far get the outline (showItem gives it to the ones that come later)
  for (const figure of strip.grid.children) {
    figure.classList.toggle("nested-kept", figure.__item.batchIndex === detail.batch_index);
  }
  updateControls(strip);
}

// The run of a strip is over once its prompt ends or ComfyUI executes another node.
function endRuns(promptId, executingNode) {
  for (const strip of strips) {
    if (!strip.running) continue;
    if (promptId && strip.promptId && promptId !== strip.promptId) continue;
    if (executingNode !== undefined && executingNode !== null && String(executingNode) === strip.eventNode) continue;
    strip.running = false;
    updateControls(strip);
  }
}

function onOuterStep(detail) {
  // SamplerCustom / SamplerCustomAdvanced running a NestedSampler report their own node id: give them the button
  const node = nodeFor(detail?.display_node ?? detail?.node);
  if (node && !node.widgets?.some((widget) => widget.name === FINISH_BUTTON)) {
    addFinishButton(node);
    const needed = node.computeSize?.()?.[1];
    if (needed > node.size[1]) node.setSize?.([node.size[0], needed]);
    redraw();
  }
}

app.registerExtension({
  name: "nested_diffusion.finish_now",
  // The extension's own hook (every frontend calls it for every new node, loaded or added) instead of wrapping the
  // node type's onNodeCreated.
  nodeCreated(node) {
    if (!FINISHABLE.has(node.comfyClass ?? node.type)) return;
    addFinishButton(node);
  },
  setup() {
    const listen = (type, handler) => api.addEventListener(type, (event) => {
      try {
        handler(event.detail);
      } catch (error) {
        console.warn(`[nested diffusion] ${type}:`, error);
      }
    });
    listen(CANDIDATES_EVENT, onCandidates);
    listen(PICKED_EVENT, onPicked);
    listen(OUTER_STEP_EVENT, onOuterStep);
    listen("executing", (detail) => {
      const executing = detail !== null && typeof detail === "object" ? detail.node : detail;
      const promptId = detail !== null && typeof detail === "object" ? detail.prompt_id : undefined;
      endRuns(promptId, executing);
    });
    for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
      listen(type, (detail) => endRuns(detail?.prompt_id, null));
    }
  },
});
