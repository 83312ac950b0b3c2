"""Builds the example workflows of this pack, so that every editor-format file, its API-format twin and its
thumbnail stay consistent. Run it after changing a workflow below:

    scripts/python.sh -m comfyui_nested_diffusion.tools.workflows                # write the JSON files
    scripts/python.sh -m comfyui_nested_diffusion.tools.workflows --thumbnails   # ... and render the thumbnails:
                                                  # runs the exemplar-model workflows on a real ComfyUI
    scripts/python.sh -m comfyui_nested_diffusion.tools.workflows --check        # exit 1 if a file differs
    scripts/python.sh -m comfyui_nested_diffusion.tools.workflows --object-info  # re-save tools/object_info.json
                                                  # from a real ComfyUI (after a node's schema changed)

Node schemas (sockets, widgets, defaults, outputs, input order) come from ``tools/object_info.json``: ComfyUI's
``/object_info`` for the node types the examples use, saved by ``--object-info`` from a server with this pack
(tests/server_api/test_example_workflows.py checks it against the live server). Saved rather than fetched on every run, so
that writing and checking the files needs no server (the schemas of ComfyUI 0.3.75, what the files target).

Where things go (what ComfyUI 0.3.75 and its frontend 1.32.9 expect):

* ``example_workflows/<name>.json``: the workflow in the editor (LiteGraph) format, version 0.4. ComfyUI's
  ``GET /api/workflow_templates`` lists every ``*.json`` directly inside a custom node's ``example_workflows``
  folder, and the Templates dialog (Workflow > Browse Templates, under the pack's folder name) loads the one
  clicked with ``app.loadGraphData``, so only editor-format files belong there.
* ``example_workflows/<name>.jpg``: its thumbnail. The frontend asks for ``<name>.jpg`` (``mediaSubtype`` is
  fixed to ``jpg`` for custom-node templates), served from ``/api/workflow_templates/<pack folder>/``.
  Rendered from a real run where the workflow runs without downloads (the exemplar model), else a title card.
* ``example_workflows/api/<name>_api.json``: the same workflow in API format (``POST /prompt``). Kept in a
  subfolder so that the Templates dialog does not offer it (it cannot load API-format files). The demo's API
  file (``api/nested_vs_vanilla_exemplar_api.json``, what ``scripts/demo.sh`` queues) is hand-written: this
  script checks the editor workflow against it instead of writing it.

Editor-format details follow what the 1.32.9 frontend itself saves: ``inputs`` lists the node's sockets (in
schema order) and then its widgets (``"widget": {"name": ...}``), optional ones with ``"shape": 7``; a link is
``[id, from_node, from_slot, to_node, to_slot, type]`` with ``to_slot`` an index into that ``inputs`` list;
``widgets_values`` follows the schema's input order, with the frontend's extra ``control_after_generate``
value right after a seed and LoadImage's ``upload`` value (``"image"``) after the file name.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Optional

import tomllib
from comfyui_nested_diffusion.tools.comfy_server import PACK_DIR_NAME
from comfyui_nested_diffusion.tools.workflow_checks import EXAMPLES_DIR, REPO_ROOT, input_specs, is_widget

API_DIR = EXAMPLES_DIR / "api"
OBJECT_INFO = Path(__file__).resolve().with_name("object_info.json")
PACK_CNR_ID = "comfyui-nested-diffusion"
PACK_VERSION = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
CORE_VERSION = "0.3.75"
FRONTEND_VERSION = "1.32.9"
THUMBNAIL_SIZE = 400
# The demo's API file was written by hand before this script; its editor twin is built here and checked against it.
LEGACY_API_FILES = {"nested_vs_vanilla_exemplar": EXAMPLES_DIR / "api" / "nested_vs_vanilla_exemplar_api.json"}
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote"}  # frontend-only nodes: no API twin, not in /object_info


# -- node schemas, from ComfyUI's /object_info (tools/object_info.json) ------------------------------------------
@dataclass(frozen=True)
class NodeDef:
    sockets: tuple = ()  # (name, type, optional)
    widgets: tuple = ()  # (name, type, optional)
    defaults: tuple = ()  # (name, value) of optional widgets: what the editor shows when a workflow leaves them out
    outputs: tuple = ()  # (name, type)
    pack: bool = False  # one of this pack's nodes
    seed: Optional[str] = None  # the widget followed by the frontend's control_after_generate value
    upload: bool = False  # LoadImage: an extra "upload" widget value after the file name
    input_order: tuple = ()  # every input, widgets and sockets interleaved, as /object_info lists them (API order)
    choices: tuple = ()  # (name, options) of this pack's combo widgets (core ones list local files: not compared)


# Frontend-only nodes: not in /object_info (the one schema typed here).
VIRTUAL_NODE_DEFS = {"MarkdownNote": NodeDef(widgets=(("text", "STRING", False),))}


def node_def(info: dict) -> NodeDef:
    """One node's schema as the builder needs it, read from its ``/object_info`` entry."""
    sockets, widgets, defaults, choices, seed, upload = [], [], [], [], None, False
    for name, kind, options, optional in input_specs(info):
        if not is_widget(kind, options):
            sockets.append((name, kind, optional))
            continue
        widgets.append((name, kind, optional))
        if kind == "COMBO":
            choices.append((name, tuple(options.get("options") or ())))
        if optional and "default" in options:
            defaults.append((name, options["default"]))
        seed = name if options.get("control_after_generate") else seed
        upload = upload or bool(options.get("image_upload"))
    outputs = tuple(zip(info.get("output_name") or info.get("output") or (), info.get("output") or ()))
    pack = str(info.get("python_module", "")) == f"custom_nodes.{PACK_DIR_NAME}"  # not other packs, nor test-only nodes
    return NodeDef(sockets=tuple(sockets), widgets=tuple(widgets), defaults=tuple(defaults), outputs=outputs,
                   pack=pack, seed=seed, upload=upload, input_order=tuple(name for name, _, _, _ in input_specs(info)),
                   choices=tuple(choices) if pack else ())


_live_object_info: Optional[dict] = None  # set only while --object-info finds the node types the examples use


@cache
def saved_object_info() -> dict:
    """tools/object_info.json: ``/object_info`` of the node types the examples use."""
    if _live_object_info is not None:
        return _live_object_info
    return json.loads(OBJECT_INFO.read_text(encoding="utf-8"))


def _use_object_info(info: Optional[dict]) -> None:
    global _live_object_info
    _live_object_info = info
    saved_object_info.cache_clear()
    schema_of.cache_clear()


def write_object_info(live: dict) -> Path:
    """Save ``live`` (a server's /object_info) for this pack's nodes and every node type the examples use."""
    _use_object_info(live)
    try:
        used = {node.type for workflow in all_workflows() for node in workflow.nodes} - set(VIRTUAL_NODE_DEFS)
    finally:
        _use_object_info(None)
    used |= {name for name, info in live.items() if node_def(info).pack}
    OBJECT_INFO.write_text(dumps({name: live[name] for name in sorted(used)}), encoding="utf-8")
    return OBJECT_INFO


def fetch_object_info() -> dict:
    """``/object_info`` of a real ComfyUI with this pack (tools/comfy_server.py)."""
    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer

    with ComfyServer(startup_timeout=180) as server, ComfyAPIClient(server.url) as client:
        return client.object_info()


@cache
def schema_of(type_: str) -> NodeDef:
    if type_ in VIRTUAL_NODE_DEFS:
        return VIRTUAL_NODE_DEFS[type_]
    info = saved_object_info()
    if type_ not in info:
        raise KeyError(f"{type_} is not in {OBJECT_INFO.name}: run this module with --object-info")
    return node_def(info[type_])


