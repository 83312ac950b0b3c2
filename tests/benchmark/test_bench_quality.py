"""The benchmark's quality part (bench/quality.py) on the exact model: every outer boundary's image even where
``outer_previews`` keeps only some (at most 64 images: a batch of 32 fits two outer steps). It used to read the
boundaries from ``outer_previews`` and stopped with a reshape error at batch 32 x 3 outer steps."""
from __future__ import annotations


def test_nested_run_records_every_boundary_beyond_what_outer_previews_keeps(pack):
    from comfyui_nested_diffusion.bench import quality
    from comfyui_nested_diffusion.bench.models import exact_model

    model, cond, exemplars = exact_model("eps")
    run = quality.nested_run(model, cond, exemplars, "eps", outer=3, inner=8, batch=32)
    assert run["nfe_at_boundary"] == [8, 16, 24] and run["nfe_counted"] == 24
    assert len(run["boundary_distance"]) == 3 and run["final_equals_last_preview"]
    assert len(run["nfe_reported_steps"]) < 3  # outer_previews kept fewer steps than ran
    assert quality.reported_as_counted(run)
    assert max(run["boundary_distance"]) < 0.05  # each boundary image lies on the data (the exemplars' spread is 0.05)
