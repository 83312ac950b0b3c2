"""The noise the pack draws itself is independent: every (stream, outer step, batch item) gets noise of its own.

Outer noise (re-noised and ancestral outer steps), the hand-over noise of a stage that ends early, and the seeds the
inner solvers draw their own noise from are all derived from the node's seed by a hash. A derivation that adds the
step to the item would hand item i at outer step k the noise of item i + 1 at step k - 1: the batch would collapse
onto a few modes (tests/in_comfyui/test_batch_diversity_comfy.py measures that inside ComfyUI).
"""
import itertools

import pytest
import torch
from comfyui_nested_diffusion.nested_core import derive_seed, seeded_outer_noise

STEPS, ITEMS = 8, 16
SHAPE = (4, 16, 16)  # 1024 numbers per item: independent draws correlate by about 1/32


def every_draw_of_a_run(seed: int) -> dict:
    """The noise of every (stream, outer step, item) a run of STEPS outer steps at batch ITEMS can draw."""
    x = torch.zeros(ITEMS, *SHAPE)
    draws = {}
    for stream in (1, 2):
        noise = seeded_outer_noise(seed, stream=stream)
        for step in range(STEPS):
            for item, drawn in enumerate(noise(step, x, range(ITEMS))):
                draws[(stream, step, item)] = drawn.flatten()
    return draws


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**64 - 1])
def test_no_two_draws_of_a_run_share_noise(seed):
    draws = every_draw_of_a_run(seed)
    keys = list(draws)
    stacked = torch.stack([draws[key] for key in keys])
    unit = (stacked - stacked.mean(1, keepdim=True)) / stacked.std(1, keepdim=True)
    correlation = (unit @ unit.T / unit.shape[1]).fill_diagonal_(0).abs()
    worst = int(correlation.argmax())
    first, second = keys[worst // len(keys)], keys[worst % len(keys)]
    # 512 draws, 130816 pairs of 1024 numbers: independent draws stay below about 0.16
    assert float(correlation.max()) < 0.25, (first, second, float(correlation.max()))


def test_an_item_never_gets_its_neighbours_noise_of_the_step_before():
    x = torch.zeros(4, *SHAPE)
    noise = seeded_outer_noise(3)
    later, earlier = noise(3, x, range(4)), noise(2, x, range(4))
    for item in range(3):
        assert not torch.allclose(later[item], earlier[item + 1])


@pytest.mark.parametrize("seed", [0, 7, 2**63 + 5])
def test_derived_seeds_are_distinct_across_streams_steps_and_items(seed):
    """Inner solvers get stream 0's seed per outer step; outer and hand-over noise streams 1 and 2 per item."""
    derived = [derive_seed(seed, 0, step) for step in range(1, 200)]
    derived += [derive_seed(seed, stream, step, item)
                for stream, step, item in itertools.product((1, 2), range(200), range(64))]
    assert len(set(derived)) == len(derived)
    assert all(0 <= value < 2**63 for value in derived)  # what torch.Generator.manual_seed takes


def test_one_outer_step_keeps_the_nodes_own_seed():
    """Stream 0 at step 0 is the seed itself: outer_steps 1 samples exactly as KSampler with that seed."""
    assert derive_seed(123, 0, 0) == 123 and derive_seed(None, 1, 2, 3) is None
    assert derive_seed(123, 0, 1) != derive_seed(124, 0, 1) and derive_seed(123, 0, 1) == derive_seed(123, 0, 1)
