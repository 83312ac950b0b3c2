"""Checks of ComfyUI workflow files against a live server's ``/object_info`` (used by the example-workflow and
browser tests). Independent of example_workflows/build_workflows.py: they read the files as ComfyUI would.

* ``editor_problems(workflow, object_info, available)``: what is wrong with an editor-format (LiteGraph,
  version 0.4) workflow: unknown node types, links whose ends do not exist or whose types do not match,
  inputs that are not the node's, unlinked required sockets, widget values out of range or not among a combo's
  options. Combo values naming a model or input file that this server lacks are not problems: they are
  returned separately by ``missing_files``.
* ``editor_to_api(workflow, object_info)``: the API-format prompt the editor workflow stands for (what the
  frontend's ``graphToPrompt`` sends), to compare with an ``*_api.json`` twin.
* ``widget_inputs(node_info)``: a node's widget inputs in the order the frontend lays out ``widgets_values``,
  with the frontend-only extra values (``control_after_generate``, LoadImage's ``upload``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = REPO_ROOT / "example_workflows"
VIRTUAL_NODE_TYPES = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# Combo inputs that name files the user supplies (model weights, input pictures).
FILE_INPUTS = {"ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "clip_name3", "vae_name",
               "lora_name", "control_net_name", "image"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def is_editor_format(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def is_api_format(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(node, dict) and "class_type" in node and "inputs" in node for node in data.values())


def _spec_kind(spec: list) -> tuple[str, dict]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(kind, list):
        return "COMBO", {**options, "options": kind}
    return kind, options


def input_specs(node_info: dict) -> list[tuple[str, str, dict, bool]]:
    """(name, kind, options, optional) for every required then optional input, in /object_info order."""
    order = node_info.get("input_order") or {}
    result = []
    for section in ("required", "optional"):
        specs = (node_info.get("input") or {}).get(section) or {}
        for name in order.get(section) or list(specs):
            kind, options = _spec_kind(specs[name])
            result.append((name, kind, options, section == "optional"))
    return result


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput")


def widget_inputs(node_info: dict) -> list[tuple[str, str, dict]]:
    """The widgets_values layout: (name, kind, options) per value; extra values have kind 'CONTROL'/'UPLOAD'."""
    layout = []
    for name, kind, options, _ in input_specs(node_info):
        if not is_widget(kind, options):
            continue
        layout.append((name, kind, options))
        if options.get("control_after_generate"):
            layout.append(("control_after_generate", "CONTROL", {}))
        if options.get("image_upload"):
            layout.append(("upload", "UPLOAD", {}))
    return layout


def socket_inputs(node_info: dict) -> dict[str, tuple[str, bool]]:
    return {name: (kind, optional) for name, kind, options, optional in input_specs(node_info)
            if not is_widget(kind, options)}


def types_match(output_type: str, input_type: str) -> bool:
    if "*" in (output_type, input_type):
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def value_problem(name: str, kind: str, options: dict, value: Any) -> Optional[str]:
    """Why a widget value would fail ComfyUI's validation, or None (file names are checked by the caller)."""
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, int):
            return f"{name}: {value!r} is not an integer"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{name}: {value!r} is not a number"
    elif kind == "STRING":
        if not isinstance(value, str):
            return f"{name}: {value!r} is not a string"
    elif kind == "BOOLEAN":
        if not isinstance(value, bool):
            return f"{name}: {value!r} is not a boolean"
    elif kind == "COMBO":
        if value not in options.get("options", []):
            return f"{name}: {value!r} is not one of the options"
    elif kind == "CONTROL":
        if value not in CONTROL_VALUES:
            return f"{name}: {value!r} is not a control_after_generate value"
    if kind in ("INT", "FLOAT"):
        if "min" in options and value < options["min"]:
            return f"{name}: {value} < min {options['min']}"
        if "max" in options and value > options["max"]:
            return f"{name}: {value} > max {options['max']}"
    return None


def _is_missing_file(name: str, kind: str, options: dict, value: Any) -> bool:
    return kind == "COMBO" and name in FILE_INPUTS and isinstance(value, str) and value not in options.get("options", [])


def missing_files(workflow: dict, object_info: dict) -> list[tuple[int, str, str]]:
    """(node id, input name, file name) of every file-name combo value this server does not have."""
    found = []
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            continue
        for (name, kind, options), value in zip(widget_inputs(info), node.get("widgets_values") or []):
            if _is_missing_file(name, kind, options, value):
                found.append((node["id"], name, value))
    return found


