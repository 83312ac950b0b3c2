"""A sampler regression fails here: a small NestedKSampler run through the node (the digits flow model, euler,
4 x 10, CFG 1, 64 samples, one seed) is scored with the metric and must land within the interval that the saved
figure gives a single run (bench/results/digits_check_64.json: the same run over 6 seeds, mean +- 4 sd, written
by ``bench/digits_quality.py check``). A broken outer step, wrong noise or a mis-scaled latent moves the FID of
64 digits far outside it; another torch build moves it by far less."""
import json

import pytest
from comfyui_nested_diffusion.tools.comfy_env import REPO_ROOT

SAVED = REPO_ROOT / "bench" / "results" / "digits_check_64.json"


@pytest.fixture(scope="module")
def saved():
    return json.loads(SAVED.read_text())


@pytest.fixture(scope="module")
def scores(pack, saved):
    import torch
    from comfyui_nested_diffusion.bench import digits_quality
    from comfyui_nested_diffusion.demo_models.digits.model import load_digits_model

    torch.set_num_threads(1)
    model = load_digits_model(saved["variant"])
    return digits_quality.check_scores(model, seed=saved["seeds"][0], count=saved["samples"],
                                       variant=saved["variant"], solver=saved["solver"])


def test_saved_figure_is_the_check_the_test_runs(saved):
    from comfyui_nested_diffusion.bench import digits_quality

    assert (saved["variant"], saved["solver"], saved["samples"]) == (
        digits_quality.CHECK_VARIANT, digits_quality.CHECK_SOLVER, digits_quality.CHECK_SAMPLES)
    assert len(saved["fid_by_seed"]) >= 5 and saved["command"].startswith("scripts/python.sh")
    low, high = saved["fid_interval"]
    assert low < saved["fid_mean"] < high


def test_a_node_run_scores_within_the_saved_interval(saved, scores):
    low, high = saved["fid_interval"]
    assert low <= scores["fid"] <= high, (scores, saved["fid_interval"])


def test_a_node_run_reads_as_the_digits_asked_for(saved, scores):
    assert scores["accuracy"] >= saved["accuracy_min"] - 0.05, (scores, saved["accuracy_by_seed"])