DEFAULT_SIZES = {
    "NestedKSampler": (320, 640), "NestedDigitsModel": (300, 58), "NestedDigitsPrompt": (300, 58), "KSampler": (320, 600), "NestedExemplarModel": (310, 180),
    "InnerSolverSelect": (300, 200), "NestedSampler": (300, 110), "OuterStepPreview": (420, 470),
    "CheckpointLoaderSimple": (320, 98), "CLIPTextEncode": (400, 160), "EmptyLatentImage": (300, 106),
    "EmptySD3LatentImage": (300, 106), "EmptyChromaRadianceLatentImage": (330, 106), "VAELoader": (300, 58),
    "VAEDecode": (160, 46), "VAEEncode": (160, 46), "SaveImage": (320, 340), "LoadImage": (320, 330),
    "SetLatentNoiseMask": (190, 46), "SolidMask": (260, 106), "MaskComposite": (260, 126),
    "UNETLoader": (320, 82), "DualCLIPLoader": (320, 130), "FluxGuidance": (280, 58), "BasicGuider": (180, 46),
    "CFGGuider": (280, 98), "BasicScheduler": (280, 106), "RandomNoise": (280, 82),
    "SamplerCustomAdvanced": (300, 420), "MarkdownNote": (420, 220), "NestedKSamplerAdvanced": (320, 740),
    "NestedPickCandidate": (420, 470), "NestedExemplarPrompt": (320, 82),
}
COLORS = {"positive": ("#232", "#353"), "negative": ("#322", "#533"), "note": ("#432", "#653"),
          "nested": ("#223", "#335")}
GROUP_COLORS = {"model": "#3f789e", "sample": "#8A8", "output": "#b06634", "mask": "#a1309b", "guide": "#88A"}

# Model files ComfyUI's own templates (comfyui-workflow-templates 0.7.25) download them from.
MODEL_FILES = {
    "v1-5-pruned-emaonly-fp16.safetensors": (
        "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/"
        "v1-5-pruned-emaonly-fp16.safetensors?download=true", "checkpoints"),
    "sd_xl_base_1.0.safetensors": (
        "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
        "sd_xl_base_1.0.safetensors?download=true", "checkpoints"),
    "flux1-dev.safetensors": ("https://huggingface.co/Comfy-Org/flux1-dev/resolve/main/flux1-dev.safetensors",
                              "diffusion_models"),
    "clip_l.safetensors": ("https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/clip_l.safetensors",
                           "text_encoders"),
    "t5xxl_fp16.safetensors": (
        "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main/t5xxl_fp16.safetensors",
        "text_encoders"),
    "ae.safetensors": ("https://huggingface.co/Comfy-Org/Lumina_Image_2.0_Repackaged/resolve/main/"
                       "split_files/vae/ae.safetensors", "vae"),
}


# -- workflow model ---------------------------------------------------------------------------------------------
@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    size: tuple
    widgets: dict
    title: Optional[str] = None
    color: Optional[tuple] = None
    links_in: dict = field(default_factory=dict)  # input name -> (Node, output index)

    @property
    def schema(self) -> NodeDef:
        return schema_of(self.type)

    def out(self, name_or_index) -> tuple:
        if isinstance(name_or_index, int):
            return (self, name_or_index)
        names = [name for name, _ in self.schema.outputs]
        return (self, names.index(name_or_index))


class Workflow:
    """One example: nodes with widget values and links; renders both formats."""

    def __init__(self, name: str, title: str, summary: str, *, runnable: bool, needs: tuple = ()):
        self.name = name
        self.title = title
        self.summary = summary
        self.runnable = runnable  # runs here, on the exemplar model, without any download
        self.needs = needs  # model files it needs (for the title card)
        self.nodes: list[Node] = []
        self.groups: list[tuple] = []  # (title, [nodes], color)
        self.card: list[Node] = []  # the nodes a title card shows, top to bottom

    def add(self, type_: str, pos, widgets: Optional[dict] = None, *, id: Optional[int] = None,  # noqa: A002
            title: Optional[str] = None, size=None, color: Optional[str] = None, **links) -> Node:
        schema = schema_of(type_)
        widgets = dict(widgets or {})
        names = [name for name, _, _ in schema.widgets]
        unknown = set(widgets) - set(names)
        missing = [name for name, _, optional in schema.widgets if not optional and name not in widgets]
        if unknown or missing:
            raise ValueError(f"{self.name}: {type_} widgets: unknown {sorted(unknown)}, missing {missing}")
        node = Node(id=id if id is not None else max([n.id for n in self.nodes], default=0) + 1, type=type_,
                    pos=tuple(pos), size=tuple(size or DEFAULT_SIZES[type_]), widgets=widgets, title=title,
                    color=COLORS[color] if color else None)
        if any(n.id == node.id for n in self.nodes):
            raise ValueError(f"{self.name}: duplicate node id {node.id}")
        sockets = {name for name, _, _ in schema.sockets}
        for name, source in links.items():
            if name not in sockets:
                raise ValueError(f"{self.name}: {type_} has no socket input {name!r}")
            node.links_in[name] = source
        missing_links = [name for name, _, optional in schema.sockets if not optional and name not in links]
        if missing_links:
            raise ValueError(f"{self.name}: {type_} (node {node.id}) lacks links for {missing_links}")
        self.nodes.append(node)
        return node

    def note(self, text: str, pos, size=None) -> Node:
        return self.add("MarkdownNote", pos, {"text": text}, title="Note", size=size, color="note")

    def group(self, title: str, nodes: list, color: str) -> None:
        self.groups.append((title, nodes, GROUP_COLORS[color]))

    # -- formats ------------------------------------------------------------------------------------------------
    def _widget_values(self, node: Node) -> list:
        """All widget values, as the frontend saves them: optional widgets a workflow leaves out at their default."""
        values = []
        defaults = dict(node.schema.defaults)
        for name, _, optional in node.schema.widgets:
            values.append(node.widgets[name] if name in node.widgets else defaults[name])
            if name == node.schema.seed:
                values.append("fixed")  # control_after_generate: examples should reproduce
            if node.schema.upload and name == "image":
                values.append("image")
        return values

    def _order(self) -> dict:
        order, seen = {}, set()

        def visit(node: Node):
            if node.id in seen:
                return
            seen.add(node.id)
            for source, _ in node.links_in.values():
                visit(source)
            order[node.id] = len(order)

        for node in sorted(self.nodes, key=lambda n: n.id):
            visit(node)
        return order

    def editor(self) -> dict:
        links = []
        outputs: dict = {}  # (node id, slot) -> [link ids]
        inputs_of: dict = {}
        for node in sorted(self.nodes, key=lambda n: n.id):
            schema = node.schema
            entries = []
            for name, kind, optional in schema.sockets:
                entry = {"name": name, "type": kind, "link": None}
                if optional:
                    entry["shape"] = 7
                entries.append(entry)
            for name, kind, optional in schema.widgets:
                if node.type in VIRTUAL_NODE_TYPES:
                    continue
                entry = {"name": name, "type": kind, "widget": {"name": name}, "link": None}
                if optional:
                    entry["shape"] = 7
                entries.append(entry)
            inputs_of[node.id] = entries
        link_id = 0
        for node in sorted(self.nodes, key=lambda n: n.id):
            socket_names = [name for name, _, _ in node.schema.sockets]
            for name in socket_names:
                if name not in node.links_in:
                    continue
                source, slot = node.links_in[name]
                link_id += 1
                kind = source.schema.outputs[slot][1]
                to_slot = socket_names.index(name)
                links.append([link_id, source.id, slot, node.id, to_slot, kind])
                inputs_of[node.id][to_slot]["link"] = link_id
                outputs.setdefault((source.id, slot), []).append(link_id)
        order = self._order()
        nodes = []
        for node in sorted(self.nodes, key=lambda n: n.id):
            schema = node.schema
            entry: dict[str, Any] = {
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                "order": order[node.id], "mode": 0, "inputs": inputs_of[node.id],
                "outputs": [{"name": name, "type": kind, "links": outputs.get((node.id, slot)), "slot_index": slot}
                            for slot, (name, kind) in enumerate(schema.outputs)],
            }
            if node.title:
                entry["title"] = node.title
            properties: dict[str, Any] = {}
            if node.type not in VIRTUAL_NODE_TYPES:
                properties["Node name for S&R"] = node.type
                properties["cnr_id"] = PACK_CNR_ID if schema.pack else "comfy-core"
                properties["ver"] = PACK_VERSION if schema.pack else CORE_VERSION
                models = [{"name": value, "url": MODEL_FILES[value][0], "directory": MODEL_FILES[value][1]}
                          for value in node.widgets.values() if isinstance(value, str) and value in MODEL_FILES]
                if models:
                    properties["models"] = models
            entry["properties"] = properties
            entry["widgets_values"] = self._widget_values(node)
            if node.color:
                entry["color"], entry["bgcolor"] = node.color
            nodes.append(entry)
        groups = []
        for index, (title, members, color) in enumerate(self.groups, start=1):
            x0 = min(n.pos[0] for n in members) - 10
            y0 = min(n.pos[1] for n in members) - 92  # room for the node's title bar and source badge
            x1 = max(n.pos[0] + n.size[0] for n in members) + 10
            y1 = max(n.pos[1] + n.size[1] for n in members) + 14
            groups.append({"id": index, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                           "font_size": 22, "flags": {}})
        return {
            "id": f"00000000-0000-4000-8000-{abs(hash_name(self.name)):012x}",
            "revision": 0,
            "last_node_id": max(n.id for n in self.nodes),
            "last_link_id": link_id,
            "nodes": nodes,
            "links": links,
            "groups": groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [60, 120]}, "frontendVersion": FRONTEND_VERSION,
                      "nested_diffusion": {"title": self.title, "summary": self.summary,
                                           "api_twin": api_path(self.name).relative_to(EXAMPLES_DIR).as_posix()}},
            "version": 0.4,
        }

    def api(self) -> dict:
        prompt = {}
        for node in sorted(self.nodes, key=lambda n: n.id):
            if node.type in VIRTUAL_NODE_TYPES:
                continue
            inputs: dict[str, Any] = {}
            socket_names = [name for name, _, _ in node.schema.sockets]
            # API inputs in the schema's own order: widgets and sockets interleaved as /object_info lists them.
            for name in api_input_order(node.type):
                if name in node.links_in:
                    source, slot = node.links_in[name]
                    inputs[name] = [str(source.id), slot]
                elif name in node.widgets and name not in socket_names:
                    inputs[name] = node.widgets[name]
            entry: dict[str, Any] = {"class_type": node.type}
            if node.title:
                entry["_meta"] = {"title": node.title}
            entry["inputs"] = inputs
            prompt[str(node.id)] = entry
        return prompt


