"""Keep one candidate mid-run, inside a real ComfyUI: the run continues with the kept batch item only.

The pick goes through the registry the HTTP route ``/nested_diffusion/pick`` uses (``nodes/steering.py``), requested
as the first inner diffusion ends, so it is taken at the first model call of the second. The measuring code is the
benchmark's (``bench/pick.py``), so the test and the report cannot drift apart.
"""
from __future__ import annotations

import pytest
import torch
from comfyui_nested_diffusion.bench.pick import BATCH, ITEMS_TARGET, KEEP, OUTER, nested_run, pick_row


@pytest.mark.parametrize("sampler_name", ["euler", "euler_ancestral"])
def test_a_pick_after_outer_step_1_runs_the_rest_on_the_kept_item(pack, sampler_name):
    row = pick_row(sampler_name)
    assert row["items_ratio"] <= ITEMS_TARGET, row
    assert row["kept_shape"][0] == 1 and row["kept_batch_index"] == [KEEP]
    assert row["previews_per_step"] == [BATCH] + [1] * (OUTER - 1)  # every candidate up to the pick, then the kept one
    if sampler_name == "euler":  # the pack draws all of its noise per item: exactly the full batch's item
        assert row["max_difference_to_full_batch"] <= 1e-5, row


def test_the_kept_items_previews_are_labelled_with_its_batch_index(pack):
    samples, previews, counter = nested_run("euler", "euler", "test-pick-labels", pick=True)
    assert previews["nested_batch_indices"] == list(range(BATCH)) + [KEEP] * (OUTER - 1)
    assert previews["samples"].shape[0] == BATCH + OUTER - 1
    assert torch.allclose(previews["samples"][-1:], samples["samples"], atol=1e-5)


def test_without_a_pick_nothing_changes(pack):
    samples, previews, counter = nested_run("euler", "euler", "test-no-pick", pick=False)
    assert samples["samples"].shape[0] == BATCH and previews["nested_step_batch_sizes"] == [BATCH] * OUTER
    assert counter["items"] == BATCH * OUTER * 10


def test_outer_step_preview_labels_the_candidates_and_then_the_kept_item(pack):
    from comfyui_nested_diffusion.nodes.outer_preview import preview_label, preview_metadata

    _, previews, _ = nested_run("euler", "euler", "test-pick-preview", pick=True)
    metadata = preview_metadata(previews)
    assert [m["outer_step"] for m in metadata] == [1] * BATCH + list(range(2, OUTER + 1))
    assert [m["batch_index"] for m in metadata] == list(range(BATCH)) + [KEEP] * (OUTER - 1)
    assert preview_label(len(metadata) - 1, metadata[-1], BATCH).startswith(f"outer {OUTER}/{OUTER}")
    assert preview_label(len(metadata) - 1, metadata[-1], BATCH).endswith(f"index {KEEP}")
