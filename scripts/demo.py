#!/usr/bin/env python
"""The main demo: nested diffusion vs a vanilla KSampler at equal NFEs, in a real ComfyUI server, over its API.

    ./scripts/demo.sh [--outer 4] [--inner 10] [--seed 42] [--out demo_output] [--port P] [--workflow FILE]

Starts ComfyUI (CPU, ``--preview-method auto``) with this pack in ``custom_nodes``, queues
``example_workflows/api/nested_vs_vanilla_digits_api.json`` and then ``nested_vs_vanilla_exemplar_api.json`` over
HTTP (each into its own sub-folder of the output), listens on the websocket while it runs
(progress in NFEs, the nested sampler's anytime preview after every outer step, the KSampler's x0 preview
after every step), then fetches the saved images through ``/history`` and ``/view`` and writes everything
to one folder:

    strip.png              nested row vs vanilla-x0 row, one column per outer boundary ("NFE n"), batch item 1
    strip_batch.png        every batch item of the nested sampler after every outer step
    summary.json           settings, NFEs, timings, sigmas, distances to the exemplars, file paths
    previews/              websocket previews as they arrived: nested_outer{k}.png, vanilla_nfe{n}.png
    outer_step_preview/    OuterStepPreview's labelled images (outer{k}_item{i}.png, i the 0-based batch index)
    final/                 SaveImage results: nested_{i}.png, vanilla_{i}.png

Nodes are found by class_type (NestedKSampler, KSampler, OuterStepPreview, SaveImage), not by id, so
``--workflow`` takes any API-format file: it is queued as is (plus the overrides), whatever previews and
images it produces are saved, and the strips are drawn only when it pairs a NestedKSampler with a KSampler.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT
from comfyui_nested_diffusion.tools import workflow_checks as wc
from comfyui_nested_diffusion.tools.comfy_api_client import ComfyAPIClient, ComfyAPIError
from comfyui_nested_diffusion.tools.comfy_server import ComfyServer, ComfyServerError, stop_on_sigterm
from PIL import Image, ImageDraw, ImageFont  # (installed with ComfyUI)

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_WORKFLOW = REPO_ROOT / "example_workflows" / "api" / "nested_vs_vanilla_exemplar_api.json"
DIGITS_WORKFLOW = REPO_ROOT / "example_workflows" / "api" / "nested_vs_vanilla_digits_api.json"
DEFAULT_WORKFLOWS = (DIGITS_WORKFLOW, DEFAULT_WORKFLOW)  # the learned model first, then the exact one
OUTPUT_MARKER = ".nested_demo_output"
OUTPUT_SUBFOLDERS = ("previews", "final", "outer_step_preview")  # only folders carrying it are ever cleaned
NESTED, VANILLA = "nested", "vanilla"
CELL_SIZE = 128


# -- command line --------------------------------------------------------------------------------------------

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Nested diffusion vs vanilla KSampler at equal NFEs, in a real ComfyUI server driven over its API.")
    parser.add_argument("--workflow", type=Path, action="append", default=None,
                        help="API-format workflow to queue; repeat for several (default: the digits demo, then the "
                             "exemplar demo, each in a folder of its own under --out)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"),
                        help="output folder, created or cleaned (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None, help="server port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--outer", type=int, default=None, help="NestedKSampler outer_steps (default: the workflow's)")
    parser.add_argument("--inner", type=int, default=None, help="NestedKSampler inner_steps (default: the workflow's)")
    parser.add_argument("--seed", type=int, default=None, help="seed of both samplers (default: the workflow's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the prompt may run (default: %(default)s)")
    parser.add_argument("--keep-server-dir", action="store_true",
                        help="keep the server's temporary base directory (its log, output/ and temp/ folders)")
    parser.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu)")
    return parser.parse_args(argv)


# -- the workflow --------------------------------------------------------------------------------------------

def load_workflow(path: Path) -> dict:
    """An API-format prompt ``{node_id: {class_type, inputs}}`` (also accepts ``{"prompt": {...}}``)."""
    data = wc.load(path)
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict):
        data = data["prompt"]
    if wc.is_editor_format(data):
        raise SystemExit(f"{path} is a UI workflow: save it with 'Export (API)' and pass that file")
    if not wc.is_api_format(data):
        raise SystemExit(f"{path} is not an API-format workflow ({{node_id: {{class_type, inputs}}}})")
    return data


def node_sort_key(node_id: str) -> tuple:
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


def nodes_of_class(prompt: dict, class_type: str) -> list[str]:
    return sorted((nid for nid, node in prompt.items() if node.get("class_type") == class_type), key=node_sort_key)


def links_of(node: dict) -> list[str]:
    """The ids of the nodes whose outputs feed this node's inputs."""
    return [str(value[0]) for value in node.get("inputs", {}).values()
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)]