def hash_name(name: str) -> int:
    """A stable 48-bit number from the workflow name (the editor format wants a uuid)."""
    value = 0
    for char in name.encode():
        value = (value * 131 + char) % (1 << 48)
    return value


def api_input_order(type_: str) -> list:
    """The order ComfyUI lists the node's inputs in (required, then optional): widgets and sockets interleaved."""
    return list(schema_of(type_).input_order)


def api_path(name: str) -> Path:
    return LEGACY_API_FILES.get(name, API_DIR / f"{name}_api.json")


# -- the examples -----------------------------------------------------------------------------------------------
EXEMPLAR = {"prediction": "eps", "spread": 0.05, "image_size": 32, "shift": 1.0, "latent_scale": 0.125}
POSITIVE = "a lighthouse on a rocky coast at sunset, dramatic clouds, highly detailed photograph"
NEGATIVE = "blurry, low quality, watermark, text"
NESTED_SD = {"outer_steps": 4, "inner_steps": 10, "cfg": 7.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
             "outer_eta": 0.0, "outer_step": "auto"}


def _nested_vs_vanilla(w: Workflow, model, positive, negative, latent, sampling: dict, first_id: int, vae_pos,
                       prefix: str) -> tuple:
    """The demo's pair: NestedKSampler (4 x 10) and KSampler (40 steps) on the same seed, both decoded and saved,
    and the nested run's Outer Step Preview. Returns (nested, vanilla, vae, result nodes)."""
    nested = w.add("NestedKSampler", (420, 110), {"seed": 7, "outer_steps": 4, "inner_steps": 10, **sampling,
                                                  "outer_eta": 0.0, "outer_step": "auto"},
                   id=first_id, title="Nested KSampler (anytime)", color="nested", size=(320, 660), model=model,
                   positive=positive, negative=negative, latent_image=latent)
    vanilla = w.add("KSampler", (780, 110), {"seed": 7, "steps": 40, **sampling},
                    id=first_id + 1, title="Vanilla KSampler (same NFEs)", size=(320, 660), model=model,
                    positive=positive, negative=negative, latent_image=latent)
    vae = w.add("VAELoader", vae_pos, {"vae_name": "pixel_space"}, id=first_id + 2, title="Pixel-space VAE")
    decode_nested = w.add("VAEDecode", (1160, 110), id=first_id + 3, title="Decode nested", samples=nested.out(0),
                          vae=vae.out(0))
    save_nested = w.add("SaveImage", (1360, 110), {"filename_prefix": f"{prefix}nested"}, id=first_id + 4,
                        title="Save nested", size=(320, 300), images=decode_nested.out(0))
    decode_vanilla = w.add("VAEDecode", (1160, 480), id=first_id + 5, title="Decode vanilla", samples=vanilla.out(0),
                           vae=vae.out(0))
    save_vanilla = w.add("SaveImage", (1360, 480), {"filename_prefix": f"{prefix}vanilla"}, id=first_id + 6,
                         title="Save vanilla", size=(320, 290), images=decode_vanilla.out(0))
    w.add("OuterStepPreview", (1740, 110), id=first_id + 7, title="Outer Step Preview (nested)", size=(560, 660),
          previews=nested.out(1), vae=vae.out(0))
    return nested, vanilla, vae, [decode_nested, save_nested, decode_vanilla, save_vanilla]


def nested_vs_vanilla_exemplar() -> Workflow:
    w = Workflow("nested_vs_vanilla_exemplar", "Nested vs vanilla KSampler (exemplar model, runs anywhere)",
                 "The demo: NestedKSampler (4 outer x 10 inner) next to KSampler with the same 40 steps, on the "
                 "built-in exact exemplar model; no downloads.", runnable=True)
    model = w.add("NestedExemplarModel", (40, 110), {**EXEMPLAR, "latent_scale": 0.05}, id=1,
                  title="Exemplar Mixture Model (testing)")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 360), {"width": 32, "height": 32, "batch_size": 4}, id=2,
                   title="Empty pixel latent")
    sampling = {"cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    nested, vanilla, vae, results = _nested_vs_vanilla(w, model.out(0), model.out(1), model.out(1), latent.out(0),
                                                       sampling, 3, (40, 530), "nested_demo/")
    w.note("**Nested vs vanilla, same cost.** Both samplers spend 40 model calls on the same seed. The "
                  "nested one runs 4 outer steps of a complete 10-step inner diffusion: its preview (and *Outer Step "
                  "Preview*) shows a finished image after every outer step, one row per outer step, 4 batch items "
                  "each. The model is the pack's exact *Exemplar Mixture Model* over eight 32x32 pictures, so this "
                  "runs in seconds on a CPU with no downloads; `pixel_space` is ComfyUI's built-in pixel VAE.",
                  (40, 700), size=(340, 260))
    w.group("Exact model, no downloads", [model, latent, vae], "model")
    w.group("Same seed, 40 NFEs each", [nested, vanilla], "sample")
    w.group("Results", results, "output")
    return w


