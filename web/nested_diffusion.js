// Nested Diffusion for ComfyUI: a "Finish now" button on the nested samplers.
// While the node samples, the button asks the server to end the run after the current inner
// diffusion; the node returns that image and the graph goes on (decode, save). Cancel is unchanged.
// It finishes only runs queued by this browser tab: it lists and names runs with the tab's client id (the one
// the tab queues its prompts with), and the server refuses other clients' runs. Works with the legacy
// frontend (api.clientId) and the current one (api.clientId, api.initialClientId).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const FINISHABLE = new Set(["NestedKSampler", "NestedKSamplerAdvanced"]);

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

async function finishNow(node) {
  const clientId = ownClientId();
  if (!clientId) {
    notify("warn", "Cannot tell which runs this tab queued (no client id yet): nothing finished.");
    return;
  }
  const listing = await api.fetchApi(`/nested_diffusion/running?client_id=${encodeURIComponent(clientId)}`);
  const { running = [] } = await listing.json();
  const run = running.find((entry) => isThisNode(entry, node));
  if (!run) {
    notify("info", "Nothing to finish: this node is not sampling a prompt queued from this tab.");
    return;
  }
  const response = await api.fetchApi("/nested_diffusion/finish", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...run, client_id: clientId }),
  });
  const answer = await response.json();
  if (response.ok) {
    notify("success", "Finishing after the current inner diffusion; its image will be the result.");
  } else {
    notify("warn", answer.error ?? `Finish request refused (${response.status})`);
  }
}

app.registerExtension({
  name: "nested_diffusion.finish_now",
  // The extension's own hook (every frontend calls it for every new node, loaded or added) instead of wrapping the
  // node type's onNodeCreated.
  nodeCreated(node) {
    if (!FINISHABLE.has(node.comfyClass ?? node.type)) return;
    if (node.widgets?.some((widget) => widget.name === "Finish now")) return;
    const button = node.addWidget("button", "Finish now", null, () => finishNow(node));
    // not an input: keep it out of saved widget values and out of the queued prompt
    button.serialize = false;
    button.options = { ...(button.options ?? {}), serialize: false };
  },
});
