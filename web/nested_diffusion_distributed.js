// Nested Diffusion across ComfyUI-Distributed workers: the workers' candidates on the master's page.
// Only where ComfyUI-Distributed's nodes are registered (else this file does nothing: no request, no socket).
// The page opens one websocket per enabled worker of ComfyUI-Distributed's config (GET /distributed/config), with
// this tab's client id: ComfyUI-Distributed queues each worker's copy of the prompt with the master prompt's client
// id (or with none, and then the worker sends its events to every socket), so the worker's own
// nested_diffusion.candidates events reach this tab directly; the master relays nothing. Workers must accept the
// page's origin (ComfyUI-Distributed launches its local workers with --enable-cors-header; its guides ask the
// same of remote ones). Under each nested sampler that runs on the workers, a panel shows every worker's latest
// candidates, labelled with the worker, with "keep only this": that worker keeps the item, the master and the other
// workers finish now (POST /nested_diffusion/job/pick). The master's own candidates stay in the node's filmstrip.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CANDIDATES_EVENT = "nested_diffusion.candidates"; // protocol.py spells the same strings
const PICKED_EVENT = "nested_diffusion.picked";
const JOB_PICK_ROUTE = "/nested_diffusion/job/pick";
const PANEL_WIDGET = "nested_job_strip";
const PANEL_HEIGHT = 170;
const MAX_ROW_IMAGES = 32; // images kept per worker row (the oldest go first)

const sockets = new Map(); // worker id -> WebSocket
let masterPromptId = null; // the prompt this tab's job runs on the master
const received = { events: 0, bytes: 0 }; // what the workers' candidates cost this page (window.nestedJobStrip)

function ownClientId() {
  const id = api.clientId ?? api.initialClientId ?? window.sessionStorage?.getItem("clientId");
  return typeof id === "string" && id ? id : null;
}