def upstream_nodes(prompt: dict, node_id: str) -> set[str]:
    seen: set[str] = set()
    todo = [node_id]
    while todo:
        for source in links_of(prompt.get(todo.pop(), {})):
            if source in prompt and source not in seen:
                seen.add(source)
                todo.append(source)
    return seen


def node_title(prompt: dict, node_id: str) -> str:
    node = prompt.get(node_id, {})
    return (node.get("_meta") or {}).get("title") or node.get("class_type", f"node {node_id}")


@dataclass
class Pair:
    """The compared samplers: the first NestedKSampler and the KSampler sharing its model and latent."""
    nested: Optional[str]
    vanilla: Optional[str]

    @property
    def complete(self) -> bool:
        return self.nested is not None and self.vanilla is not None


def find_pair(prompt: dict) -> Pair:
    nested = nodes_of_class(prompt, "NestedKSampler")
    vanilla = nodes_of_class(prompt, "KSampler")
    if not nested:
        return Pair(None, vanilla[0] if vanilla else None)
    first = prompt[nested[0]]["inputs"]

    def shared_inputs(node_id: str) -> int:
        inputs = prompt[node_id]["inputs"]
        return sum(inputs.get(name) == first.get(name) for name in ("model", "latent_image", "positive"))

    best = max(vanilla, key=shared_inputs, default=None)  # max keeps the first of equals
    return Pair(nested[0], best)


def apply_overrides(prompt: dict, pair: Pair, outer: Optional[int], inner: Optional[int], seed: Optional[int]) -> None:
    """Set outer/inner/seed on every NestedKSampler; keep the paired KSampler at steps = outer x inner, same seed."""
    if outer is None and inner is None and seed is None:
        return
    for node_id in nodes_of_class(prompt, "NestedKSampler"):
        inputs = prompt[node_id]["inputs"]
        for name, value in (("outer_steps", outer), ("inner_steps", inner), ("seed", seed)):
            if value is not None:
                inputs[name] = value
    if pair.vanilla and not pair.nested and seed is not None:
        prompt[pair.vanilla]["inputs"]["seed"] = seed
    if pair.complete:
        nested = prompt[pair.nested]["inputs"]
        vanilla = prompt[pair.vanilla]["inputs"]
        vanilla["steps"] = int(nested["outer_steps"]) * int(nested["inner_steps"])
        if not isinstance(nested.get("seed"), list):
            vanilla["seed"] = nested["seed"]


def role_of(prompt: dict, node_id: str, pair: Pair) -> str:
    """'nested' or 'vanilla' when the node's images come from that sampler, else 'node{id}'."""
    upstream = upstream_nodes(prompt, node_id)
    if pair.nested in upstream:
        return NESTED
    if pair.vanilla in upstream:
        return VANILLA
    return f"node{node_id}"


def sampler_settings(prompt: dict, pair: Pair) -> dict:
    settings: dict[str, Any] = {"nested_node": pair.nested, "vanilla_node": pair.vanilla}
    if pair.nested:
        inputs = prompt[pair.nested]["inputs"]
        for name in ("outer_steps", "inner_steps", "seed", "sampler_name", "scheduler", "cfg", "denoise", "outer_eta"):
            if name in inputs and not isinstance(inputs[name], list):
                settings[name] = inputs[name]
    if pair.vanilla:
        inputs = prompt[pair.vanilla]["inputs"]
        settings["vanilla"] = {name: inputs[name] for name in ("steps", "seed", "sampler_name", "scheduler", "cfg")
                               if name in inputs and not isinstance(inputs[name], list)}
    latent = latent_node(prompt, pair)
    if latent:
        inputs = prompt[latent]["inputs"]
        settings["latent"] = {"class_type": prompt[latent]["class_type"],
                              **{k: v for k, v in inputs.items() if not isinstance(v, list)}}
    return settings


def latent_node(prompt: dict, pair: Pair) -> Optional[str]:
    sampler = pair.nested or pair.vanilla
    link = prompt[sampler]["inputs"].get("latent_image") if sampler else None
    return str(link[0]) if isinstance(link, list) and str(link[0]) in prompt else None


def source_size(prompt: dict, pair: Pair) -> Optional[tuple[int, int]]:
    """The pixel size of the sampled images when the latent is a pixel-space one (the exemplar demo)."""
    latent = latent_node(prompt, pair)
    if latent is None or prompt[latent]["class_type"] != "EmptyChromaRadianceLatentImage":
        return None
    inputs = prompt[latent]["inputs"]
    width, height = inputs.get("width"), inputs.get("height")
    return (width, height) if isinstance(width, int) and isinstance(height, int) else None