def nested_vs_vanilla_digits() -> Workflow:
    w = Workflow("nested_vs_vanilla_digits", "Nested vs vanilla KSampler (learned digits model, runs anywhere)",
                 "The demo on a learned model: NestedKSampler (4 outer x 10 inner) next to KSampler with the same 40 "
                 "steps, on the pack's small digits UNet (16x16, trained here); no downloads.", runnable=True)
    model = w.add("NestedDigitsModel", (40, 110), {"variant": "eps"}, id=1, title="Digits Model (nested demo)")
    positive = w.add("NestedDigitsPrompt", (40, 230), {"digit": "3"}, id=2, title="Digit", color="positive")
    negative = w.add("NestedDigitsPrompt", (40, 350), {"digit": "any"}, id=3, title="Any digit (CFG negative)",
                     color="negative")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 470), {"width": 16, "height": 16, "batch_size": 8}, id=4,
                   title="Empty pixel latent")
    sampling = {"cfg": 2.0, "sampler_name": "euler_ancestral", "scheduler": "normal", "denoise": 1.0}
    nested, vanilla, vae, results = _nested_vs_vanilla(w, model.out(0), positive.out(0), negative.out(0), latent.out(0),
                                                       sampling, 5, (40, 640), "nested_demo/digits_")
    w.note("**A learned model, same cost.** The *Digits Model* is a small UNet of ComfyUI's own class, trained in "
           "this pack on scikit-learn's handwritten digits (eps variant; a rectified-flow variant too). Both samplers "
           "spend 40 model calls on the same seed with CFG 2 for the digit 3. The nested one shows a finished digit "
           "after every 10-call inner diffusion; KSampler's preview is a blur until late.", (40, 760), size=(340, 240))
    w.group("Learned model, no downloads", [model, positive, negative, latent, vae], "model")
    w.group("Same seed, 40 NFEs each", [nested, vanilla], "sample")
    w.group("Results", results, "output")
    return w


def _sd_txt2img(name: str, title: str, ckpt: str, size: int, prefix: str, summary: str) -> Workflow:
    w = Workflow(name, title, summary, runnable=False, needs=(ckpt,))
    ckpt_node = w.add("CheckpointLoaderSimple", (40, 140), {"ckpt_name": ckpt}, title="Load Checkpoint")
    positive = w.add("CLIPTextEncode", (420, 110), {"text": POSITIVE}, title="Positive prompt", color="positive",
                     clip=ckpt_node.out(1))
    negative = w.add("CLIPTextEncode", (420, 320), {"text": NEGATIVE}, title="Negative prompt", color="negative",
                     clip=ckpt_node.out(1))
    latent = w.add("EmptyLatentImage", (420, 540), {"width": size, "height": size, "batch_size": 1})
    sampler = w.add("NestedKSampler", (880, 110), {"seed": 42, "denoise": 1.0, **NESTED_SD}, color="nested",
                    model=ckpt_node.out(0), positive=positive.out(0), negative=negative.out(0),
                    latent_image=latent.out(0))
    decode = w.add("VAEDecode", (1240, 110), samples=sampler.out(0), vae=ckpt_node.out(2))
    save = w.add("SaveImage", (1440, 110), {"filename_prefix": prefix}, size=(420, 460), images=decode.out(0))
    preview = w.add("OuterStepPreview", (1240, 660), size=(620, 500), previews=sampler.out(1), vae=ckpt_node.out(2))
    w.note(f"**{title}.** Put `{ckpt}` in `models/checkpoints` (or pick your own checkpoint). NestedKSampler "
           "splits 40 steps into 4 outer x 10 inner: after every outer step its preview shows a finished image "
           "(not KSampler's blurry guess) and *Outer Step Preview* collects them, labelled with the model calls "
           "spent. The whole run costs what KSampler with 40 steps costs.", (40, 330), size=(340, 250))
    w.group("Model and prompt", [ckpt_node, positive, negative, latent], "model")
    w.group("Anytime sampling", [sampler, decode, save, preview], "sample")
    w.card = [ckpt_node, positive, sampler, decode, save]
    return w


def sd15_txt2img_nested() -> Workflow:
    return _sd_txt2img("sd15_txt2img_nested", "SD1.5 text to image, nested (anytime)",
                       "v1-5-pruned-emaonly-fp16.safetensors", 512, "nested/sd15",
                       "SD1.5 txt2img with NestedKSampler: 4 outer x 10 inner dpmpp_2m karras, cfg 7, 512x512.")


def sdxl_txt2img_nested() -> Workflow:
    return _sd_txt2img("sdxl_txt2img_nested", "SDXL text to image, nested (anytime)",
                       "sd_xl_base_1.0.safetensors", 1024, "nested/sdxl",
                       "SDXL txt2img with NestedKSampler: 4 outer x 10 inner dpmpp_2m karras, cfg 7, 1024x1024.")


def _sd15_image_base(w: Workflow) -> tuple:
    ckpt = w.add("CheckpointLoaderSimple", (40, 140), {"ckpt_name": "v1-5-pruned-emaonly-fp16.safetensors"},
                 title="Load Checkpoint")
    positive = w.add("CLIPTextEncode", (420, 110), {"text": POSITIVE}, title="Positive prompt", color="positive",
                     clip=ckpt.out(1))
    negative = w.add("CLIPTextEncode", (420, 320), {"text": NEGATIVE}, title="Negative prompt", color="negative",
                     clip=ckpt.out(1))
    image = w.add("LoadImage", (40, 540), {"image": "example.png"}, title="Load Image (512 px works best)")
    return ckpt, positive, negative, image


def sd15_img2img_nested() -> Workflow:
    w = Workflow("sd15_img2img_nested", "SD1.5 image to image, nested (anytime)",
                 "SD1.5 img2img: LoadImage -> VAEEncode -> NestedKSampler with denoise 0.6.", runnable=False,
                 needs=("v1-5-pruned-emaonly-fp16.safetensors", "an input image"))
    ckpt, positive, negative, image = _sd15_image_base(w)
    encode = w.add("VAEEncode", (420, 560), pixels=image.out(0), vae=ckpt.out(2))
    sampler = w.add("NestedKSampler", (880, 110), {"seed": 42, "denoise": 0.6, **NESTED_SD}, color="nested",
                    model=ckpt.out(0), positive=positive.out(0), negative=negative.out(0), latent_image=encode.out(0))
    decode = w.add("VAEDecode", (1240, 110), samples=sampler.out(0), vae=ckpt.out(2))
    save = w.add("SaveImage", (1440, 110), {"filename_prefix": "nested/sd15_img2img"}, size=(420, 460),
                 images=decode.out(0))
    preview = w.add("OuterStepPreview", (1240, 660), size=(620, 500), previews=sampler.out(1), vae=ckpt.out(2))
    w.note("**Image to image.** Load a picture (about 512 px), describe what it should become, and run. "
           "`denoise` 0.6 starts where a 40-step KSampler with denoise 0.6 would start; the outer steps split what "
           "is left, and every one of them ends with a finished image. Lower denoise keeps more of the input.",
           (40, 920), size=(340, 220))
    w.group("Model, prompt and input image", [ckpt, positive, negative, image, encode], "model")
    w.group("Anytime sampling", [sampler, decode, save, preview], "sample")
    w.card = [ckpt, image, encode, sampler, decode]
    return w


def sd15_inpaint_nested() -> Workflow:
    w = Workflow("sd15_inpaint_nested", "SD1.5 inpainting, nested (anytime)",
                 "SD1.5 inpainting: LoadImage (mask from its alpha) -> VAEEncode -> SetLatentNoiseMask -> "
                 "NestedKSampler.", runnable=False, needs=("v1-5-pruned-emaonly-fp16.safetensors", "an input image"))
    ckpt, positive, negative, image = _sd15_image_base(w)
    encode = w.add("VAEEncode", (420, 560), pixels=image.out(0), vae=ckpt.out(2))
    masked = w.add("SetLatentNoiseMask", (420, 660), samples=encode.out(0), mask=image.out(1))
    sampler = w.add("NestedKSampler", (880, 110), {"seed": 42, "denoise": 0.9, **NESTED_SD}, color="nested",
                    model=ckpt.out(0), positive=positive.out(0), negative=negative.out(0), latent_image=masked.out(0))
    decode = w.add("VAEDecode", (1240, 110), samples=sampler.out(0), vae=ckpt.out(2))
    save = w.add("SaveImage", (1440, 110), {"filename_prefix": "nested/sd15_inpaint"}, size=(420, 460),
                 images=decode.out(0))
    preview = w.add("OuterStepPreview", (1240, 660), size=(620, 500), previews=sampler.out(1), vae=ckpt.out(2))
    w.note("**Inpainting.** Load a picture, right-click *Load Image* > *Open in MaskEditor* and paint the part to "
           "redraw (the mask is the image's alpha). SetLatentNoiseMask keeps everything outside the mask; inside "
           "it every outer step ends with a finished fill. With an inpainting checkpoint use VAEEncodeForInpaint "
           "and denoise 1.0 instead.", (40, 920), size=(340, 240))
    w.group("Model, prompt, image and mask", [ckpt, positive, negative, image, encode, masked], "model")
    w.group("Anytime sampling", [sampler, decode, save, preview], "sample")
    w.card = [ckpt, image, encode, masked, sampler, decode]
    return w