// ComfyUI-Distributed's rule for a worker's address (utils/network.py build_worker_url); an empty host is the
// master's, as the page sees it.
function workerBase(worker) {
  const host = String(worker.host ?? "").trim() || window.location.hostname;
  if (/^https?:\/\//.test(host)) return host.replace(/\/+$/, "");
  const port = Number(worker.port ?? worker.listen_port ?? 8188) || 8188;
  const secure = worker.type === "cloud" || host.endsWith(".proxy.runpod.net") || port === 443;
  const standard = secure ? 443 : 80;
  return `${secure ? "https" : "http"}://${host}${port === standard ? "" : `:${port}`}`;
}

async function connectWorkers() {
  const clientId = ownClientId();
  if (!clientId) return;
  let config;
  try {
    const response = await api.fetchApi("/distributed/config");
    if (!response.ok) return;
    config = await response.json();
  } catch (error) {
    console.warn("[nested diffusion] ComfyUI-Distributed's config:", error);
    return;
  }
  for (const worker of config.workers ?? []) {
    const id = String(worker.id ?? "");
    if (!id || !worker.enabled) continue;
    const open = sockets.get(id);
    if (open && open.readyState <= WebSocket.OPEN) continue;
    const url = `${workerBase(worker).replace(/^http/, "ws")}/ws?clientId=${encodeURIComponent(clientId)}`;
    try {
      const socket = new WebSocket(url);
      socket.addEventListener("message", (message) => onWorkerMessage(id, worker.name || id, message));
      sockets.set(id, socket);
    } catch (error) {
      console.warn(`[nested diffusion] worker ${id} (${url}):`, error);
    }
  }
}

function onWorkerMessage(workerId, workerName, message) {
  if (typeof message.data !== "string") return; // binary previews: the candidates event carries the images
  let event;
  try {
    event = JSON.parse(message.data);
  } catch {
    return;
  }
  if (event?.type === CANDIDATES_EVENT) {
    received.events += 1;
    received.bytes += message.data.length;
    showCandidates(workerId, workerName, event.data);
  } else if (event?.type === PICKED_EVENT) {
    const row = rowOf(event.data, workerId);
    if (row) row.kept = event.data.batch_index;
  }
}

function nodeFor(id) {
  if (id === undefined || id === null) return null;
  const text = String(id);
  return app.graph?.getNodeById?.(text) ?? app.graph?.getNodeById?.(Number(text))
    ?? app.graph?.getNodeById?.(Number(text.split(":").pop())) ?? null;
}

const STYLE = `
.nested-job-strip { box-sizing: border-box; height: 100%; overflow-y: auto; padding: 4px; font: 11px sans-serif;
  color: #ddd; background: rgba(0, 0, 0, 0.25); border-radius: 4px; display: flex; flex-direction: column; gap: 4px; }
.nested-job-row { display: flex; gap: 4px; align-items: flex-start; }
.nested-job-images { display: flex; gap: 4px; overflow-x: auto; }
.nested-job-images figure.nested-old button { display: none; }
.nested-job-row > span { flex: none; width: 74px; white-space: pre-line; opacity: 0.85; }
.nested-job-row figure { margin: 0; width: 56px; display: flex; flex-direction: column; gap: 2px; }
.nested-job-row img { width: 56px; height: 56px; object-fit: contain; image-rendering: pixelated; background: #111; }
.nested-job-row figure.nested-kept img { outline: 2px solid #4caf50; }
.nested-job-row button { font-size: 9px; padding: 1px; border-radius: 3px; border: 1px solid #666; background: #333;
  color: #eee; cursor: pointer; }
.nested-job-row button:disabled { opacity: 0.5; cursor: default; }
`;

function panelOf(node) {
  if (node.__nestedJobStrip) return node.__nestedJobStrip;
  if (typeof node.addDOMWidget !== "function") return null;
  if (!document.getElementById("nested-job-strip-style")) {
    const style = document.createElement("style");
    style.id = "nested-job-strip-style";
    style.textContent = STYLE;
    document.head.appendChild(style);
  }
  const element = document.createElement("div");
  element.className = "nested-job-strip";
  element.dataset.node = String(node.id);
  element.addEventListener("wheel", (event) => event.stopPropagation(), { passive: true });
  const panel = { element, rows: new Map() };
  const widget = node.addDOMWidget(PANEL_WIDGET, "nested_job_strip", element, {
    serialize: false, hideOnZoom: false, getValue: () => undefined, setValue: () => {},
    getMinHeight: () => PANEL_HEIGHT, getMaxHeight: () => PANEL_HEIGHT, getHeight: () => PANEL_HEIGHT,
  });
  if (widget) {
    widget.serialize = false;
    widget.computeSize = (width) => [width, PANEL_HEIGHT];
  }
  node.setSize?.([Math.max(node.size[0], 320), node.size[1] + PANEL_HEIGHT + 10]);
  node.__nestedJobStrip = panel;
  return panel;
}

function rowOf(detail, workerId) {
  const node = nodeFor(detail?.display_node ?? detail?.node);
  return node?.__nestedJobStrip?.rows.get(workerId) ?? null;
}

function showCandidates(workerId, workerName, detail) {
  const node = nodeFor(detail?.display_node ?? detail?.node);
  const panel = node && panelOf(node);
  if (!panel) return;
  let row = panel.rows.get(workerId);
  if (!row || row.promptId !== detail.prompt_id) {
    row?.element.remove();
    const element = document.createElement("div");
    element.className = "nested-job-row";
    element.dataset.server = workerId;
    const label = document.createElement("span");
    const images = document.createElement("div");
    images.className = "nested-job-images";
    element.append(label, images);
    row = { element, label, images, promptId: detail.prompt_id, masterPromptId, kept: null, seen: 0 };
    panel.rows.set(workerId, row);
    const ordered = [...panel.rows.entries()].sort(([a], [b]) => a.localeCompare(b, undefined, { numeric: true }));
    panel.element.append(...ordered.map(([, entry]) => entry.element)); // in worker id order, whoever came first
  }
  row.masterPromptId = row.masterPromptId ?? masterPromptId;
  row.seen += (detail.images ?? []).length;
  row.label.textContent = `${workerName}\nouter ${detail.outer_step}/${detail.outer_steps}\n${row.seen} images`;
  const figures = (detail.images ?? []).map((src, position) => {
    const batchIndex = detail.batch_indices?.[position] ?? position;
    const figure = document.createElement("figure");
    figure.dataset.server = workerId;
    figure.dataset.position = String(position);
    figure.dataset.outerStep = String(detail.outer_step);
    figure.classList.toggle("nested-kept", detail.picked !== null && detail.picked !== undefined);
    const image = document.createElement("img");
    if (src) image.src = src;
    image.alt = image.title = `${workerName} · outer ${detail.outer_step}/${detail.outer_steps} · #${batchIndex}`;
    const button = document.createElement("button");
    button.textContent = "keep only this";
    button.disabled = (detail.images ?? []).length < 2 || !row.masterPromptId;
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      keepOnly(row, workerId, workerName, detail.node, position, batchIndex, button);
    });
    figure.append(image, button);
    return figure;
  });
  // newest first; only the latest outer step's candidates keep their "keep only this"
  for (const figure of row.images.children) figure.classList.add("nested-old");
  row.images.prepend(...figures);
  while (row.images.children.length > MAX_ROW_IMAGES) row.images.lastElementChild.remove();
  app.graph?.setDirtyCanvas?.(true, true); // the canvas places DOM widgets when it draws
}

async function keepOnly(row, workerId, workerName, nodeId, position, batchIndex, button) {
  button.disabled = true;
  const response = await api.fetchApi(JOB_PICK_ROUTE, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt_id: row.masterPromptId, node: String(nodeId), index: position, server: workerId,
                           client_id: ownClientId() }),
  });
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    answer = { error: `HTTP ${response.status}` };
  }
  const toast = app.extensionManager?.toast;
  const text = response.ok
    ? `${workerName} keeps only batch item ${batchIndex}; the other servers finish now.`
    : (answer.error ?? `Pick refused (${response.status})`);
  if (toast?.add) toast.add({ severity: response.ok ? "success" : "warn", summary: "Nested Diffusion", detail: text,
                              life: 4000 });
  if (!response.ok) button.disabled = false;
}

app.registerExtension({
  name: "nested_diffusion.distributed",
  setup() {
    if (!window.LiteGraph?.registered_node_types?.DistributedCollector) return; // no ComfyUI-Distributed here
    window.nestedJobStrip = { received, sockets };
    api.addEventListener("execution_start", (event) => {
      masterPromptId = event.detail?.prompt_id ?? masterPromptId;
      connectWorkers(); // sockets closed meanwhile (a worker restarted) open again
    });
    // the tab's client id comes with the master's first status message (and again after a reconnect)
    api.addEventListener("status", () => {
      if (![...sockets.values()].some((socket) => socket.readyState <= WebSocket.OPEN)) connectWorkers();
    });
    connectWorkers();
  },
});
