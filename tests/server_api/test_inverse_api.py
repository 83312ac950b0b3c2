"""The inverse-problem nodes over the API of a real ComfyUI server: the example workflows (one per task) run and
their saved images agree with the measurement, NestedSampler in SamplerCustomAdvanced takes the patched model, and
every bad input comes back as an error naming the input (the server stays usable)."""
from __future__ import annotations

import copy
import io

import pytest

pytest.importorskip("requests")
pytest.importorskip("websocket")
Image = pytest.importorskip("PIL.Image")
import torch  # noqa: E402
from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT  # noqa: E402
from comfyui_nested_diffusion.tools import workflow_checks as wc  # noqa: E402
from comfyui_nested_diffusion.tools.comfy_api_client import ExecutionError, PromptValidationError  # noqa: E402
from comfyui_nested_diffusion.tools.inverse_workflows import TASK_SETTINGS, workflow_name  # noqa: E402

# node ids of tools/inverse_workflows.py
TRUTH_SAVE, MEASUREMENT_SAVE, DEGRADE, INVERSE, NESTED, VANILLA = "6", "8", "7", "9", "10", "11"
NESTED_SAVE, VANILLA_SAVE = "13", "15"
PNG_STEP = 1.0 / 255  # saved images are 8-bit


def api_prompt(task: str) -> dict:
    return wc.load(wc.EXAMPLES_DIR / "api" / f"{workflow_name(task)}_api.json")