def exemplar_img2img_inpaint_nested() -> Workflow:
    w = Workflow("exemplar_img2img_inpaint_nested", "Image to image and inpainting, nested (exemplar model)",
                 "img2img (denoise 0.4) and inpainting (right half masked) with NestedKSampler on the built-in exact "
                 "exemplar model; the source image is itself a nested txt2img result. No downloads.", runnable=True)
    model = w.add("NestedExemplarModel", (40, 110), EXEMPLAR, title="Exemplar Mixture Model (testing)")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 360), {"width": 32, "height": 32, "batch_size": 2},
                   title="Empty pixel latent")
    vae = w.add("VAELoader", (40, 530), {"vae_name": "pixel_space"}, title="Pixel-space VAE")
    common = {"outer_steps": 4, "inner_steps": 10, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
              "outer_eta": 0.0, "outer_step": "auto"}
    source = w.add("NestedKSampler", (420, 110), {"seed": 1, "denoise": 1.0, **common}, title="Source (txt2img)",
                   color="nested", model=model.out(0), positive=model.out(1), negative=model.out(1),
                   latent_image=latent.out(0))
    source_image = w.add("VAEDecode", (780, 110), title="Decode source", samples=source.out(0), vae=vae.out(0))
    w.add("SaveImage", (780, 240), {"filename_prefix": "nested_examples/source"}, title="Save source",
          size=(300, 300), images=source_image.out(0))
    encode = w.add("VAEEncode", (780, 610), title="Encode source (as LoadImage would)", size=(300, 46),
                   pixels=source_image.out(0), vae=vae.out(0))
    img2img = w.add("NestedKSampler", (1140, 110), {"seed": 2, "denoise": 0.4, **common}, title="img2img (denoise 0.4)",
                    color="nested", model=model.out(0), positive=model.out(1), negative=model.out(1),
                    latent_image=encode.out(0))
    img2img_image = w.add("VAEDecode", (1500, 110), title="Decode img2img", samples=img2img.out(0), vae=vae.out(0))
    w.add("SaveImage", (1700, 110), {"filename_prefix": "nested_examples/img2img"}, title="Save img2img",
          size=(300, 280), images=img2img_image.out(0))
    empty_mask = w.add("SolidMask", (420, 880), {"value": 0.0, "width": 32, "height": 32}, title="Keep (0)")
    fill_mask = w.add("SolidMask", (420, 1040), {"value": 1.0, "width": 16, "height": 32}, title="Redraw (1)")
    mask = w.add("MaskComposite", (780, 880), {"x": 16, "y": 0, "operation": "add"}, title="Mask: right half",
                 destination=empty_mask.out(0), source=fill_mask.out(0))
    masked = w.add("SetLatentNoiseMask", (780, 1060), samples=encode.out(0), mask=mask.out(0))
    inpaint = w.add("NestedKSampler", (1140, 880), {"seed": 3, "denoise": 1.0, **common},
                    title="Inpaint (right half)", color="nested", model=model.out(0), positive=model.out(1),
                    negative=model.out(1), latent_image=masked.out(0))
    inpaint_image = w.add("VAEDecode", (1500, 880), title="Decode inpaint", samples=inpaint.out(0), vae=vae.out(0))
    w.add("SaveImage", (1700, 880), {"filename_prefix": "nested_examples/inpaint"}, title="Save inpaint",
          size=(300, 280), images=inpaint_image.out(0))
    w.add("OuterStepPreview", (2040, 110), title="Outer steps: img2img", size=(440, 640), previews=img2img.out(1),
          vae=vae.out(0))
    w.add("OuterStepPreview", (2040, 880), title="Outer steps: inpaint", size=(440, 640), previews=inpaint.out(1),
          vae=vae.out(0))
    w.note("**img2img and inpainting on the exact model.** The source is a nested txt2img sample; it is encoded "
           "again (as a LoadImage picture would be), redrawn with denoise 0.4 (it stays on the "
           "picture; at 0.6 about one image in six moves to another exemplar, with KSampler as with NestedKSampler), "
           "and its right half is inpainted "
           "through SetLatentNoiseMask: the left half stays as it was. Replace the exemplar model with "
           "CheckpointLoaderSimple, and the source with LoadImage, for the same workflow on a real model.",
           (40, 700), size=(340, 260))
    w.group("Exact model, no downloads", [model, latent, vae], "model")
    w.group("Mask", [empty_mask, fill_mask, mask, masked], "mask")
    return w