# -- the output folder ---------------------------------------------------------------------------------------

def prepare_output_dir(out: Path) -> Path:
    """Create ``out``, or empty it if an earlier demo wrote it; refuse to clean any other non-empty folder."""
    out = out.resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / OUTPUT_MARKER).exists():
            raise SystemExit(f"{out} is not empty and was not written by this demo: choose another --out")
        shutil.rmtree(out)
    for sub in OUTPUT_SUBFOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text("written by scripts/demo.py; cleaned on the next run\n")
    return out


def save_png(image_bytes: bytes, path: Path) -> Image.Image:
    """Decode an image (JPEG or PNG) and write it as PNG; returns the RGB image."""
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image


def relative(path: Path, out: Path) -> str:
    return str(path.relative_to(out))


# -- the terminal progress line ------------------------------------------------------------------------------

class ProgressLine:
    """One line, rewritten with \\r on a terminal: NFEs done/total per sampler node. Elsewhere (logs, pipes)
    it prints a line only at milestones (outer steps, a node finishing)."""

    def __init__(self, started: float, stream: TextIO = sys.stdout, width: int = 20):
        self.started = started
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self.nodes: dict[str, dict] = {}  # node -> {label, value, max, note}
        self._last_length = 0
        self._last_body = ""

    def track(self, node: str, label: str, total: Optional[int] = None) -> None:
        self.nodes.setdefault(node, {"label": label, "value": 0, "max": total or 0, "note": ""})

    def update(self, node: str, value: Optional[float] = None, total: Optional[float] = None, note: Optional[str] = None,
               milestone: bool = False) -> None:
        entry = self.nodes.setdefault(node, {"label": f"node {node}", "value": 0, "max": 0, "note": ""})
        if value is not None:
            entry["value"] = int(value)
        if total:
            entry["max"] = int(total)
        if note is not None:
            entry["note"] = note
        if self.tty or milestone:
            self.render()

    def body(self) -> str:
        parts = []
        for entry in self.nodes.values():
            total = max(entry["max"], 1)
            filled = min(self.width, round(self.width * entry["value"] / total))
            bar = "#" * filled + "-" * (self.width - filled)
            note = f" {entry['note']}" if entry["note"] else ""
            parts.append(f"{entry['label']} [{bar}] {entry['value']}/{entry['max']} NFE{note}")
        return " | ".join(parts)

    def render(self) -> None:
        body = self.body()
        line = f"{time.monotonic() - self.started:6.1f}s  {body}"
        if self.tty:
            self.stream.write("\r" + line + " " * max(0, self._last_length - len(line)))
            self._last_length = len(line)
        elif body != self._last_body:
            self.stream.write(line + "\n")
        self._last_body = body
        self.stream.flush()

    def finish(self) -> None:
        self.render()
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()


# -- recording the websocket events --------------------------------------------------------------------------

@dataclass
class OuterStep:
    outer_step: int
    outer_steps: int
    nfe: int
    nfe_total: int
    sigma: float
    seconds: float


@dataclass
class Preview:
    node: str
    step: Optional[int]  # the node's progress value when it arrived: NFEs for the nested sampler, steps for KSampler
    seconds: float
    image: bytes


