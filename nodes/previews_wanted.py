"""Whether a nested sampler's ``outer_previews`` output is taken by any node of the queued prompt.

A run keeps a copy of its inner results for that output (up to 64 images, see kept_previews). Where nothing takes
the output, those copies are memory for nothing (on small latents, without the mark, they are the whole of the
measured peak-memory excess over KSampler). But whether an output is connected is not part of ComfyUI's cache key (a node's key is its
class, its inputs and its ancestors), so a run cached without previews could be served to a later prompt that
connects a preview node. So the server's prompt handler (``PromptServer.add_on_prompt_handler``, run on every
``POST /prompt``) writes the answer into each nested sampler node's inputs as ``MARK``: ComfyUI validates and passes
only the inputs a node declares, but its cache key holds all of them, so connecting the output changes the key.
A node skips the copies only where the mark says False and the prompt it runs in (ComfyUI's hidden PROMPT, the
prompt after every handler) links to the output nowhere either: a handler registered after the pack's may add a
node that takes it. A prompt queued another way (in-process, a node expanded by another node) keeps them as before.
A link names an output as ComfyUI reads it, by Python list indexing: ``["3", -1]`` is the last output.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..protocol import OUTER_PREVIEWS_MARK as MARK
from .rerun import is_link, queued_inputs

OUTER_PREVIEWS_OUTPUT = 1  # NestedKSampler's and NestedKSamplerAdvanced's second output ...
OUTPUT_COUNT = 2  # ... of two
MARKED_CLASSES = ("NestedKSampler", "NestedKSamplerAdvanced")


def output_position(index: int, count: int = OUTPUT_COUNT) -> Optional[int]:
    """The output a link's index names, as ComfyUI reads it (``outputs[index]``: -1 is the last), None outside."""
    position = index + count if index < 0 else index
    return position if 0 <= position < count else None


def taken_outputs(prompt: dict) -> set[tuple[str, int]]:
    """Every (node id, output index) some node of an API-format prompt links to, negative indices as given."""
    taken = set()
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        for value in (inputs.values() if isinstance(inputs, dict) else ()):
            if is_link(value):
                taken.add((str(value[0]), value[1]))
    return taken


def outer_previews_taken(taken: set[tuple[str, int]], node_id: Any) -> bool:
    """Whether ``taken`` (``taken_outputs``) holds a link to node ``node_id``'s outer_previews, by any index."""
    return any(str(linked) == str(node_id) and output_position(index) == OUTER_PREVIEWS_OUTPUT
               for linked, index in taken)


def mark_outer_previews(json_data: Any) -> Any:
    """The prompt handler: each nested sampler node gets ``MARK``, whether any node takes its outer_previews."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    taken = taken_outputs(prompt)
    for node_id, node in prompt.items():
        if isinstance(node, dict) and node.get("class_type") in MARKED_CLASSES and isinstance(node.get("inputs"), dict):
            node["inputs"][MARK] = outer_previews_taken(taken, node_id)
    return json_data


def outer_previews_wanted(prompt: Optional[dict], node_id: Optional[str]) -> bool:
    """False only where the queued prompt marks this node's outer_previews as taken by no node and no node of that
    prompt, as it runs, links to them (a later prompt handler may have added one after the mark)."""
    inputs = queued_inputs(prompt, node_id)
    if inputs is None or inputs.get(MARK) is not False:
        return True
    return outer_previews_taken(taken_outputs(prompt), node_id)


def register_prompt_handler(server: Any) -> None:
    """Install ``mark_outer_previews`` on ComfyUI's server (marking twice would give the same mark)."""
    server.add_on_prompt_handler(mark_outer_previews)
    logging.info("nested diffusion: outer_previews prompt handler registered")
