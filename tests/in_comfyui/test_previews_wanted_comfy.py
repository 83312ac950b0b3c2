"""A nested sampler keeps copies of its inner results for outer_previews only where a node takes that output
(nodes/previews_wanted.py): the server's prompt handler marks it, the mark is part of ComfyUI's cache key, so a run
cached without previews is never served to a prompt that takes them (through a real server:
test_server_limits_api.py, test_connecting_outer_previews_after_a_cached_run_works and the pick after a stage)."""
from __future__ import annotations

from comfyui_nested_diffusion.protocol import OUTER_PREVIEWS_MARK as MARK
from comfyui_nested_diffusion.tools.api_graphs import PREVIEW, SAMPLER, exemplar_graph

OUTER, INNER = 4, 3


def sampler_inputs(seed: int) -> dict:
    return {"seed": seed, "outer_steps": OUTER, "inner_steps": INNER, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}


def test_the_handler_marks_whether_any_node_takes_outer_previews(pack):
    from comfyui_nested_diffusion.nodes.previews_wanted import mark_outer_previews, outer_previews_wanted

    graph = exemplar_graph("NestedKSampler", sampler_inputs(1), outer_step_preview=True)
    graph["9"] = {"class_type": "NestedKSamplerAdvanced", "inputs": {"latent_image": [SAMPLER, 0]}}  # its own: not taken
    marked = mark_outer_previews({"prompt": graph, "client_id": "x"})
    assert marked["client_id"] == "x"
    assert graph[SAMPLER]["inputs"][MARK] is True and graph["9"]["inputs"][MARK] is False
    assert MARK not in graph[PREVIEW]["inputs"]  # only the nested sampler nodes
    assert outer_previews_wanted(graph, SAMPLER) and not outer_previews_wanted(graph, "9")
    # No mark (a prompt queued another way, a node expanded by another node): keep them, as before.
    assert outer_previews_wanted({SAMPLER: {"inputs": {}}}, SAMPLER) and outer_previews_wanted(None, None)
    assert mark_outer_previews({"prompt": "not a prompt"}) == {"prompt": "not a prompt"}


def test_an_unmarked_in_process_run_keeps_its_previews_and_a_marked_one_none(pack):
    from comfy_helpers import empty_latent, exemplar_setup, run_node
    from comfyui_nested_diffusion.nodes.nested_ksampler import NestedKSampler
    from comfyui_nested_diffusion.nodes.previews_wanted import mark_outer_previews
    from comfyui_nested_diffusion.tools.models import node_with_hidden

    model, cond, _ = exemplar_setup(pack, "eps")
    inputs = dict(model=model, positive=cond, negative=cond, latent_image=empty_latent(2), **sampler_inputs(5))
    samples, previews = run_node(NestedKSampler, **inputs)
    assert previews["samples"].shape[0] == OUTER * 2
    graph = mark_outer_previews({"prompt": {"7": {"class_type": "NestedKSampler", "inputs": {}}}})["prompt"]
    unmarked_samples = samples["samples"]
    samples, previews = node_with_hidden(NestedKSampler, unique_id="7", prompt=graph).execute(**inputs).args
    assert previews["samples"].numel() == 0
    assert samples["samples"].equal(unmarked_samples)  # the same images: only the copies are skipped


def test_a_negative_output_index_counts_as_taking_outer_previews(pack):
    """``["3", -1]`` is a valid link to a nested sampler's last output (outer_previews; ComfyUI indexes its outputs
    as a list): the mark stayed False and OuterStepPreview failed with "it holds no images"."""
    from comfyui_nested_diffusion.nodes.previews_wanted import mark_outer_previews, outer_previews_wanted

    for index, taken in ((-1, True), (1, True), (-2, False), (0, False), (-3, False), (2, False)):
        graph = exemplar_graph("NestedKSampler", sampler_inputs(1), outer_step_preview=True)
        graph[PREVIEW]["inputs"]["previews"] = [SAMPLER, index]
        mark_outer_previews({"prompt": graph})
        assert graph[SAMPLER]["inputs"][MARK] is taken, index
        assert outer_previews_wanted(graph, SAMPLER) is taken, index


def test_a_node_added_after_the_handler_ran_still_gets_its_previews(pack):
    """A prompt handler registered after the pack's may add a node that takes outer_previews: the mark, written
    before, says False. The sampler decides from the prompt it actually runs in (ComfyUI's hidden PROMPT), so it
    keeps them there."""
    from comfyui_nested_diffusion.nodes.previews_wanted import mark_outer_previews, outer_previews_wanted

    graph = exemplar_graph("NestedKSampler", sampler_inputs(1), outer_step_preview=False)
    mark_outer_previews({"prompt": graph})
    assert graph[SAMPLER]["inputs"][MARK] is False and not outer_previews_wanted(graph, SAMPLER)
    graph[PREVIEW] = {"class_type": "OuterStepPreview", "inputs": {"previews": [SAMPLER, -1], "vae": ["4", 0]}}
    assert graph[SAMPLER]["inputs"][MARK] is False  # the later handler did not mark again ...
    assert outer_previews_wanted(graph, SAMPLER)  # ... but the prompt the node runs in takes the output