@dataclass
class RunRecorder:
    """Consumes the prompt's websocket events: progress, previews (attributed to node and step) and outer steps.

    A preview belongs to the node's latest progress value. ComfyUI sends ``progress_state`` before a preview
    with metadata and ``progress`` before a plain one, so both events update that value.
    """
    prompt: dict
    pair: Pair
    out: Path
    started: float
    display: ProgressLine
    outer_steps: dict[str, list[OuterStep]] = field(default_factory=dict)
    previews: dict[str, list[Preview]] = field(default_factory=dict)
    saved_previews: dict[str, list[str]] = field(default_factory=dict)
    progress_value: dict[str, int] = field(default_factory=dict)
    executed_nodes: list[str] = field(default_factory=list)
    cached_nodes: list[str] = field(default_factory=list)
    execution_started: Optional[float] = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def label(self, node: str) -> str:
        if node == self.pair.nested:
            return NESTED
        if node == self.pair.vanilla:
            return VANILLA
        return node_title(self.prompt, node)

    def __call__(self, event: dict) -> None:
        kind, data = event.get("type"), event.get("data")
        if kind == "preview_image":
            self.on_preview(data)
        elif not isinstance(data, dict):
            return
        elif kind == "progress":
            self.on_progress(str(data["node"]), data.get("value"), data.get("max"))
        elif kind == "progress_state":
            for node, state in (data.get("nodes") or {}).items():
                if state.get("state") == "running":
                    self.progress_value[str(node)] = int(state.get("value") or 0)
        elif kind == OUTER_STEP_EVENT:
            self.on_outer_step(data)
        elif kind == "execution_start":
            self.execution_started = self.elapsed()
        elif kind == "execution_cached":
            self.cached_nodes.extend(str(n) for n in data.get("nodes") or [])
        elif kind == "executing" and data.get("node") is not None:
            self.executed_nodes.append(str(data["node"]))

    def on_progress(self, node: str, value: Any, total: Any) -> None:
        self.progress_value[node] = int(value or 0)
        if node not in self.display.nodes:
            self.display.track(node, self.label(node))
        self.display.update(node, value, total, milestone=bool(total) and value == total)

    def on_outer_step(self, data: dict) -> None:
        node = str(data.get("node"))
        step = OuterStep(int(data["outer_step"]), int(data["outer_steps"]), int(data["nfe"]), int(data["nfe_total"]),
                         float(data["sigma"]), round(self.elapsed(), 3))
        self.outer_steps.setdefault(node, []).append(step)
        self.display.update(node, step.nfe, step.nfe_total, note=f"(outer {step.outer_step}/{step.outer_steps})",
                            milestone=True)

    def on_preview(self, data: dict) -> None:
        node = str(data.get("node"))
        preview = Preview(node, self.progress_value.get(node), round(self.elapsed(), 3), data["image"])
        previews = self.previews.setdefault(node, [])
        previews.append(preview)
        if node == self.pair.vanilla:
            return  # kept in memory: which steps to save depends on the nested NFEs (either may run first)
        if prompt_class(self.prompt, node) == "NestedKSampler":
            prefix = "nested" if node == self.pair.nested else f"node{node}"
            path = self.out / "previews" / f"{prefix}_outer{len(previews)}.png"
        else:
            path = self.out / "previews" / f"node{node}_{preview.step if preview.step is not None else len(previews)}.png"
        save_png(preview.image, path)
        self.saved_previews.setdefault(node, []).append(relative(path, self.out))


def prompt_class(prompt: dict, node: str) -> Optional[str]:
    return prompt.get(node, {}).get("class_type")


def save_vanilla_previews(recorder: RunRecorder, nfes: list[int]) -> dict[int, dict]:
    """Write the KSampler's x0 previews taken after the given step counts (= NFEs for one-call samplers)."""
    saved: dict[int, dict] = {}
    by_step = {p.step: p for p in recorder.previews.get(recorder.pair.vanilla or "", []) if p.step is not None}
    for nfe in nfes:
        preview = by_step.get(nfe)
        if preview is None:
            continue
        path = recorder.out / "previews" / f"vanilla_nfe{nfe}.png"
        save_png(preview.image, path)
        saved[nfe] = {"path": relative(path, recorder.out), "seconds": preview.seconds, "image": preview.image}
        recorder.saved_previews.setdefault(preview.node, []).append(saved[nfe]["path"])
    return saved


# -- outputs from /history -----------------------------------------------------------------------------------

@dataclass
class SavedImage:
    path: str
    image: Image.Image
    preview: Optional[dict] = None  # OuterStepPreview's metadata of the image: outer_step, outer_steps, batch_index, nfe


def fetch_outputs(client: ComfyAPIClient, history: dict, prompt: dict, pair: Pair, out: Path) -> dict[str, Any]:
    """Fetch every image the prompt's output nodes produced (via /view) and write it under ``out``.

    Returns {"final": {role: [SavedImage]}, "outer_step_preview": {role: [SavedImage]}, "other": {node: [...]}}.
    """
    result: dict[str, Any] = {"final": {}, "outer_step_preview": {}, "other": {}}
    for node, output in sorted((history.get("outputs") or {}).items(), key=lambda item: node_sort_key(item[0])):
        images = output.get("images") or []
        if not images:
            continue
        class_type = prompt_class(prompt, node)
        role = role_of(prompt, node, pair)
        metadata = output.get("nested_previews") or []
        saved = []
        for index, item in enumerate(images):
            data = client.fetch_output(item)
            preview = metadata[index] if index < len(metadata) else None
            if class_type == "OuterStepPreview":
                name = f"outer{preview['outer_step']}_item{preview['batch_index']}.png" if preview else f"image{index + 1}.png"
                folder = "outer_step_preview" if role == NESTED else f"outer_step_preview/{role}"
            elif class_type == "SaveImage" and role in (NESTED, VANILLA):
                name, folder = f"{role}_{index + 1}.png", "final"
            else:
                name, folder = f"{index + 1}.png", f"outputs/{role if role.startswith('node') else f'{role}_node{node}'}"
            path = out / folder / name
            saved.append(SavedImage(relative(path, out), save_png(data, path), preview))
        if class_type == "OuterStepPreview":
            result["outer_step_preview"].setdefault(role, []).extend(saved)
        elif class_type == "SaveImage" and role in (NESTED, VANILLA):
            result["final"].setdefault(role, []).extend(saved)
        else:
            result["other"][node] = saved
    return result