def flux_custom_advanced_nested() -> Workflow:
    w = Workflow("flux_custom_advanced_nested", "Flux dev with SamplerCustomAdvanced, nested (anytime)",
                 "Flux.1 dev: NestedSampler as the SAMPLER of SamplerCustomAdvanced, BasicGuider + FluxGuidance, "
                 "BasicScheduler simple 5 steps = 4 outer steps.", runnable=False,
                 needs=("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"))
    unet = w.add("UNETLoader", (40, 110), {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"},
                 title="Load Diffusion Model")
    clip = w.add("DualCLIPLoader", (40, 260), {"clip_name1": "clip_l.safetensors",
                                               "clip_name2": "t5xxl_fp16.safetensors", "type": "flux",
                                               "device": "default"})
    vae = w.add("VAELoader", (40, 460), {"vae_name": "ae.safetensors"}, title="Load VAE")
    prompt = w.add("CLIPTextEncode", (420, 110), {"text": POSITIVE}, title="Prompt", color="positive",
                   clip=clip.out(0))
    guidance = w.add("FluxGuidance", (420, 330), {"guidance": 3.5}, conditioning=prompt.out(0))
    guider = w.add("BasicGuider", (420, 450), model=unet.out(0), conditioning=guidance.out(0))
    scheduler = w.add("BasicScheduler", (420, 560), {"scheduler": "simple", "steps": 5, "denoise": 1.0},
                      title="Outer schedule (N+1 steps = N outer)", model=unet.out(0))
    inner = w.add("InnerSolverSelect", (880, 110), {"sampler_name": "dpmpp_2m", "scheduler": "simple", "steps": 5,
                                                    "eta": 0.85, "s_noise": 1.0, "step_schedule": ""},
                  color="nested")
    sampler = w.add("NestedSampler", (880, 380), {"outer_eta": 0.0, "outer_step": "auto"}, color="nested", inner_solver=inner.out(0))
    noise = w.add("RandomNoise", (880, 560), {"noise_seed": 42})
    latent = w.add("EmptySD3LatentImage", (880, 700), {"width": 1024, "height": 1024, "batch_size": 1})
    sample = w.add("SamplerCustomAdvanced", (1240, 110), noise=noise.out(0), guider=guider.out(0),
                   sampler=sampler.out(0), sigmas=scheduler.out(0), latent_image=latent.out(0))
    decode = w.add("VAEDecode", (1580, 110), samples=sample.out(0), vae=vae.out(0))
    w.add("SaveImage", (1780, 110), {"filename_prefix": "nested/flux"}, size=(460, 500), images=decode.out(0))
    w.note("**Flux with SamplerCustomAdvanced.** Files: `flux1-dev.safetensors` in `models/diffusion_models`, "
           "`clip_l.safetensors` and `t5xxl_fp16.safetensors` in `models/text_encoders`, `ae.safetensors` in "
           "`models/vae`. NestedSampler takes its outer steps from the SIGMAS: BasicScheduler with 5 steps gives "
           "4 outer steps (the last non-zero sigma is dropped, since the last inner diffusion ends at 0). Each "
           "runs a 5-step inner euler diffusion: 20 model calls in all. SamplerCustomAdvanced's preview shows the "
           "finished image of every outer step.", (40, 640), size=(340, 300))
    w.group("Flux.1 dev", [unet, clip, vae], "model")
    w.group("Nested sampler", [inner, sampler, noise, latent], "sample")
    w.card = [unet, guider, inner, sampler, sample, decode]
    return w


def exemplar_custom_advanced_nested() -> Workflow:
    w = Workflow("exemplar_custom_advanced_nested", "SamplerCustomAdvanced + NestedSampler (exemplar flow model)",
                 "NestedSampler in SamplerCustomAdvanced with CFGGuider and BasicScheduler (simple, 5 steps = 4 "
                 "outer) on the exact exemplar model in flow (SD3/Flux-style) mode. No downloads.", runnable=True)
    model = w.add("NestedExemplarModel", (40, 110), {**EXEMPLAR, "prediction": "flow", "shift": 3.0},
                  title="Exemplar Mixture Model (flow)")
    vae = w.add("VAELoader", (40, 360), {"vae_name": "pixel_space"}, title="Pixel-space VAE")
    guider = w.add("CFGGuider", (420, 110), {"cfg": 1.0}, model=model.out(0), positive=model.out(1),
                   negative=model.out(1))
    scheduler = w.add("BasicScheduler", (420, 270), {"scheduler": "simple", "steps": 5, "denoise": 1.0},
                      title="Outer schedule (N+1 steps = N outer)", model=model.out(0))
    inner = w.add("InnerSolverSelect", (420, 440), {"sampler_name": "euler_ancestral", "scheduler": "normal",
                                                    "steps": 10, "eta": 0.85, "s_noise": 1.0, "step_schedule": ""},
                  title="Inner solver (the paper's DDIM, eta 0.85)", color="nested")
    sampler = w.add("NestedSampler", (760, 440), {"outer_eta": 0.0, "outer_step": "auto"}, color="nested", inner_solver=inner.out(0))
    noise = w.add("RandomNoise", (760, 110), {"noise_seed": 42})
    latent = w.add("EmptyChromaRadianceLatentImage", (760, 250), {"width": 32, "height": 32, "batch_size": 4},
                   title="Empty pixel latent")
    sample = w.add("SamplerCustomAdvanced", (1130, 110), noise=noise.out(0), guider=guider.out(0),
                   sampler=sampler.out(0), sigmas=scheduler.out(0), latent_image=latent.out(0))
    decode = w.add("VAEDecode", (1480, 110), samples=sample.out(0), vae=vae.out(0))
    w.add("SaveImage", (1680, 110), {"filename_prefix": "nested_examples/custom_advanced"}, size=(360, 360),
          images=decode.out(0))
    w.note("**NestedSampler for SamplerCustomAdvanced.** Any SIGMAS give the outer steps (here BasicScheduler, 5 "
           "steps = 4 outer), any guider the guidance (CFGGuider here; BasicGuider + FluxGuidance for Flux). The "
           "model is the pack's exact exemplar model in flow mode with shift 3, so it runs anywhere in seconds. "
           "The sampler's preview shows the finished image of every outer step.", (40, 500), size=(340, 240))
    w.group("Exact model (flow), no downloads", [model, vae], "model")
    w.group("Nested sampler", [inner, sampler], "sample")
    return w


# Staged runs (NestedKSamplerAdvanced): the paper's section 5, generation with human feedback (Figure 7) and a
# prompt that gains detail after the first outer step (Figure 8). Both stages share seed and steps, so stage 1
# (outer step 1, leftover noise) + stage 2 (outer steps 2 to 4, added noise off) is one 4-step nested run.
STAGED = {"noise_seed": 42, "outer_steps": 4, "inner_steps": 8, "sampler_name": "euler_ancestral",
          "scheduler": "normal", "outer_eta": 0.0, "outer_step": "auto"}
STAGE_1 = {"add_noise": "enable", "start_at_outer_step": 0, "end_at_outer_step": 1,
           "return_with_leftover_noise": "enable"}
STAGE_2 = {"add_noise": "disable", "start_at_outer_step": 1, "end_at_outer_step": 4,
           "return_with_leftover_noise": "disable"}


def exemplar_pick_candidate_nested() -> Workflow:
    w = Workflow("exemplar_pick_candidate_nested", "Pick a candidate after outer step 1 (paper Figure 7, exemplar model)",
                 "Generation with human feedback: stage 1 (NestedKSamplerAdvanced, outer step 1 of 4) makes 4 "
                 "candidates; Pick Candidate keeps #2 in every batch slot; stage 2 (outer steps 2-4) makes 4 "
                 "variations of it with the paper's inner DDIM (eta 0.85). No downloads.", runnable=True)
    # latent_scale 0.35 (not 0.125): the exemplars lie far enough apart that outer step 1 already settles which
    # picture a candidate is, as a real model settles its composition early; at 0.125 the noise left at the
    # second outer sigma can still turn a candidate into another exemplar.
    model = w.add("NestedExemplarModel", (40, 110), {**EXEMPLAR, "latent_scale": 0.35},
                  title="Exemplar Mixture Model (testing)")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 360), {"width": 32, "height": 32, "batch_size": 4},
                   title="Empty pixel latent (4 candidates)")
    vae = w.add("VAELoader", (40, 530), {"vae_name": "pixel_space"}, title="Pixel-space VAE")
    inner = w.add("InnerSolverSelect", (40, 660), {"sampler_name": "euler_ancestral", "scheduler": "normal",
                                                   "steps": 8, "eta": 0.85, "s_noise": 1.0, "step_schedule": ""},
                  title="Inner solver (the paper's DDIM, eta 0.85)", color="nested")
    stage1 = w.add("NestedKSamplerAdvanced", (420, 110), {**STAGED, **STAGE_1, "cfg": 1.0},
                   title="Stage 1: outer step 1 of 4", color="nested", model=model.out(0), positive=model.out(1),
                   negative=model.out(1), latent_image=latent.out(0), inner_solver=inner.out(0))
    candidates = w.add("OuterStepPreview", (780, 110), title="Stage 1 candidates", size=(420, 440),
                       previews=stage1.out(1), vae=vae.out(0))
    pick = w.add("NestedPickCandidate", (780, 620), {"index": 2}, title="Pick Candidate: set index, re-queue",
                 color="nested", size=(420, 470), samples=stage1.out(0), outer_previews=stage1.out(1), vae=vae.out(0))
    stage2 = w.add("NestedKSamplerAdvanced", (1260, 110), {**STAGED, **STAGE_2, "cfg": 1.0},
                   title="Stage 2: outer steps 2-4", color="nested", model=model.out(0), positive=model.out(1),
                   negative=model.out(1), latent_image=pick.out(0), inner_solver=inner.out(0))
    decode = w.add("VAEDecode", (1620, 110), samples=stage2.out(0), vae=vae.out(0))
    w.add("SaveImage", (1620, 220), {"filename_prefix": "nested_examples/picked"}, title="Variations of the pick",
          size=(400, 400), images=decode.out(0))
    w.add("OuterStepPreview", (1620, 690), title="Stage 2 outer steps", size=(400, 520), previews=stage2.out(1),
          vae=vae.out(0))
    w.note("**Pick a candidate (paper Figure 7).** Stage 1 runs only the first of 4 outer steps: after it, each of "
           "the 4 batch items already is a finished image (*Stage 1 candidates*), at a quarter of the cost. Look at "
           "them, set *Pick Candidate*'s `index` (0-3) and queue again: ComfyUI's cache keeps stage 1, so only the "
           "pick and stage 2 run. The pick's noisy outer state replaces every batch slot, and stage 2 (outer steps "
           "2-4, `add_noise` disable, same seed and steps) finishes 4 variations of it: the stochastic inner solver "
           "(DDIM eta 0.85) makes them differ. Change the seed to get new candidates. The model's `latent_scale` is 0.35 "
           "here so that outer step 1 already settles which picture a candidate is, as the composition of a real "
           "model's image is settled early.", (40, 920), size=(340, 380))
    w.group("Exact model, no downloads", [model, latent, vae, inner], "model")
    w.group("Choose", [candidates, pick], "guide")
    return w