def editor_problems(workflow: dict, object_info: dict) -> list[str]:
    problems = []
    if workflow.get("version") != 0.4:
        problems.append(f"version is {workflow.get('version')!r}, not 0.4")
    nodes = {node["id"]: node for node in workflow["nodes"]}
    if len(nodes) != len(workflow["nodes"]):
        problems.append("duplicate node ids")
    links = {link[0]: link for link in workflow["links"]}
    if len(links) != len(workflow["links"]):
        problems.append("duplicate link ids")
    if workflow.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id is below the largest node id")
    if workflow.get("last_link_id", 0) < max(links, default=0):
        problems.append("last_link_id is below the largest link id")

    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in VIRTUAL_NODE_TYPES:
            continue
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{where}: no such node type on this server")
            continue
        sockets = socket_inputs(info)
        widgets = {name: (kind, options) for name, kind, options in widget_inputs(info)}
        # inputs: sockets, then widget entries (as the 1.32.9 frontend saves them)
        for slot, entry in enumerate(node.get("inputs") or []):
            name = entry.get("name")
            if "widget" in entry:
                if entry["widget"].get("name") not in widgets:
                    problems.append(f"{where}: input {name!r} names no widget of the node")
                continue
            if name not in sockets:
                problems.append(f"{where}: input {name!r} is not a socket input of {node['type']}")
                continue
            if entry.get("type") != sockets[name][0]:
                problems.append(f"{where}: input {name!r} has type {entry.get('type')!r}, the node says "
                                f"{sockets[name][0]!r}")
            link_id = entry.get("link")
            if link_id is not None:
                link = links.get(link_id)
                if link is None:
                    problems.append(f"{where}: input {name!r} names link {link_id}, which does not exist")
                elif link[3] != node["id"] or link[4] != slot:
                    problems.append(f"{where}: link {link_id} does not end at input {name!r} (slot {slot})")
        linked = {entry["name"] for entry in node.get("inputs") or [] if entry.get("link") is not None}
        for name, (_, optional) in sockets.items():
            if not optional and name not in linked:
                problems.append(f"{where}: required input {name!r} is not connected")
        # outputs
        declared = list(zip(info.get("output") or [], info.get("output_name") or []))
        for slot, entry in enumerate(node.get("outputs") or []):
            if slot >= len(declared):
                problems.append(f"{where}: output slot {slot} does not exist")
                continue
            if entry.get("type") != declared[slot][0]:
                problems.append(f"{where}: output {slot} has type {entry.get('type')!r}, the node says "
                                f"{declared[slot][0]!r}")
            for link_id in entry.get("links") or []:
                link = links.get(link_id)
                if link is None or link[1] != node["id"] or link[2] != slot:
                    problems.append(f"{where}: output {slot} lists link {link_id}, which does not start there")
        # widget values
        layout = widget_inputs(info)
        values = node.get("widgets_values") or []
        if len(values) != len(layout):  # the frontend saves every widget, optional ones included
            problems.append(f"{where}: {len(values)} widgets_values, expected {len(layout)} "
                            f"({[name for name, _, _ in layout]})")
        for (name, kind, options), value in zip(layout, values):
            if _is_missing_file(name, kind, options, value):
                continue
            problem = value_problem(name, kind, options, value)
            if problem:
                problems.append(f"{where}: {problem}")

    for link in workflow["links"]:
        link_id, source_id, source_slot, target_id, target_slot, kind = link
        source, target = nodes.get(source_id), nodes.get(target_id)
        if source is None or target is None:
            problems.append(f"link {link_id}: node {source_id if source is None else target_id} does not exist")
            continue
        outputs = source.get("outputs") or []
        inputs = target.get("inputs") or []
        if source_slot >= len(outputs) or link_id not in (outputs[source_slot].get("links") or []):
            problems.append(f"link {link_id}: not listed by output {source_slot} of node {source_id}")
            continue
        if target_slot >= len(inputs) or inputs[target_slot].get("link") != link_id:
            problems.append(f"link {link_id}: not the link of input {target_slot} of node {target_id}")
            continue
        output_type = outputs[source_slot]["type"]
        input_type = inputs[target_slot]["type"]
        if kind != output_type:
            problems.append(f"link {link_id}: type {kind!r} but output type {output_type!r}")
        if not types_match(output_type, input_type):
            problems.append(f"link {link_id}: {output_type} output of node {source_id} into {input_type} input "
                            f"{inputs[target_slot]['name']!r} of node {target_id}")
    return problems