def outer_step_cells(saved: list[SavedImage], outer_steps: int) -> list[list[SavedImage]]:
    """OuterStepPreview images grouped per outer step (they come outer-major, each with its outer step)."""
    groups: list[list[SavedImage]] = [[] for _ in range(outer_steps)]
    batch = max(1, len(saved) // max(outer_steps, 1))
    for index, item in enumerate(saved):
        step = item.preview["outer_step"] - 1 if item.preview else index // batch
        if 0 <= step < outer_steps:
            groups[step].append(item)
    return groups


# -- pixels, exemplars and distances -------------------------------------------------------------------------

def to_source_pixels(image: Image.Image, size: Optional[tuple[int, int]]) -> Image.Image:
    """The image at the sampler's pixel size: drops OuterStepPreview's label bar and undoes the nearest upscale;
    for a websocket preview (bilinear-upscaled JPEG) it samples the source pixel centres."""
    if size is None or image.size == size:
        return image
    width, height = size
    picture_height = round(image.width * height / width)
    if picture_height < image.height:
        image = image.crop((0, 0, image.width, picture_height))
    return image.resize(size, Image.NEAREST)


def exemplar_reference(prompt: dict, size: Optional[tuple[int, int]]) -> Optional[tuple[Any, tuple[str, ...]]]:
    """The exemplars the workflow's NestedExemplarModel diffuses (the built-in ones), or None if unknown."""
    models = nodes_of_class(prompt, "NestedExemplarModel")
    if len(models) != 1 or size is None or size[0] != size[1]:
        return None
    inputs = prompt[models[0]]["inputs"]
    if isinstance(inputs.get("exemplars"), list) or inputs.get("image_size", size[0]) != size[0]:
        return None  # custom exemplar images: not known here
    try:
        from comfyui_nested_diffusion.demo_models.exemplar.exemplars import EXEMPLAR_NAMES, default_exemplars
        return default_exemplars(size[0]), EXEMPLAR_NAMES
    except Exception as error:  # distances are a bonus: never fail the demo for them
        print(f"note: no exemplar distances ({error})", file=sys.stderr)
        return None


def exemplar_distance(image: Image.Image, reference: Optional[tuple[Any, tuple[str, ...]]]) -> Optional[dict]:
    """RMS distance (images in [-1, 1]) to the nearest exemplar, and its name."""
    if reference is None:
        return None
    import numpy as np
    import torch
    from comfyui_nested_diffusion.demo_models.exemplar.exemplars import manifold_distance

    exemplars, names = reference
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    distance, index = manifold_distance(pixels.permute(2, 0, 1)[None], exemplars)
    return {"rms": round(float(distance[0]), 4), "nearest": names[int(index[0])] if int(index[0]) < len(names) else int(index[0])}


# -- the strips ----------------------------------------------------------------------------------------------

def load_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


@dataclass
class StripRow:
    label: str
    cells: list[list[Image.Image]]  # per column: the images shown side by side in that cell
    notes: list[str]  # per column: a short line under the cell ('' for none)


def draw_strip(title: str, columns: list[str], rows: list[StripRow], footer: str, cell: int = CELL_SIZE) -> Image.Image:
    """A labelled grid: a title, one header per column, one label per row, cells of upscaled (nearest) images,
    and an optional note (lines split on newlines) under each cell."""
    pad, label_width, title_height, header = 10, 190, 34, 28
    title_font, font, small = load_font(18), load_font(15), load_font(12)
    per_cell = max((len(images) for row in rows for images in row.cells), default=1) or 1
    column_width = per_cell * cell + (per_cell - 1) * 4
    note_lines = max((note.count("\n") + 1 for row in rows for note in row.notes if note), default=0)
    row_height = cell + 4 + 15 * note_lines
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(pad + label_width + len(columns) * (column_width + pad),
                int(measure.textlength(title, font=title_font)) + 2 * pad,
                int(measure.textlength(footer, font=small)) + 2 * pad)
    height = title_height + header + len(rows) * (row_height + pad) + 26
    canvas = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 8), title, fill=(240, 240, 240), font=title_font)
    for c, name in enumerate(columns):
        x = pad + label_width + c * (column_width + pad)
        draw.text((x + 4, title_height + 4), name, fill=(200, 220, 255), font=font)
    for r, row in enumerate(rows):
        y = title_height + header + r * (row_height + pad)
        for line, text in enumerate(row.label.split("\n")):
            draw.text((pad, y + cell // 2 - 12 + line * 18), text, fill=(240, 240, 240), font=font)
        for c, images in enumerate(row.cells):
            x = pad + label_width + c * (column_width + pad)
            if not images:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), outline=(90, 90, 90))
                draw.text((x + 8, y + cell // 2 - 8), "no image", fill=(150, 150, 150), font=small)
            for i, image in enumerate(images):
                canvas.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x + i * (cell + 4), y))
            note = row.notes[c] if c < len(row.notes) else ""
            for line, text in enumerate(note.split("\n") if note else []):
                draw.text((x + 2, y + cell + 3 + 15 * line), text, fill=(190, 190, 190), font=small)
    draw.text((pad, height - 22), footer, fill=(160, 160, 160), font=small)
    return canvas