def exemplar_prompt_refine_nested() -> Workflow:
    w = Workflow("exemplar_prompt_refine_nested", "Add detail to the prompt after outer step 1 (paper Figure 8, exemplar model)",
                 "A prompt that gains detail mid-run: stage 1 (outer step 1 of 4) samples the broad prompt 'red disc, "
                 "blue square, cyan ring, smiley'; stage 2 (outer steps 2-4) continues with 'smiley'. Exemplar "
                 "Prompt makes the exact model class-conditional; cfg 1.5 against the empty conditioning. No "
                 "downloads.", runnable=True)
    model = w.add("NestedExemplarModel", (40, 110), EXEMPLAR, title="Exemplar Mixture Model (testing)")
    latent = w.add("EmptyChromaRadianceLatentImage", (40, 360), {"width": 32, "height": 32, "batch_size": 4},
                   title="Empty pixel latent")
    vae = w.add("VAELoader", (40, 530), {"vae_name": "pixel_space"}, title="Pixel-space VAE")
    broad = w.add("NestedExemplarPrompt", (420, 110), {"text": "red disc, blue square, cyan ring, smiley"},
                  title="Stage 1 prompt (broad)", color="positive", size=(340, 82), model=model.out(0))
    narrow = w.add("NestedExemplarPrompt", (420, 260), {"text": "smiley"}, title="Stage 2 prompt (the added detail)",
                   color="positive", size=(340, 82), model=model.out(0))
    stage1 = w.add("NestedKSamplerAdvanced", (820, 110), {**STAGED, **STAGE_1, "cfg": 1.5},
                   title="Stage 1: outer step 1 of 4", color="nested", model=model.out(0), positive=broad.out(0),
                   negative=model.out(1), latent_image=latent.out(0))
    stage2 = w.add("NestedKSamplerAdvanced", (1180, 110), {**STAGED, **STAGE_2, "cfg": 1.5},
                   title="Stage 2: outer steps 2-4", color="nested", model=model.out(0), positive=narrow.out(0),
                   negative=model.out(1), latent_image=stage1.out(0))
    decode = w.add("VAEDecode", (1540, 110), samples=stage2.out(0), vae=vae.out(0))
    w.add("SaveImage", (1540, 220), {"filename_prefix": "nested_examples/refined"}, title="Final images",
          size=(400, 400), images=decode.out(0))
    w.add("OuterStepPreview", (420, 400), title="Stage 1 (broad prompt)", size=(340, 450), previews=stage1.out(1),
          vae=vae.out(0))
    w.add("OuterStepPreview", (1540, 690), title="Stage 2 outer steps (smiley)", size=(400, 520),
          previews=stage2.out(1), vae=vae.out(0))
    w.note("**Add detail to the prompt mid-run (paper Figure 8).** The *Exemplar Prompt* is this test model's "
           "text prompt: the exemplars it may sample. Stage 1 runs outer step 1 of 4 with the broad prompt and "
           "hands its noisy outer state (leftover noise) to stage 2, which runs outer steps 2-4 with the detailed "
           "prompt. Every final image follows the detail. Edit the stage 2 prompt and queue again: ComfyUI's "
           "cache keeps stage 1, so only stage 2 runs. With a real model, use two CLIPTextEncode prompts the same "
           "way.", (40, 700), size=(340, 300))
    w.group("Exact model, no downloads", [model, latent, vae], "model")
    w.group("Prompts", [broad, narrow], "guide")
    return w


WORKFLOWS = [nested_vs_vanilla_exemplar, nested_vs_vanilla_digits, sd15_txt2img_nested, sdxl_txt2img_nested, sd15_img2img_nested,
             sd15_inpaint_nested, exemplar_img2img_inpaint_nested, flux_custom_advanced_nested,
             exemplar_custom_advanced_nested, exemplar_pick_candidate_nested, exemplar_prompt_refine_nested]


def all_workflows() -> list[Workflow]:
    from comfyui_nested_diffusion.tools.inverse_workflows import inverse_workflows

    return [build() for build in WORKFLOWS + inverse_workflows(Workflow, EXEMPLAR)]


# -- files ------------------------------------------------------------------------------------------------------
def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def editor_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.json"


def thumbnail_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.jpg"


def expected_files() -> dict[Path, str]:
    """Every JSON file this script writes, with its text (legacy API files are checked, not written)."""
    files = {}
    for workflow in all_workflows():
        files[editor_path(workflow.name)] = dumps(workflow.editor())
        if workflow.name not in LEGACY_API_FILES:
            files[api_path(workflow.name)] = dumps(workflow.api())
    return files


def legacy_mismatches() -> list[str]:
    """Differences between a legacy API file and the API form of its editor workflow built here."""
    problems = []
    for workflow in all_workflows():
        path = LEGACY_API_FILES.get(workflow.name)
        if path is None:
            continue
        on_disk = json.loads(path.read_text(encoding="utf-8"))
        built = workflow.api()
        if on_disk != built:
            problems.append(f"{path.name} differs from the API form of {workflow.name}.json")
    return problems