def editor_to_api(workflow: dict, object_info: dict) -> dict:
    """The API-format prompt of an editor workflow: widget values by name, links as [node id, slot]."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODE_TYPES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        inputs: dict[str, Any] = {}
        for (name, kind, _), value in zip(widget_inputs(info), node.get("widgets_values") or []):
            if kind not in ("CONTROL", "UPLOAD"):
                inputs[name] = value
        for entry in node.get("inputs") or []:
            link = links.get(entry.get("link")) if entry.get("link") is not None else None
            if link is not None:
                inputs[entry["name"]] = [str(link[1]), link[2]]
        entry = {"class_type": node["type"], "inputs": inputs}
        if node.get("title"):
            entry["_meta"] = {"title": node["title"]}
        prompt[str(node["id"])] = entry
    return prompt


def optional_defaults(node_info: dict) -> dict:
    """The defaults of a node's optional widget inputs: what the node runs with when a prompt leaves them out."""
    return {name: options["default"] for name, kind, options, optional in input_specs(node_info)
            if optional and is_widget(kind, options) and "default" in options}


def api_differences(expected: dict, actual: dict, object_info: Optional[dict] = None, *,
                    compare_titles: bool = True) -> list[str]:
    """Differences between two API-format prompts (node ids, class types, inputs, and titles if asked).
    With ``object_info``, an optional widget input left out on one side equals its default on the other."""
    problems = []
    for node_id in sorted(set(expected) | set(actual), key=lambda k: (len(k), k)):
        if node_id not in actual:
            problems.append(f"node {node_id}: missing")
            continue
        if node_id not in expected:
            problems.append(f"node {node_id}: unexpected ({actual[node_id]['class_type']})")
            continue
        a, b = expected[node_id], actual[node_id]
        if a["class_type"] != b["class_type"]:
            problems.append(f"node {node_id}: {a['class_type']} != {b['class_type']}")
        defaults = optional_defaults(object_info[a["class_type"]]) if object_info and a["class_type"] in object_info else {}
        for name in sorted(set(a["inputs"]) | set(b["inputs"])):
            left = a["inputs"].get(name, defaults.get(name, "<absent>"))
            right = b["inputs"].get(name, defaults.get(name, "<absent>"))
            if isinstance(left, list) and isinstance(right, list):
                left, right = [str(left[0]), left[1]], [str(right[0]), right[1]]
            if left != right:
                problems.append(f"node {node_id} ({a['class_type']}) input {name}: {left!r} != {right!r}")
        if compare_titles:
            title_a = (a.get("_meta") or {}).get("title")
            title_b = (b.get("_meta") or {}).get("title")
            if title_a and title_b and title_a != title_b:
                problems.append(f"node {node_id}: title {title_a!r} != {title_b!r}")
    return problems


def example_pairs() -> list[tuple[str, Path, Path]]:
    """(name, editor file, API twin) for every editor-format example. The twin is named by the workflow's
    extra.nested_diffusion.api_twin, else ``api/<name>_api.json``, else ``<name>_api.json`` beside it."""
    pairs = []
    for path in sorted(EXAMPLES_DIR.glob("*.json")):
        data = load(path)
        if not is_editor_format(data):
            continue
        twin_name = ((data.get("extra") or {}).get("nested_diffusion") or {}).get("api_twin")
        candidates = ([EXAMPLES_DIR / twin_name] if twin_name else []) + [
            EXAMPLES_DIR / "api" / f"{path.stem}_api.json", EXAMPLES_DIR / f"{path.stem}_api.json"]
        twin = next((c for c in candidates if c.exists()), candidates[0])
        pairs.append((path.stem, path, twin))
    return pairs


def file_loaders(prompt: dict) -> dict[str, list[tuple[str, Any]]]:
    """API prompt -> {node id: [(input name, value)]} of the inputs that name user-supplied files."""
    found: dict[str, list] = {}
    for node_id, node in prompt.items():
        for name, value in node["inputs"].items():
            if name in FILE_INPUTS and isinstance(value, str):
                found.setdefault(node_id, []).append((name, value))
    return found


def flatten(items: Iterable[Iterable[Any]]) -> list:
    return [x for item in items for x in item]