def distance_note(distance: Optional[dict]) -> str:
    return f"dist {distance['rms']:.3f}\n{distance['nearest']}" if distance else ""


# -- main ----------------------------------------------------------------------------------------------------

@dataclass
class Boundary:
    """One outer boundary: what nested and vanilla show after the same number of NFEs."""
    outer_step: int
    nfe: int
    seconds: float
    sigma: float
    nested_items: list[Image.Image]  # every batch item, at source size
    nested_paths: list[str]
    nested_preview: Optional[str]
    vanilla: Optional[Image.Image]
    vanilla_path: Optional[str]
    vanilla_seconds: Optional[float]


def vanilla_steps_to_save(recorder: RunRecorder) -> list[int]:
    """The nested sampler's NFEs at its outer boundaries; every step when there is no nested sampler."""
    if recorder.pair.nested:
        return [s.nfe for s in recorder.outer_steps.get(recorder.pair.nested, [])]
    return sorted({p.step for p in recorder.previews.get(recorder.pair.vanilla or "", []) if p.step is not None})


def collect_boundaries(recorder: RunRecorder, outputs: dict, vanilla: dict[int, dict],
                       size: Optional[tuple[int, int]]) -> list[Boundary]:
    steps = recorder.outer_steps.get(recorder.pair.nested or "", [])
    shown = outer_step_cells(outputs["outer_step_preview"].get(NESTED, []), len(steps))
    ws_paths = recorder.saved_previews.get(recorder.pair.nested or "", [])
    ws_images = recorder.previews.get(recorder.pair.nested or "", [])
    boundaries = []
    for index, step in enumerate(steps):
        if shown[index]:
            items = [to_source_pixels(item.image, size) for item in shown[index]]
            paths = [item.path for item in shown[index]]
        elif index < len(ws_images):  # no OuterStepPreview node: the websocket preview (batch item 1) instead
            items = [to_source_pixels(Image.open(io.BytesIO(ws_images[index].image)).convert("RGB"), size)]
            paths = []
        else:
            items, paths = [], []
        match = vanilla.get(step.nfe)
        vanilla_image = (to_source_pixels(Image.open(io.BytesIO(match["image"])).convert("RGB"), size)
                         if match else None)
        boundaries.append(Boundary(step.outer_step, step.nfe, step.seconds, step.sigma, items, paths,
                                   ws_paths[index] if index < len(ws_paths) else None, vanilla_image,
                                   match["path"] if match else None, match["seconds"] if match else None))
    return boundaries


def write_strips(boundaries: list[Boundary], settings: dict, out: Path,
                 reference: Optional[tuple[Any, tuple[str, ...]]]) -> dict[str, str]:
    columns = [f"NFE {b.nfe}" for b in boundaries]
    nested_first = [[b.nested_items[0]] if b.nested_items else [] for b in boundaries]
    vanilla = [[b.vanilla] if b.vanilla is not None else [] for b in boundaries]
    rows = [
        StripRow("nested (anytime)", nested_first,
                 [distance_note(exemplar_distance(c[0], reference)) if c else "" for c in nested_first]),
        StripRow("vanilla KSampler x0", vanilla,
                 [distance_note(exemplar_distance(c[0], reference)) if c else "" for c in vanilla]),
    ]
    vanilla_steps = (settings.get("vanilla") or {}).get("steps", "?")
    title = (f"Same NFEs, same seed {settings.get('seed', '?')}: NestedKSampler {settings.get('outer_steps', '?')} outer x "
             f"{settings.get('inner_steps', '?')} inner vs KSampler {vanilla_steps} steps ({settings.get('sampler_name', '?')}, "
             f"{settings.get('scheduler', '?')})")
    footer = "batch item 1 (the websocket preview shows x0[0])"
    if reference is not None:
        footer += "; dist = RMS distance to the nearest exemplar, pixels in [-1, 1] (spread of the data: "
        footer += f"{settings.get('spread', '?')})"
    files = {"strip": "strip.png"}
    draw_strip(title, columns, rows, footer).save(out / "strip.png")
    batch = max((len(b.nested_items) for b in boundaries), default=0)
    if batch > 1:
        batch_rows = [StripRow(f"nested #{i + 1}", [[b.nested_items[i]] if i < len(b.nested_items) else [] for b in boundaries],
                               [distance_note(exemplar_distance(b.nested_items[i], reference)) if i < len(b.nested_items) else ""
                                for b in boundaries])
                      for i in range(batch)]
        draw_strip("Nested (anytime): every batch item after every outer step", columns, batch_rows,
                   "OuterStepPreview's decoded images; the last column is the final result").save(out / "strip_batch.png")
        files["strip_batch"] = "strip_batch.png"
    return files