def write_files() -> list[Path]:
    written = []
    for path, text in expected_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def check_files() -> list[str]:
    problems = []
    for path, text in expected_files().items():
        if not path.exists():
            problems.append(f"missing: {path.relative_to(REPO_ROOT)}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"out of date: {path.relative_to(REPO_ROOT)}")
    return problems + legacy_mismatches()


# -- thumbnails -------------------------------------------------------------------------------------------------
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def title_card(workflow: Workflow):
    """A labelled diagram naming the workflow: not an output (it needs model weights this script cannot run)."""
    from PIL import Image, ImageDraw

    size = THUMBNAIL_SIZE
    card = Image.new("RGB", (size, size), (24, 27, 33))
    draw = ImageDraw.Draw(card)
    draw.rectangle([0, 0, size, 6], fill=(63, 120, 158))
    y = 20
    for line in _wrap(draw, workflow.title, _font(24), size - 40):
        draw.text((20, y), line, fill=(240, 240, 240), font=_font(24))
        y += 30
    y += 8
    chain = workflow.card
    box_w, box_h, gap = size - 80, 26, 10
    for index, node in enumerate(chain):
        fill = (51, 51, 85) if node.schema.pack else (53, 53, 53)
        draw.rounded_rectangle([40, y, 40 + box_w, y + box_h], radius=6, fill=fill, outline=(110, 110, 120))
        draw.text((50, y + 5), node.title or node.type, fill=(230, 230, 230), font=_font(14))
        if index < len(chain) - 1:
            draw.line([size // 2, y + box_h, size // 2, y + box_h + gap], fill=(150, 150, 160), width=2)
        y += box_h + gap
    y = max(y + 4, size - 78)
    needs = "needs " + ", ".join(workflow.needs)
    for line in _wrap(draw, needs, _font(13), size - 40)[:3]:
        draw.text((20, y), line, fill=(200, 180, 120), font=_font(13))
        y += 17
    draw.text((20, size - 22), "title card: no output rendered (needs weights)", fill=(140, 140, 150), font=_font(12))
    return card


def _tile(image, size: int):
    from PIL import Image

    return image.convert("RGB").resize((size, size), Image.NEAREST)


def _label(draw, xy, text, size=14, fill=(235, 235, 235)):
    draw.text(xy, text, fill=fill, font=_font(size))


def render_thumbnail(workflow: Workflow, images: dict):
    """A thumbnail from the outputs of a real run: ``images`` maps node id -> list of PIL images."""
    from PIL import Image, ImageDraw

    size = THUMBNAIL_SIZE
    card = Image.new("RGB", (size, size), (24, 27, 33))
    draw = ImageDraw.Draw(card)
    if workflow.name in ("nested_vs_vanilla_exemplar", "nested_vs_vanilla_digits"):
        # Rows: the 4 outer steps of nested batch item 1 and 2; last row: vanilla's finals.
        ids = {node.title: str(node.id) for node in workflow.nodes}
        shown = [_crop_labelled(image) for image in images[ids["Outer Step Preview (nested)"]]]
        batch = next(node.widgets["batch_size"] for node in workflow.nodes if node.type == "EmptyChromaRadianceLatentImage")
        _label(draw, (12, 8), "nested: a finished image every outer step", 15)
        tile, gap, x0, y0 = 84, 10, 12, 32
        for row in range(2):
            for step in range(4):
                card.paste(_tile(shown[step * batch + row], tile), (x0 + step * (tile + gap), y0 + row * (tile + gap)))
        for step in range(4):
            _label(draw, (x0 + step * (tile + gap) + 14, y0 + 2 * (tile + gap) + 2), f"outer {step + 1}", 13,
                   (170, 170, 180))
        y1 = y0 + 2 * (tile + gap) + 26
        _label(draw, (12, y1), "final images: nested (top) and vanilla, same 40 NFEs", 13)
        small = 44
        for index, image in enumerate(images[ids["Save nested"]][:4]):
            card.paste(_tile(image, small), (12 + index * (small + 6), y1 + 20))
        for index, image in enumerate(images[ids["Save vanilla"]][:4]):
            card.paste(_tile(image, small), (12 + index * (small + 6), y1 + 20 + small + 6))
    elif workflow.name == "exemplar_img2img_inpaint_nested":
        ids = {n.title: str(n.id) for n in workflow.nodes}
        columns = [("source", ids["Save source"]), ("img2img 0.4", ids["Save img2img"]),
                   ("inpaint right", ids["Save inpaint"])]
        _label(draw, (12, 8), "exemplar model: img2img and inpainting", 15)
        tile, gap, x0, y0 = 116, 10, 14, 56
        for column, (label, node_id) in enumerate(columns):
            _label(draw, (x0 + column * (tile + gap), 32), label, 14, (200, 200, 210))
            for row, image in enumerate(images[node_id][:2]):
                card.paste(_tile(image, tile), (x0 + column * (tile + gap), y0 + row * (tile + gap)))
        x = x0 + 2 * (tile + gap) + tile // 2
        for row in range(2):
            top = y0 + row * (tile + gap)
            draw.line([x, top, x, top + tile], fill=(255, 60, 200), width=2)
        _label(draw, (14, y0 + 2 * (tile + gap) + 4), "right half of the inpaint column redrawn, left kept", 13,
               (170, 170, 180))
    elif workflow.name in ("exemplar_pick_candidate_nested", "exemplar_prompt_refine_nested"):
        _staged_thumbnail(workflow, images, card, draw)
    elif workflow.name.startswith("exemplar_inverse_"):
        from comfyui_nested_diffusion.tools.inverse_workflows import render_inverse_thumbnail

        render_inverse_thumbnail(workflow, images, card, draw, _tile, _label, _crop_labelled)
    else:
        save = next(n for n in workflow.nodes if n.type == "SaveImage")
        finals = images[str(save.id)]
        _label(draw, (12, 8), "SamplerCustomAdvanced + NestedSampler", 15)
        tile, gap = 170, 16
        for index, image in enumerate(finals[:4]):
            x = 22 + (index % 2) * (tile + gap)
            y = 40 + (index // 2) * (tile + gap)
            card.paste(_tile(image, tile), (x, y))
    return card


def _staged_thumbnail(workflow: Workflow, images: dict, card, draw) -> None:
    """Two rows: the 4 images after outer step 1 (stage 1), and the 4 final images of stage 2."""
    ids = {n.title: str(n.id) for n in workflow.nodes}
    if workflow.name == "exemplar_pick_candidate_nested":
        heading = "pick a candidate after outer step 1"
        top = [_crop_labelled(image) for image in images[ids["Pick Candidate: set index, re-queue"]]]
        top_label, bottom_label = "outer step 1: 4 candidates, #2 picked", "outer step 4: variations of #2"
        picked = next(n for n in workflow.nodes if n.type == "NestedPickCandidate").widgets["index"]
    else:
        heading = "add detail to the prompt mid-run"
        top = [_crop_labelled(image) for image in images[ids["Stage 1 (broad prompt)"]]]
        top_label, bottom_label = "outer step 1: 'red disc, blue square, ...'", "outer step 4: 'smiley'"
        picked = None
    bottom = images[ids["Variations of the pick" if picked is not None else "Final images"]]
    _label(draw, (12, 8), heading, 16)
    tile, gap, x0 = 86, 8, 14
    for row, (label, row_images, y) in enumerate(((top_label, top, 36), (bottom_label, bottom, 216))):
        _label(draw, (x0, y), label, 14, (200, 200, 210))
        for index, image in enumerate(row_images[:4]):
            x = x0 + index * (tile + gap)
            card.paste(_tile(image, tile), (x, y + 24))
            if row == 0 and index == picked:
                draw.rectangle([x - 3, y + 21, x + tile + 2, y + 24 + tile + 2], outline=(40, 220, 90), width=3)
    draw.line([200, 36 + 24 + tile + 14, 200, 216 - 8], fill=(150, 150, 160), width=2)
    _label(draw, (x0, 370), "stage 1 = outer step 1 of 4; stage 2 = steps 2-4", 13, (170, 170, 180))


def _crop_labelled(image):
    """OuterStepPreview's labelled image: the picture is the square on top of the label bar."""
    return image.crop((0, 0, image.width, image.width))


def run_and_collect(workflows: list[Workflow]) -> dict:
    """Run the runnable workflows on a real ComfyUI (tools/comfy_server.py); node id -> PIL images per workflow."""
    import io

    from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient
    from comfyui_nested_diffusion.tools.comfy_server import ComfyServer
    from PIL import Image

    results = {}
    with ComfyServer(startup_timeout=180) as server, ComfyAPIClient(server.url) as client:
        for workflow in workflows:
            prompt_id, _ = client.run(workflow.api(), timeout=300)
            outputs = client.history(prompt_id)["outputs"]
            results[workflow.name] = {
                node_id: [Image.open(io.BytesIO(client.fetch_output(item)))
                          for item in output.get("images", [])]
                for node_id, output in outputs.items()
            }
    return results


def write_thumbnails() -> list[Path]:
    workflows = all_workflows()
    runs = run_and_collect([w for w in workflows if w.runnable])
    written = []
    for workflow in workflows:
        image = render_thumbnail(workflow, runs[workflow.name]) if workflow.runnable else title_card(workflow)
        path = thumbnail_path(workflow.name)
        image.save(path, "JPEG", quality=88)
        written.append(path)
    return written


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    parser.add_argument("--thumbnails", action="store_true", help="also render the thumbnails (starts ComfyUI)")
    parser.add_argument("--object-info", action="store_true",
                        help=f"first re-save {OBJECT_INFO.name} from a real ComfyUI (starts it)")
    args = parser.parse_args(argv)
    if args.object_info:
        print(f"wrote {write_object_info(fetch_object_info()).relative_to(REPO_ROOT)}")
    if args.check:
        problems = check_files()
        for problem in problems:
            print(problem)
        return 1 if problems else 0
    for path in write_files():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    for problem in legacy_mismatches():
        print(f"WARNING: {problem}")
    if args.thumbnails:
        for path in write_thumbnails():
            print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
