"""Honest caching: a nested sampler whose result depends on something that is not one of its inputs samples again.

ComfyUI serves a node from its cache when the node's inputs and its ``fingerprint_inputs`` (V1: ``IS_CHANGED``)
are unchanged. A run ended by Finish now or by ``max_seconds``, or narrowed to one batch item by a pick (``POST
/nested_diffusion/pick``), is not what those inputs give (the same prompt, left alone, runs further with its whole
batch), so the next identical prompt, from any client, must sample again. A ``max_nfe`` stop is a function of the
inputs (the same outer steps every time) and stays cacheable, like a cancelled run's absence from the cache.

The nested sampler nodes' ``fingerprint_inputs`` returns a generation number for their constant inputs (linked
inputs reach ``fingerprint_inputs`` as None); a run whose result depends on more than its inputs bumps the generation
of the inputs it ran with, read from the queued prompt. Two nodes with the same constants share a generation: an early finish of one makes the
other sample once more too, which costs time but never serves a wrong image.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Optional

# Stops that depend on something other than the inputs: the next identical prompt samples again.
NOT_FROM_INPUTS = frozenset({"finish requested", "max_seconds"})
MAX_REMEMBERED = 4096  # generations kept (oldest forgotten first: at worst one needless re-run)

_lock = threading.Lock()
_generations: "OrderedDict[tuple, int]" = OrderedDict()


def is_link(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[1], int)


def constants_key(node_class: str, inputs: dict) -> tuple:
    """The node's constant inputs, as ``fingerprint_inputs`` sees them (links and absent values left out)."""
    items = sorted((name, repr(value)) for name, value in inputs.items() if value is not None and not is_link(value))
    return (node_class, tuple(items))


def generation(key: tuple) -> int:
    with _lock:
        return _generations.get(key, 0)


def fingerprint(node_class: str, inputs: dict) -> tuple:
    """What a nested sampler node's ``fingerprint_inputs`` returns."""
    key = constants_key(node_class, inputs)
    return ("nested-diffusion-generation", generation(key))


def queued_inputs(prompt: Optional[dict], node_id: Optional[str]) -> Optional[dict]:
    """A node's inputs in the queued (API-format) prompt; None outside a server or where the node is not in it."""
    node = prompt.get(str(node_id)) if isinstance(prompt, dict) and node_id is not None else None
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else None


def key_from_prompt(node_class: str, prompt: Optional[dict], node_id: Optional[str], names) -> Optional[tuple]:
    """The same key, built from the queued (API-format) prompt while the node runs; None outside a server."""
    inputs = queued_inputs(prompt, node_id)
    if inputs is None:
        return None
    return constants_key(node_class, {name: inputs[name] for name in names if name in inputs})


def invalidate(key: Optional[tuple]) -> None:
    if key is None:
        return
    with _lock:
        _generations[key] = _generations.get(key, 0) + 1
        _generations.move_to_end(key)
        while len(_generations) > MAX_REMEMBERED:
            _generations.popitem(last=False)


def depends_on_more_than_inputs(result: Any) -> bool:
    """Whether a nested run's result (a ``NestedResult``) is not what its inputs alone give: a stop for a reason
    outside them, or a pick (``kept``: the batch position a client's pick kept)."""
    return getattr(result, "stop_reason", None) in NOT_FROM_INPUTS or getattr(result, "kept", None) is not None


def run_ended(key: Optional[tuple], result: Any) -> None:
    """Called when the nested run of the node with ``key`` ends: a result that depends on more than the inputs
    invalidates that node, so that the next identical prompt samples again instead of being served this one."""
    if depends_on_more_than_inputs(result):
        invalidate(key)