def boundary_summary(boundary: Boundary, reference: Optional[tuple[Any, tuple[str, ...]]]) -> dict:
    entry: dict[str, Any] = {
        "outer_step": boundary.outer_step, "nfe": boundary.nfe, "seconds": boundary.seconds, "sigma": boundary.sigma,
        "nested_preview": boundary.nested_preview, "outer_step_preview": boundary.nested_paths,
        "vanilla_preview": boundary.vanilla_path, "vanilla_seconds": boundary.vanilla_seconds,
    }
    if reference is not None:
        entry["distance"] = {
            "nested": exemplar_distance(boundary.nested_items[0], reference) if boundary.nested_items else None,
            "nested_items": [exemplar_distance(image, reference) for image in boundary.nested_items],
            "vanilla": exemplar_distance(boundary.vanilla, reference) if boundary.vanilla is not None else None,
        }
    return entry


def build_summary(prompt_id: str, args: argparse.Namespace, prompt: dict, pair: Pair, settings: dict, recorder: RunRecorder,
                  outputs: dict, boundaries: list[Boundary], files: dict, timings: dict,
                  reference: Optional[tuple[Any, tuple[str, ...]]]) -> dict:
    steps = recorder.outer_steps.get(pair.nested or "", [])
    summary: dict[str, Any] = {
        "prompt_id": prompt_id,
        "workflow": str(args.workflow),
        "settings": settings,
        "nfe": {
            "nested_total": steps[-1].nfe_total if steps else None,
            "nested_per_outer_step": [s.nfe for s in steps],
            "vanilla_steps": (settings.get("vanilla") or {}).get("steps"),
        },
        "seconds": timings,
        "outer_steps": [boundary_summary(b, reference) for b in boundaries],
        "outer_steps_note": ("seconds: since the prompt was queued, when the outer step's event (nested) or the matching "
                             "x0 preview (vanilla) arrived; sigma: the outer sigma the step's inner diffusion started from"),
        "final": {role: [item.path for item in items] for role, items in outputs["final"].items()},
        "outer_step_preview": {role: [{"path": item.path, **(item.preview or {})} for item in items]
                               for role, items in outputs["outer_step_preview"].items()},
        "other_outputs": {node: [item.path for item in items] for node, items in outputs["other"].items()},
        "websocket_previews": {
            node: {"count": len(previews), "saved": recorder.saved_previews.get(node, [])}
            for node, previews in recorder.previews.items()
        },
        "executed_nodes": recorder.executed_nodes,
        "files": files,
    }
    for node, node_steps in recorder.outer_steps.items():
        if node != pair.nested:
            summary.setdefault("other_nested_nodes", {})[node] = [vars(s) for s in node_steps]
    if reference is not None:
        summary["final_distance"] = {
            role: [exemplar_distance(to_source_pixels(item.image, None), reference) for item in items]
            for role, items in outputs["final"].items()
        }
        summary["distance_note"] = ("RMS distance to the nearest exemplar, pixels in [-1, 1]; nested: OuterStepPreview's "
                                    "exact decoded image; vanilla: KSampler's websocket x0 preview of batch item 1 (JPEG)")
    return summary


def print_report(out: Path, summary: dict) -> None:
    nfe, seconds = summary["nfe"], summary["seconds"]
    counts = [f"nested {nfe['nested_total']} NFEs" if nfe["nested_total"] is not None else "",
              f"vanilla {nfe['vanilla_steps']} steps" if nfe["vanilla_steps"] is not None else ""]
    print(f"\nprompt {summary['prompt_id']}: {', '.join(c for c in counts if c) or 'done'}; "
          f"server up in {seconds['server_startup']:.1f} s, prompt ran {seconds['run']:.2f} s")
    for step in summary["outer_steps"]:
        line = f"  outer {step['outer_step']}: NFE {step['nfe']:>4}  at {step['seconds']:6.2f} s  sigma {step['sigma']:.4f}"
        distance = step.get("distance") or {}
        parts = [f"{name} {distance[key]['rms']:.3f}" for key, name in (("nested", "nested"), ("vanilla", "vanilla x0"))
                 if distance.get(key)]
        if parts:
            line += "  RMS to nearest exemplar: " + ", ".join(parts)
        print(line)
    print(f"\nfiles in {out}/:")
    for name, path in summary["files"].items():
        print(f"  {name:<12} {path}")
    folders = [name for name in ("previews", "final", "outer_step_preview", "outputs") if any((out / name).glob("**/*.png"))]
    if folders:
        print(f"  images in {', '.join(f + '/' for f in folders)} (every path is listed in summary.json)")


