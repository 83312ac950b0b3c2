"""The anytime claim on the learned eps digits model, inside a real ComfyUI (issue 10): a distribution measure.

200 class-conditional samples (digits 0-9 in turn, CFG 1: the model's own conditional distribution), the
deterministic inner solver (euler, ``outer_step`` auto), 4 outer x 10 inner against KSampler with 40 euler steps on
the same noise. The FID-like score (demo_models/digits/metrics.py) compares whole sets of images with the real
digits, so a sampler that lands every image on a digit but with the wrong spread scores badly. Measured at 1000
samples (docs/results.md): nested 42.7 / 19.2 / 15.9 / 14.9 vs KSampler's x0 98.1 / 48.5 / 43.9 / 46.9 at NFE
10 / 20 / 30 / 40; at these 200 samples 47 / 28 / 23 / 23 vs 96 / 53 / 49 / 51. The bounds leave room for the
noise of 200 samples and for another torch; the benchmark's fid part checks the issue's exact targets.
"""
import pytest

SAMPLES = 200
OUTER, INNER = 4, 10


@pytest.fixture(scope="module")
def runs(pack):
    from comfyui_nested_diffusion.bench import fid as bench
    from comfyui_nested_diffusion.demo_models.digits.metrics import class_accuracy, fid
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    model = load_digits_model("eps")
    labels = bench.labels_for(SAMPLES)
    positive, negative = bench.digit_conditioning(labels)
    final, ksampler_x0 = bench.ksampler_with_x0(model, "euler", OUTER * INNER, "normal", positive, negative, SAMPLES,
                                                cfg=1.0)
    ksampler = {"x0": ksampler_x0, "final": fid(final), "accuracy": class_accuracy(final, labels)}
    final, boundaries, mode = bench.nested_with_previews(model, "euler", OUTER, INNER, "normal", positive, negative,
                                                         SAMPLES, cfg=1.0)
    nested = {"boundaries": boundaries, "final": fid(final), "accuracy": class_accuracy(final, labels),
              "outer_step": mode}
    return nested, ksampler


def test_auto_re_noises_after_the_deterministic_solver(runs):
    nested, _ = runs
    assert nested["outer_step"] == "renoise"


def test_first_anytime_image_is_far_better_than_ksamplers_estimate(runs):
    nested, ksampler = runs
    first = nested["boundaries"][INNER]
    assert first <= 0.7 * ksampler["x0"][INNER], (first, ksampler["x0"][INNER])


def test_nested_is_at_or_below_ksampler_at_every_boundary_and_at_the_end(runs):
    nested, ksampler = runs
    assert sorted(nested["boundaries"]) == [INNER * (k + 1) for k in range(OUTER)]
    behind = {n: (v, ksampler["x0"][n]) for n, v in nested["boundaries"].items() if v > ksampler["x0"][n]}
    assert not behind, behind
    assert nested["final"] == pytest.approx(nested["boundaries"][OUTER * INNER])  # the last anytime image is the result
    assert nested["final"] <= 0.8 * ksampler["final"], (nested["final"], ksampler["final"])


def test_class_accuracy_is_kept(runs):
    nested, ksampler = runs
    assert nested["accuracy"] >= ksampler["accuracy"] - 0.02, (nested["accuracy"], ksampler["accuracy"])
