"""outer_previews keeps a bounded, evenly spread selection of outer steps: the rule in
nodes/kept_previews.py and docs/reliability.md."""
import pytest
import torch


@pytest.mark.parametrize("outer, batch", [(4, 2), (64, 1), (65, 1), (100, 16), (1000, 1), (1000, 3), (7, 40), (300, 64)])
def test_at_most_64_images_evenly_spread_and_always_the_latest(pack, outer, batch):
    from comfyui_nested_diffusion.nodes.kept_previews import MAX_PREVIEW_IMAGES, KeptPreviews, KeptStep

    kept = KeptPreviews()
    for index in range(outer):
        kept.add(KeptStep(index, torch.full((batch, 1), float(index)), nfe=index + 1, sigma=1.0 / (index + 1),
                          number=index + 1))
        steps = [step.index for step in kept.steps]
        assert steps[-1] == index and steps == sorted(set(steps))  # the latest, in order, no repeats
        assert len(steps) * batch <= max(MAX_PREVIEW_IMAGES, batch)
    capacity = max(1, MAX_PREVIEW_IMAGES // batch)
    steps = [step.index for step in kept.steps]
    if outer <= capacity:
        assert steps == list(range(outer))  # every outer step while they fit
    elif capacity > 1:
        grid = steps[:-1] if (outer - 1) % kept.stride else steps
        assert grid[0] == 0 and all(b - a == kept.stride for a, b in zip(grid, grid[1:]))  # evenly spaced
        assert len(steps) >= min(capacity // 2, outer)
    else:
        assert steps == [outer - 1]
    assert all(float(step.latent[0, 0]) == step.index for step in kept.steps)