def workflow_folder_name(path: Path) -> str:
    """nested_vs_vanilla_digits_api.json -> digits."""
    return path.stem.removesuffix("_api").removeprefix("nested_vs_vanilla_")


def run_demo(args: argparse.Namespace) -> int:
    workflows = args.workflow or list(DEFAULT_WORKFLOWS)
    out = prepare_output_dir(args.out)
    if len(workflows) > 1:  # each workflow writes into a folder of its own
        for sub in OUTPUT_SUBFOLDERS:
            (out / sub).rmdir()
    began = time.monotonic()
    print(f"starting ComfyUI ({'GPU' if args.gpu else 'CPU'}) with the nested-diffusion pack ...", flush=True)
    with ComfyServer(port=args.port, preview_method="auto", cpu=not args.gpu, keep_base_dir=args.keep_server_dir) as server:
        print(f"ComfyUI up at {server.url} in {server.startup_seconds:.1f} s (log: {server.log_path})", flush=True)
        for path in workflows:
            folder = out if len(workflows) == 1 else out / workflow_folder_name(path)
            for sub in OUTPUT_SUBFOLDERS:
                (folder / sub).mkdir(parents=True, exist_ok=True)
            if len(workflows) > 1:
                print(f"\n== {path.name} -> {folder}", flush=True)
            run_workflow(args, server, path, folder, began)
        if args.keep_server_dir:
            print(f"server directory kept: {server.base_dir}")
    return 0


def run_workflow(args: argparse.Namespace, server: ComfyServer, path: Path, out: Path, began: float) -> None:
    """Queue one workflow on the running server and write its strips, previews and summary into ``out``."""
    prompt = load_workflow(path)
    pair = find_pair(prompt)
    apply_overrides(prompt, pair, args.outer, args.inner, args.seed)
    settings = sampler_settings(prompt, pair)
    for model in nodes_of_class(prompt, "NestedExemplarModel"):
        settings.setdefault("spread", prompt[model]["inputs"].get("spread"))
    size = source_size(prompt, pair)
    (out / "workflow_api.json").write_text(json.dumps(prompt, indent=2))
    with ComfyAPIClient(server.url) as client:
        queued = time.monotonic()
        display = ProgressLine(queued)
        planned = settings.get("outer_steps", 0) * settings.get("inner_steps", 0)  # one-call solvers; events correct it
        for node, total in ((pair.nested, planned), (pair.vanilla, (settings.get("vanilla") or {}).get("steps"))):
            if node:
                display.track(node, NESTED if node == pair.nested else VANILLA, total)
        recorder = RunRecorder(prompt, pair, out, queued, display)
        try:
            prompt_id, _ = client.run(prompt, timeout=args.timeout, on_event=recorder)
        finally:
            display.finish()
        run_seconds = time.monotonic() - queued
        outputs = fetch_outputs(client, client.history(prompt_id), prompt, pair, out)
    startup = server.startup_seconds or 0.0

    reference = exemplar_reference(prompt, size)
    vanilla = save_vanilla_previews(recorder, vanilla_steps_to_save(recorder)) if pair.vanilla else {}
    boundaries = collect_boundaries(recorder, outputs, vanilla, size) if pair.nested else []
    files: dict[str, str] = {}
    if pair.complete and boundaries:
        files.update(write_strips(boundaries, settings, out, reference))
    else:
        print("note: the workflow has no NestedKSampler + KSampler pair: no strip drawn")
    files["summary"] = "summary.json"
    files["workflow"] = "workflow_api.json"
    timings = {"server_startup": round(startup, 2), "run": round(run_seconds, 3),
               "execution_start": recorder.execution_started, "total": round(time.monotonic() - began, 2)}
    summary = build_summary(prompt_id, args, prompt, pair, settings, recorder, outputs, boundaries, files, timings, reference)
    summary["workflow"] = str(path)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_report(out, summary)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    stop_on_sigterm()  # `kill` stops the server too, like Ctrl-C
    try:
        return run_demo(args)
    except KeyboardInterrupt:
        print("\ninterrupted: the server was stopped", file=sys.stderr)
        return 130
    except (ComfyServerError, ComfyAPIError, TimeoutError) as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