def pixels_of(client, output: dict) -> torch.Tensor:
    """Saved images as [B, 3, H, W] in [-1, 1]."""
    import numpy

    images = [Image.open(io.BytesIO(client.fetch_output(item))).convert("RGB") for item in output["images"]]
    array = numpy.stack([numpy.asarray(image, dtype=numpy.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def measured_component(task: str, pixels: torch.Tensor) -> torch.Tensor:
    """H x as the example measures it (its mask: the right half unknown)."""
    if task == "super_resolution":
        return torch.nn.functional.avg_pool2d(pixels, TASK_SETTINGS[task][1])
    if task == "colorization":
        return pixels.mean(dim=1, keepdim=True)
    if task == "inpainting":
        return pixels[..., : pixels.shape[-1] // 2]
    return pixels


@pytest.mark.parametrize("task", list(TASK_SETTINGS))
def test_example_workflow_runs_and_its_images_agree_with_the_measurement(task, client):
    prompt = api_prompt(task)
    prompt_id, events = client.run(prompt, timeout=300)
    entry = client.history(prompt_id)
    assert entry["status"]["status_str"] == "success"
    outputs = entry["outputs"]
    truth = pixels_of(client, outputs[TRUTH_SAVE])
    measurement = pixels_of(client, outputs[MEASUREMENT_SAVE])
    nested, vanilla = pixels_of(client, outputs[NESTED_SAVE]), pixels_of(client, outputs[VANILLA_SAVE])
    assert nested.shape == vanilla.shape == truth.shape == (4, 3, 32, 32)
    steps = [e for e in events if e["type"] == OUTER_STEP_EVENT and e["data"]["node"] == NESTED]
    assert [e["data"]["outer_step"] for e in steps] == [1, 2, 3, 4]
    y = measured_component(task, measurement) if task != "super_resolution" else measurement
    assert y.shape[-1] == (8 if task == "super_resolution" else 16 if task == "inpainting" else 32)
    if TASK_SETTINGS[task][2] == 0:  # noise-free: exact up to the 8-bit rounding of the saved images ...
        for solution in (nested, vanilla):
            # ... where saving did not clip: a consistent solution may leave [0, 1] (colorization of a wrong
            # exemplar plus the gray correction), and SaveImage clips it
            inside = (solution.abs() < 1 - PNG_STEP).all(dim=1, keepdim=True).expand_as(solution).float()
            unclipped = measured_component(task, inside) == 1
            assert unclipped.float().mean() > 0.5
            assert (measured_component(task, solution) - y).abs()[unclipped].max() <= 3 * 2 * PNG_STEP
    else:  # noisy: the solution (a sample, whose error includes the data's own spread) is nearer the truth
        assert (nested - truth).pow(2).mean() < (measurement - truth).pow(2).mean()


def test_nested_sampler_in_sampler_custom_advanced_takes_the_patched_model(client):
    """NestedSampler + CFGGuider on the Inverse Problem's MODEL: the solution pools back to the measurement."""
    prompt = api_prompt("super_resolution")
    for node in (NESTED, VANILLA, "12", "13", "14", "15", "16"):
        prompt.pop(node)
    prompt.update({
        "30": {"class_type": "CFGGuider", "inputs": {"model": [INVERSE, 0], "positive": ["1", 1], "negative": ["1", 1],
                                                     "cfg": 1.0}},
        "31": {"class_type": "BasicScheduler", "inputs": {"model": [INVERSE, 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}},
        "32": {"class_type": "InnerSolverSelect", "inputs": {"sampler_name": "euler_ancestral", "scheduler": "normal",
                                                             "steps": 6, "eta": 1.0, "s_noise": 1.0,
                                                             "step_schedule": ""}},
        "33": {"class_type": "NestedSampler", "inputs": {"outer_eta": 0.0, "outer_step": "auto",
                                                         "inner_solver": ["32", 0]}},
        "34": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "35": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["34", 0], "guider": ["30", 0],
                                                                 "sampler": ["33", 0], "sigmas": ["31", 0],
                                                                 "latent_image": [INVERSE, 1]}},
        "36": {"class_type": "VAEDecode", "inputs": {"samples": ["35", 0], "vae": ["3", 0]}},
        "37": {"class_type": "SaveImage", "inputs": {"images": ["36", 0], "filename_prefix": "nested_inverse/custom"}},
    })
    prompt_id, _ = client.run(prompt, timeout=300)
    outputs = client.history(prompt_id)["outputs"]
    solution, measurement = pixels_of(client, outputs["37"]), pixels_of(client, outputs[MEASUREMENT_SAVE])
    assert solution.shape == (4, 3, 32, 32)
    assert (measured_component("super_resolution", solution) - measurement).abs().max() <= 6 * PNG_STEP


def bad(prompt: dict, node: str, **inputs) -> dict:
    changed = copy.deepcopy(prompt)
    changed[node]["inputs"].update(inputs)
    return changed


def execution_error(client, prompt: dict) -> ExecutionError:
    with pytest.raises(ExecutionError) as failed:
        client.run(prompt, timeout=300)
    return failed.value


def test_bad_inputs_come_back_naming_the_input_and_the_server_stays_usable(client):
    prompt = api_prompt("super_resolution")
    negative = bad(prompt, INVERSE, sigma_y=-0.1)
    for output in (TRUTH_SAVE, MEASUREMENT_SAVE):  # ComfyUI would still run the outputs that do not need the node
        negative.pop(output)
    with pytest.raises(PromptValidationError) as refused:
        client.queue_prompt(negative)
    assert "sigma_y" in str(refused.value.node_errors[INVERSE])
    from comfyui_nested_diffusion.nested_core import NestedDiffusionError  # the node's own check (NaN, direct calls)
    from comfyui_nested_diffusion.nested_core.measurements import check_sigma_y

    with pytest.raises(NestedDiffusionError, match="sigma_y must be a number >= 0"):
        check_sigma_y(float("nan"))
    # factor 3 does not divide the 32x32 truth
    error = execution_error(client, bad(prompt, DEGRADE, factor=3))
    assert "factor 3 does not divide the image size 32x32" in error.exception_message
    # the measurement is 8x8 (factor 4) but the node is told factor 2: its latent is 16x16, the sampler's 32x32
    wrong = bad(prompt, INVERSE, factor=2)
    wrong[VANILLA]["inputs"]["latent_image"] = ["2", 0]
    wrong[NESTED]["inputs"]["latent_image"] = ["2", 0]
    error = execution_error(client, wrong)
    assert "image is 8x8, but a 32x32 latent at factor 2 needs a 16x16 image" in error.exception_message
    # a latent batch of 3 for 4 measured images
    batch = copy.deepcopy(prompt)
    batch["40"] = {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 3}}
    batch[NESTED]["inputs"]["latent_image"] = ["40", 0]
    error = execution_error(client, batch)
    assert "image batch is 4, but the latent batch is 3" in error.exception_message
    # a mask of another size than the image
    masked = api_prompt("inpainting")
    masked["22"]["inputs"]["destination"] = ["41", 0]
    masked["41"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 16, "height": 32}}
    error = execution_error(client, masked)
    assert "mask is 16x32, but the image is 32x32" in error.exception_message
    # the server still runs the good prompt
    prompt_id, _ = client.run(bad(prompt, NESTED, seed=8), timeout=300)
    assert client.history(prompt_id)["status"]["status_str"] == "success"
