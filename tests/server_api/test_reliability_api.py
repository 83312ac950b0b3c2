"""Reliability through the API: bad input, Cancel, many prompts, same seed same image, and where files go.

Everything runs on the session's real ComfyUI server (the `comfy_server` fixture) with the pack's exact exemplar
model, so no weights are needed and each prompt takes a fraction of a second. docs/reliability.md has the table of
the bad inputs tried here and what each one gets.

ComfyUI caches node outputs: a prompt identical to the previous one is served from the cache without sampling.
Wherever a test needs a real second run it either uses an equivalent but different graph (the latent through a
LatentMultiply by 1.0, which is exact) or queues another prompt in between (ComfyUI's default cache keeps only the
last prompt's nodes), and it always checks from the events that the sampler really ran.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest
import requests
from api_helpers import (
    OUTER_STEP_EVENT,
    PREVIEW,
    SAMPLER,
    SAVE,
    decode,
    nested_prompt,
    of_type,
    previews_per_outer_step,
)
from comfyui_nested_diffusion.protocol import FINISH_ROUTE, RUNNING_ROUTE
from comfyui_nested_diffusion.scripts import load_test
from comfyui_nested_diffusion.tools import workflow_checks as wc
from comfyui_nested_diffusion.tools.comfy_api_client import ExecutionError, ExecutionInterrupted, PromptValidationError
from comfyui_nested_diffusion.tools.workflow_checks import REPO_ROOT

_SEEDS = itertools.count(880_001)  # seeds no other test file uses: every prompt here must really sample


def fresh_seed() -> int:
    return next(_SEEDS)


def demo_api_workflow() -> Path:
    """The demo's API-format workflow."""
    return REPO_ROOT / "example_workflows" / "api" / "nested_vs_vanilla_exemplar_api.json"


# -- queueing and outcomes -------------------------------------------------------------------------------------
def post_prompt(client, prompt: dict, extra_data: Optional[dict] = None) -> tuple[str, dict]:
    """POST /prompt like the client does, but with NaN/Inf allowed in the JSON (as JavaScript clients can send).
    Returns (prompt_id, response body); raises PromptValidationError on HTTP 400."""
    body = {"prompt": prompt, "client_id": client.client_id, **({"extra_data": extra_data} if extra_data else {})}
    response = client.session.post(f"{client.url}/prompt", data=json.dumps(body), timeout=30,
                                   headers={"Content-Type": "application/json"})
    if response.status_code == 400:
        raise PromptValidationError(response.json(), 400)
    response.raise_for_status()
    answer = response.json()
    return answer["prompt_id"], answer


@dataclass
class Outcome:
    kind: str  # "rejected" (HTTP 400), "error" (execution_error), "ok"
    message: str = ""
    prompt_id: Optional[str] = None
    node_type: Optional[str] = None
    exception_type: Optional[str] = None
    validation: Optional[PromptValidationError] = None
    events: list = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.kind}: {self.node_type or ''} {self.message}".strip()


def attempt(client, prompt: dict, timeout: float = 180, extra_data: Optional[dict] = None) -> Outcome:
    """Queue a prompt and wait for it; never raises for what ComfyUI reports (that is the outcome)."""
    try:
        prompt_id, answer = post_prompt(client, prompt, extra_data)
    except PromptValidationError as rejected:
        return Outcome("rejected", str(rejected), validation=rejected)
    assert not answer.get("node_errors"), f"some outputs were dropped at validation: {answer['node_errors']}"
    events: list = []
    try:
        for event in client.stream(prompt_id, timeout=timeout):
            event["received"] = time.monotonic()
            events.append(event)
    except ExecutionError as failed:
        return Outcome("error", failed.exception_message, prompt_id, failed.node_type, failed.exception_type, events=events)
    return Outcome("ok", "", prompt_id, events=events)


def ran(outcome: Outcome, node: str) -> bool:
    """The node really executed in this prompt (it was not served from ComfyUI's cache)."""
    cached = {n for e in of_type(outcome.events, "execution_cached") for n in e["data"].get("nodes", [])}
    executed = {e["data"].get("node") for e in of_type(outcome.events, "executing")}
    return node in executed and node not in cached


def small_good_prompt(exemplar_defaults: dict) -> dict:
    prompt = nested_prompt(fresh_seed(), outer_steps=2, inner_steps=2, prefix="reliability_after",
                           exemplar_defaults=exemplar_defaults)
    prompt["2"]["inputs"]["batch_size"] = 1
    del prompt[PREVIEW]
    return prompt


def assert_server_recovers(comfy_server, client, exemplar_defaults) -> None:
    """The server process is alive, its queue is empty, nothing is left registered, and a good prompt runs."""
    assert comfy_server.running, "the ComfyUI server process died"
    queue = client.queue()
    assert queue["queue_running"] == [] and queue["queue_pending"] == [], queue
    assert requests.get(f"{comfy_server.url}{RUNNING_ROUTE}", timeout=10).json()["running"] == []
    outcome = attempt(client, small_good_prompt(exemplar_defaults))
    assert outcome.kind == "ok", f"the next good prompt failed: {outcome.describe()}"
    assert ran(outcome, SAMPLER)
    assert [e["data"]["outer_step"] for e in of_type(outcome.events, OUTER_STEP_EVENT, SAMPLER)] == [1, 2]


# -- bad-input prompts -----------------------------------------------------------------------------------------
def with_inputs(prompt: dict, node: str = SAMPLER, **inputs) -> dict:
    prompt[node]["inputs"].update(inputs)
    return prompt


def base(ex, **kwargs) -> dict:
    return nested_prompt(fresh_seed(), exemplar_defaults=ex, **kwargs)


def solver_prompt(ex, **solver_inputs) -> dict:
    """nested_prompt with an InnerSolverSelect (node 8) whose inputs are overridden."""
    prompt = base(ex, step_schedule="")
    prompt["8"]["inputs"].update(solver_inputs)
    return prompt


def pixel_latent(prompt: dict) -> list:
    """A non-zero 3-channel 32x32 latent from stock nodes: EmptyImage (a colour) -> VAEEncode (pixel_space)."""
    prompt["20"] = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 2, "color": 0x336699}}
    prompt["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 0]}}
    return ["21", 0]


def four_channel_latent(prompt: dict) -> list:
    """A non-zero 4-channel latent (ComfyUI's fix_empty_latent_channels silently fixes all-zero ones). On a 4-D
    latent LatentCut / LatentConcat's "t" dimension is the channel dimension: 3 channels + 1 of them = 4."""
    source = pixel_latent(prompt)
    prompt["22"] = {"class_type": "LatentCut", "inputs": {"samples": source, "dim": "t", "index": 0, "amount": 1}}
    prompt["23"] = {"class_type": "LatentConcat", "inputs": {"samples1": source, "samples2": ["22", 0], "dim": "t"}}
    return ["23", 0]


def non_finite_latent(prompt: dict, nan: bool) -> list:
    """Inf (and Inf - Inf = NaN) from stock nodes: LatentMultiply (at most x10 each) chained 42 times overflows
    float32; LatentSubtract of that from itself gives NaN."""
    latent = pixel_latent(prompt)
    for step in range(42):
        prompt[f"mul{step}"] = {"class_type": "LatentMultiply", "inputs": {"samples": latent, "multiplier": 10.0}}
        latent = [f"mul{step}", 0]
    if nan:
        prompt["sub"] = {"class_type": "LatentSubtract", "inputs": {"samples1": latent, "samples2": latent}}
        latent = ["sub", 0]
    return latent


def with_latent(ex, make) -> dict:
    prompt = base(ex)
    prompt[SAMPLER]["inputs"]["latent_image"] = make(prompt)
    return prompt


def preview_only(ex, make) -> dict:
    """OuterStepPreview (the only output) fed with a latent that did not come from a nested sampler."""
    prompt = base(ex)
    prompt[PREVIEW]["inputs"]["previews"] = make(prompt)
    del prompt[SAVE]
    return prompt


def pick_prompt(ex, index: int) -> dict:
    """NestedKSamplerAdvanced stage (batch 2) -> NestedPickCandidate, the only output."""
    prompt = base(ex)
    inputs = {k: v for k, v in prompt[SAMPLER]["inputs"].items() if k not in ("seed", "denoise")}
    prompt[SAMPLER] = {"class_type": "NestedKSamplerAdvanced", "inputs": {
        **inputs, "add_noise": "enable", "noise_seed": fresh_seed(), "start_at_outer_step": 0,
        "end_at_outer_step": 2, "return_with_leftover_noise": "enable"}}
    prompt["9"] = {"class_type": "NestedPickCandidate",
                   "inputs": {"samples": [SAMPLER, 0], "outer_previews": [SAMPLER, 1], "index": index, "vae": ["4", 0]}}
    del prompt[SAVE], prompt[PREVIEW]
    return prompt


def advanced_stage(ex, start: int, end: int) -> dict:
    prompt = pick_prompt(ex, 0)
    del prompt["9"]
    prompt[SAMPLER]["inputs"].update(start_at_outer_step=start, end_at_outer_step=end, return_with_leftover_noise="disable")
    prompt["5"]["inputs"]["samples"] = [SAMPLER, 0]
    prompt[SAVE] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "reliability_stage"}}
    return prompt


def custom_sampler(ex, sigmas_node: dict, output: int) -> dict:
    """SamplerCustom with NestedSampler and the given SIGMAS node (its input: BasicScheduler with 5 steps)."""
    prompt = base(ex)
    prompt["40"] = {"class_type": "NestedSampler", "inputs": {}}
    prompt["41"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 5, "denoise": 1.0}}
    prompt["42"] = {**sigmas_node, "inputs": {**sigmas_node["inputs"], "sigmas": ["41", 0]}}
    prompt[SAMPLER] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["1", 0], "add_noise": True, "noise_seed": fresh_seed(), "cfg": 1.0, "positive": ["1", 1],
        "negative": ["1", 1], "sampler": ["40", 0], "sigmas": ["42", output], "latent_image": ["2", 0]}}
    del prompt[PREVIEW]
    return prompt


ALLOWED_MAX = r"(at most|up to|maximum|no more than|<=|≤)\D{0,40}\d+"
NAN = float("nan")

# (id, prompt builder, the input the answer must name, regexes that must all match the answer: the allowed values)
BAD_INPUTS = [
    ("outer_steps=0", lambda ex: base(ex, outer_steps=0), "outer_steps", [r"min of 1"]),
    ("outer_steps=-3", lambda ex: base(ex, outer_steps=-3), "outer_steps", [r"min of 1"]),
    ("outer_steps=5000", lambda ex: base(ex, outer_steps=5000), "outer_steps", [r"max of 1000"]),
    ("inner_steps=0", lambda ex: base(ex, inner_steps=0), "inner_steps", [r"min of 1"]),
    ("inner_steps=-1", lambda ex: base(ex, inner_steps=-1), "inner_steps", [r"min of 1"]),
    ("inner_steps=20000", lambda ex: base(ex, inner_steps=20000), "inner_steps", [r"max of 10000"]),
    ("inner_steps=5000 ddim_uniform", lambda ex: with_inputs(base(ex, inner_steps=5000), scheduler="ddim_uniform"),
     "inner_steps", [r"ddim_uniform", ALLOWED_MAX]),
    ("outer_steps=1000 ddim_uniform", lambda ex: with_inputs(base(ex, outer_steps=1000, inner_steps=1),
                                                             scheduler="ddim_uniform"),
     "outer_steps", [r"ddim_uniform", ALLOWED_MAX]),
    ("InnerSolverSelect steps=5000 ddim_uniform", lambda ex: solver_prompt(ex, steps=5000, scheduler="ddim_uniform"),
     "steps", [r"\binner", r"ddim_uniform", ALLOWED_MAX]),
    ("step_schedule='1,x'", lambda ex: base(ex, step_schedule="1,x"), "step_schedule", [r"positive integers"]),
    ("step_schedule='0,5,5,5'", lambda ex: base(ex, step_schedule="0,5,5,5"), "step_schedule", [r"from 1 to 10000"]),
    ("step_schedule='-1,5,5,5'", lambda ex: base(ex, step_schedule="-1,5,5,5"), "step_schedule", [r"positive integers"]),
    ("step_schedule='5.5,5,5,5'", lambda ex: base(ex, step_schedule="5.5,5,5,5"), "step_schedule", [r"positive integers"]),
    ("step_schedule='[5,5,5,5]'", lambda ex: base(ex, step_schedule="[5,5,5,5]"), "step_schedule", [r"positive integers"]),
    ("step_schedule='99999,1,1,1'", lambda ex: base(ex, step_schedule="99999,1,1,1"), "step_schedule", [r"from 1 to 10000"]),
    ("step_schedule='random'", lambda ex: base(ex, step_schedule="random"), "step_schedule",
     [r"positive integers", r"uniform, front-loaded, back-loaded"]),
    ("step_schedule='5,5' for 4 outer", lambda ex: base(ex, step_schedule="5,5"), "step_schedule",
     [r"outer_steps is 4", r"one per outer step"]),
    ("step_schedule='5,5,5,5,5' for 4 outer", lambda ex: base(ex, step_schedule="5,5,5,5,5"), "step_schedule",
     [r"outer_steps is 4", r"one per outer step"]),
    ("denoise=0", lambda ex: with_inputs(base(ex), denoise=0.0), "denoise", [r"min of 0\.01"]),
    ("denoise=1.5", lambda ex: with_inputs(base(ex), denoise=1.5), "denoise", [r"max of 1\.0"]),
    ("denoise=NaN", lambda ex: with_inputs(base(ex), denoise=NAN), "denoise", [r"above 0", r"at most 1"]),
    ("max_nfe below one inner diffusion", lambda ex: with_inputs(base(ex), max_nfe=3), "max_nfe", [r"at least 5"]),
    ("latent_image with 4 channels", lambda ex: with_latent(ex, four_channel_latent), "latent_image",
     [r"4 channels", r"3-channel"]),
    ("latent_image with Inf", lambda ex: with_latent(ex, lambda p: non_finite_latent(p, nan=False)), "latent_image",
     [r"NaN or Inf", r"finite"]),
    ("latent_image with NaN", lambda ex: with_latent(ex, lambda p: non_finite_latent(p, nan=True)), "latent_image",
     [r"NaN or Inf", r"finite"]),
    ("OuterStepPreview: 4-channel previews, 3-channel VAE", lambda ex: preview_only(ex, four_channel_latent),
     "previews", [r"4 latent channels", r"3-channel"]),
    ("NestedPickCandidate index=5 of 2", lambda ex: pick_prompt(ex, 5), "index", [r"0 to 1"]),
    ("NestedPickCandidate index=-1", lambda ex: pick_prompt(ex, -1), "index", [r"min of 0"]),
    ("NestedKSamplerAdvanced start 3 >= end 2", lambda ex: advanced_stage(ex, 3, 2), "start_at_outer_step",
     [r"end_at_outer_step"]),
    ("NestedSampler: increasing sigmas (FlipSigmas)",
     lambda ex: custom_sampler(ex, {"class_type": "FlipSigmas", "inputs": {}}, 0), "sigmas", [r"strictly decreasing"]),
    ("NestedSampler: one sigma (SplitSigmas at the end)",
     lambda ex: custom_sampler(ex, {"class_type": "SplitSigmas", "inputs": {"step": 5}}, 1), "sigmas", [r"at least 2"]),
    ("sampler_name not a ComfyUI sampler", lambda ex: with_inputs(base(ex), sampler_name="no_such_sampler"),
     "sampler_name", [r"euler_ancestral", r"dpmpp_2m"]),
    # Non-finite numbers pass ComfyUI's min/max validation (NaN compares false); the pack must refuse them itself.
    ("outer_eta=NaN", lambda ex: with_inputs(base(ex), outer_eta=NAN), "outer_eta", [r"\b0\b", r"\b1\b"]),
    ("InnerSolverSelect eta=NaN", lambda ex: solver_prompt(ex, sampler_name="euler_ancestral", eta=NAN), "eta",
     [r"\b0\b"]),
    ("max_seconds=NaN", lambda ex: with_inputs(base(ex), max_seconds=NAN), "max_seconds", [r"\b0\b"]),
]


def check_clear_answer(outcome: Outcome, input_name: str, allowed: list[str]) -> None:
    """A 400 naming the input, or a handled execution error whose message names it and the allowed values."""
    if outcome.kind == "ok":
        pytest.fail(f"accepted silently: the prompt ran to the end instead of refusing {input_name}")
    if outcome.kind == "rejected":
        items = [item for node in outcome.validation.node_errors.values() for item in node.get("errors", [])]
        # ComfyUI's range checks set extra_info.input_name; a node's own validate_inputs can only say it in words.
        named = [item for item in items if (item.get("extra_info") or {}).get("input_name") == input_name
                 or re.search(rf"\b{re.escape(input_name)}\b", f"{item.get('message', '')} {item.get('details', '')}")]
        assert named, f"HTTP 400 without an error on input {input_name!r}: {outcome.message}"
        text = " ".join(f"{item.get('message', '')} {item.get('details', '')}" for item in named)
        if any(item.get("type") == "value_not_in_list" for item in named):
            # ComfyUI 0.8.0 on validates combo values at /prompt itself: its own message, the editor shows the list
            assert all("received_value" in (item.get("extra_info") or {}) for item in named), named
            return
    else:
        assert (outcome.exception_type or "").endswith("NestedDiffusionError"), (
            f"crash, not a handled error: {outcome.exception_type}: {outcome.message}")
        text = outcome.message
        assert re.search(rf"\b{re.escape(input_name)}\b", text), f"the message does not name {input_name!r}: {text}"
    for pattern in allowed:
        assert re.search(pattern, text), f"the message does not give the allowed values ({pattern!r}): {text}"


@pytest.mark.parametrize("build, input_name, allowed", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_gets_a_clear_answer_and_the_server_recovers(comfy_server, client, exemplar_defaults, build,
                                                               input_name, allowed):
    outcome = attempt(client, build(exemplar_defaults))
    try:
        check_clear_answer(outcome, input_name, allowed)
        if outcome.kind == "error":
            assert client.history(outcome.prompt_id)["status"]["status_str"] == "error"
    finally:
        assert_server_recovers(comfy_server, client, exemplar_defaults)


def conditioning_variant(prompt: dict, kind: str) -> dict:
    if kind == "zeroed (ConditioningZeroOut)":
        prompt["30"] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["1", 1]}}
    else:  # a range that starts after it ends: the conditioning is never active, i.e. empty at every step
        prompt["30"] = {"class_type": "ConditioningSetTimestepRange",
                        "inputs": {"conditioning": ["1", 1], "start": 0.8, "end": 0.2}}
    prompt[SAMPLER]["inputs"]["positive"] = ["30", 0]
    prompt[SAMPLER]["inputs"]["negative"] = ["30", 0]
    return prompt


def as_vanilla(prompt: dict, steps: int) -> dict:
    inputs = {k: v for k, v in prompt[SAMPLER]["inputs"].items() if k not in ("outer_steps", "inner_steps", "inner_solver")}
    prompt[SAMPLER] = {"class_type": "KSampler", "inputs": {**inputs, "steps": steps}}
    prompt.pop(PREVIEW, None)
    return prompt


@pytest.mark.parametrize("kind", ["zeroed (ConditioningZeroOut)", "empty (ConditioningSetTimestepRange 0.8 > 0.2)"])
def test_degenerate_conditioning_is_treated_like_ksampler(comfy_server, client, exemplar_defaults, kind):
    """Conditioning of another width cannot be built with stock nodes and no CLIP; zeroed and never-active
    conditioning can. Whatever KSampler does with them, the nested sampler must do too (here: run)."""
    seed = fresh_seed()
    nested = attempt(client, conditioning_variant(nested_prompt(seed, prefix="reliability_cond",
                                                                exemplar_defaults=exemplar_defaults), kind))
    vanilla = attempt(client, conditioning_variant(as_vanilla(nested_prompt(seed, exemplar_defaults=exemplar_defaults),
                                                              20), kind))
    assert (nested.kind, vanilla.kind) == ("ok", "ok"), (nested.describe(), vanilla.describe())
    assert [e["data"]["outer_step"] for e in of_type(nested.events, OUTER_STEP_EVENT, SAMPLER)] == [1, 2, 3, 4]
    assert_server_recovers(comfy_server, client, exemplar_defaults)


# -- Cancel ----------------------------------------------------------------------------------------------------
def saved_pixels(client, prompt_id: str, node: str = SAVE) -> list[bytes]:
    images = client.history(prompt_id)["outputs"][node]["images"]
    return [decode(client.fetch_output(i)).convert("RGB").tobytes() for i in images]


def last_preview_per_outer_step(events: list[dict], outer: int) -> list[bytes]:
    groups = previews_per_outer_step(events)[:outer]
    assert all(groups), f"an outer step without a preview: {[len(g) for g in groups]}"
    return [group[-1]["data"]["image"] for group in groups]


def cancel_prompt(ex, seed: int, outer: int, inner: int, passthrough: bool = False) -> dict:
    """Stochastic everywhere: ancestral inner solver and outer_eta > 0, so the seeded noise streams must resume
    exactly after a cancelled run."""
    prompt = nested_prompt(seed, outer_steps=outer, inner_steps=inner, prefix="reliability_cancel", exemplar_defaults=ex)
    prompt["2"]["inputs"]["batch_size"] = 1
    with_inputs(prompt, sampler_name="euler_ancestral", outer_eta=0.5)
    del prompt[PREVIEW]
    if passthrough:  # an equivalent graph ComfyUI cannot serve from the cache: x * 1.0 == x exactly
        prompt["12"] = {"class_type": "LatentMultiply", "inputs": {"samples": ["2", 0], "multiplier": 1.0}}
        prompt[SAMPLER]["inputs"]["latent_image"] = ["12", 0]
    return prompt


def test_cancel_at_random_points_then_the_same_prompt_gives_the_same_image(comfy_server, client, exemplar_defaults):
    outer, inner, seed = 24, 8, fresh_seed()
    rng = random.Random(20240607)

    reference = attempt(client, cancel_prompt(exemplar_defaults, seed, outer, inner, passthrough=True))
    assert reference.kind == "ok" and ran(reference, SAMPLER), reference.describe()
    reference_pixels = saved_pixels(client, reference.prompt_id)
    reference_previews = last_preview_per_outer_step(reference.events, outer)
    started = of_type(reference.events, "execution_start")[0]["received"]
    sampling_seconds = of_type(reference.events, OUTER_STEP_EVENT, SAMPLER)[-1]["received"] - started

    interrupted = 0
    for _ in range(4):
        prompt_id = client.queue_prompt(cancel_prompt(exemplar_defaults, seed, outer, inner))
        # Somewhere from the start of the prompt to the end of its sampling (mostly inside an inner diffusion).
        delay = rng.uniform(0.02, 0.95) * sampling_seconds
        timers, events = [], []
        try:
            for event in client.stream(prompt_id, timeout=180):
                events.append(event)
                if event["type"] == "execution_start" and event["data"].get("prompt_id") == prompt_id:
                    timer = threading.Timer(delay, lambda: requests.post(
                        f"{comfy_server.url}/interrupt", json={"prompt_id": prompt_id}, timeout=10))
                    timer.start()
                    timers.append(timer)
        except ExecutionInterrupted:
            interrupted += 1
            assert SAVE not in client.history(prompt_id).get("outputs", {})
        finally:
            for timer in timers:
                timer.cancel()
                timer.join(5)
        if len(of_type(events, OUTER_STEP_EVENT, SAMPLER)) == outer:
            # The interrupt came after the sampler had finished (in the decode, or after the end): the sampler's
            # output is cached now. Check the image if it was saved, and queue another prompt in between so that
            # the next attempt samples again.
            if SAVE in client.history(prompt_id).get("outputs", {}):
                assert saved_pixels(client, prompt_id) == reference_pixels
            assert attempt(client, small_good_prompt(exemplar_defaults)).kind == "ok"
        assert comfy_server.running
        assert requests.get(f"{comfy_server.url}{RUNNING_ROUTE}", timeout=10).json()["running"] == []
        queue = client.queue()
        assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert interrupted >= 2, "the interrupts did not land: the runs are too short for this machine"

    final = attempt(client, cancel_prompt(exemplar_defaults, seed, outer, inner))
    assert final.kind == "ok", final.describe()
    assert ran(final, SAMPLER), "the final run was served from the cache: the comparison would be empty"
    assert [e["data"]["outer_step"] for e in of_type(final.events, OUTER_STEP_EVENT, SAMPLER)] == list(range(1, outer + 1))
    assert saved_pixels(client, final.prompt_id) == reference_pixels
    assert last_preview_per_outer_step(final.events, outer) == reference_previews


# -- Determinism -----------------------------------------------------------------------------------------------
def latent_prompt(ex, *, kind: str, sampler: str, seed: int, batch: int, pick: Optional[int] = None,
                  outer_eta: float = 0.0) -> dict:
    """Exemplar model -> (Nested)KSampler (3 x 3 steps, or 9 steps) -> SaveLatent, the result bit for bit."""
    prompt = nested_prompt(seed, outer_steps=3, inner_steps=3, prefix="unused", exemplar_defaults=ex)
    prompt["2"]["inputs"]["batch_size"] = batch
    with_inputs(prompt, sampler_name=sampler)
    if kind == "vanilla":
        as_vanilla(prompt, 9)
    else:
        with_inputs(prompt, outer_eta=outer_eta)
        del prompt[PREVIEW]
    if pick is not None:  # LatentFromBatch sets batch_index: ComfyUI then draws that item's noise as in the batch
        prompt["11"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["2", 0], "batch_index": pick, "length": 1}}
        prompt[SAMPLER]["inputs"]["latent_image"] = ["11", 0]
    del prompt["5"], prompt[SAVE]
    prompt["13"] = {"class_type": "SaveLatent", "inputs": {"samples": [SAMPLER, 0], "filename_prefix": "reliability/latent"}}
    return prompt


def run_latent(comfy_server, client, prompt: dict):
    import safetensors.torch

    outcome = attempt(client, prompt)
    assert outcome.kind == "ok", outcome.describe()
    assert ran(outcome, SAMPLER), "served from the cache"
    saved = client.history(outcome.prompt_id)["outputs"]["13"]["latents"][0]
    path = Path(comfy_server.base_dir) / "output" / saved["subfolder"] / saved["filename"]
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def test_same_seed_and_settings_give_bit_identical_results(comfy_server, client, exemplar_defaults):
    import torch

    configs = [("euler", 0.0), ("euler_ancestral", 0.5), ("dpmpp_2m_sde", 0.0)]
    seeds = {config: fresh_seed() for config in configs}
    # Each config's second run comes after the other configs' prompts, so it is not served from the cache.
    first = {c: run_latent(comfy_server, client, latent_prompt(exemplar_defaults, kind="nested", sampler=c[0],
                                                               seed=seeds[c], batch=2, outer_eta=c[1])) for c in configs}
    for config in configs:
        again = run_latent(comfy_server, client, latent_prompt(exemplar_defaults, kind="nested", sampler=config[0],
                                                               seed=seeds[config], batch=2, outer_eta=config[1]))
        assert torch.equal(first[config], again), f"{config}: max difference {float((first[config] - again).abs().max())}"
        assert bool(torch.isfinite(again).all())
    other = run_latent(comfy_server, client, latent_prompt(exemplar_defaults, kind="nested", sampler="euler_ancestral",
                                                           seed=seeds[configs[1]] + 1000, batch=2, outer_eta=0.5))
    assert not torch.equal(other, first[configs[1]]), "another seed gave the same result"


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m_sde", "euler_ancestral"])
def test_batch_item_is_reproducible_wherever_ksampler_guarantees_it(comfy_server, client, exemplar_defaults, sampler):
    """ComfyUI draws the initial noise for the whole batch (prepare_noise), or per index when the latent carries a
    batch_index (LatentFromBatch). Measured for KSampler on this model: deterministic solvers give item 0 of a batch
    of 4 exactly as a batch of 1, and item k as LatentFromBatch(k); the SDE solver only the former (its Brownian
    noise depends on the batch), the ancestral solver neither. Whatever KSampler guarantees, nested must too."""
    import torch

    seed = fresh_seed()
    same = {}
    for kind in ("vanilla", "nested"):
        def run(**kw):
            return run_latent(comfy_server, client, latent_prompt(exemplar_defaults, kind=kind, sampler=sampler,
                                                                  seed=seed, **kw))
        batch4, batch1, picked = run(batch=4), run(batch=1), run(batch=4, pick=2)
        same[kind] = {"batch 1 == item 0 of batch 4": torch.equal(batch1[0], batch4[0]),
                      "LatentFromBatch(2) == item 2 of batch 4": torch.equal(picked[0], batch4[2])}
    for construction, vanilla_holds in same["vanilla"].items():
        if vanilla_holds:
            assert same["nested"][construction], f"{sampler}: KSampler guarantees '{construction}', nested does not"
    if sampler == "euler":  # sanity: the guarantee is real for deterministic solvers
        assert all(same["vanilla"].values()) and all(same["nested"].values())


def test_editor_workflow_and_its_api_twin_give_the_same_images(comfy_server, client, exemplar_defaults):
    editor_path = REPO_ROOT / "example_workflows" / "nested_vs_vanilla_exemplar.json"
    api_path = demo_api_workflow()
    editor = json.loads(editor_path.read_text(encoding="utf-8"))
    converted = wc.editor_to_api(editor, client.object_info())
    twin = json.loads(api_path.read_text(encoding="utf-8"))

    def saves(prompt):
        return {node["inputs"]["filename_prefix"]: node_id for node_id, node in prompt.items()
                if node["class_type"] == "SaveImage"}

    def samplers(prompt):
        return [node_id for node_id, node in prompt.items() if node["class_type"] in ("NestedKSampler", "KSampler")]

    assert saves(converted).keys() == saves(twin).keys() and saves(twin)
    from_api = attempt(client, twin)
    assert from_api.kind == "ok", from_api.describe()
    assert attempt(client, small_good_prompt(exemplar_defaults)).kind == "ok"  # evicts the twin from the cache
    from_editor = attempt(client, converted, extra_data={"extra_pnginfo": {"workflow": editor}})  # as the editor queues it
    assert from_editor.kind == "ok", from_editor.describe()
    assert all(ran(from_editor, node) for node in samplers(converted)), "served from the cache"
    for prefix, node in saves(twin).items():
        assert saved_pixels(client, from_editor.prompt_id, saves(converted)[prefix]) == \
            saved_pixels(client, from_api.prompt_id, node), f"{prefix}: the editor run differs from the API run"


# -- Files and routes ------------------------------------------------------------------------------------------
def file_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime_ns) of every file under root, not following links, skipping __pycache__."""
    found = {}
    for directory, subdirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        subdirs[:] = [d for d in subdirs if d != "__pycache__" and os.path.normpath(os.path.join(relative_dir, d)) not in skip]
        for name in files:
            path = os.path.join(directory, name)
            try:
                stat = os.lstat(path)
            except OSError:
                continue
            found[os.path.normpath(os.path.join(relative_dir, name))] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_the_pack_writes_only_into_output_and_temp(comfy_server, client):
    base = Path(comfy_server.base_dir)
    comfy_dir = Path(comfy_server.comfyui)
    outside = ("output", "temp")
    before_base = file_tree(base, skip=outside)
    before_comfy = file_tree(comfy_dir)
    before_output, before_temp = set(file_tree(base / "output")), set(file_tree(base / "temp"))

    demo = json.loads(demo_api_workflow().read_text(encoding="utf-8"))
    seed = fresh_seed()
    for node in demo.values():
        if "seed" in node["inputs"]:
            node["inputs"]["seed"] = seed
    outcome = attempt(client, demo)
    assert outcome.kind == "ok", outcome.describe()

    after_base = file_tree(base, skip=outside)
    new_base = sorted(set(after_base) - set(before_base))
    # ComfyUI's own log and its sqlite database (with its journal) may change; nothing else may appear.
    assert [p for p in new_base if not re.match(r"user/comfyui\.db", p)] == [], new_base
    changed = sorted(p for p in set(after_base) & set(before_base) if after_base[p] != before_base[p])
    assert [p for p in changed if p != "comfyui.log" and not p.startswith("user/comfyui.db")] == [], changed
    new_comfy = sorted(set(file_tree(comfy_dir)) - set(before_comfy))
    assert new_comfy == [], f"files appeared in the ComfyUI checkout: {new_comfy}"
    # ... and the run did write its images where ComfyUI keeps them.
    assert set(file_tree(base / "output")) - before_output, "no saved image in output/"
    assert set(file_tree(base / "temp")) - before_temp, "no OuterStepPreview image in temp/"


def test_the_pack_routes_refuse_wrong_methods_and_bodies(comfy_server):
    url = comfy_server.url
    assert requests.post(f"{url}{RUNNING_ROUTE}", json={}, timeout=10).status_code == 405
    # GET of a POST-only route falls through to ComfyUI's static files: 404 (aiohttp alone would say 405).
    assert requests.get(f"{url}{FINISH_ROUTE}", timeout=10).status_code in (404, 405)
    assert requests.get(f"{url}/nested_diffusion/no_such_route", timeout=10).status_code == 404
    for body, content_type in ((b"null", "application/json"), (b"", "application/json"),
                               (b"prompt_id=x&node_id=3", "application/x-www-form-urlencoded"),
                               (b"\xff\xfe", "application/json"), (b"[" * 10000, "application/json")):
        response = requests.post(f"{url}{FINISH_ROUTE}", data=body, timeout=10,
                                 headers={"Content-Type": content_type})
        assert response.status_code == 400, (body[:20], response.status_code, response.text[:200])
        assert "error" in response.json()
    listing = requests.get(f"{url}{RUNNING_ROUTE}", timeout=10)
    assert listing.status_code == 200 and listing.json() == {"running": []}
    assert comfy_server.running


# -- Many prompts ----------------------------------------------------------------------------------------------
def test_load_checker_catches_foreign_events(comfy_server):
    """The load test's isolation checks are not vacuous: events of other prompts are flagged."""
    checker = load_test.LoadClient(9, comfy_server.url, {}, 32, legacy_previews=True)
    try:
        checker.own["mine"] = {"index": 0}
        checker.handle({"type": "preview_image", "data": {"prompt_id": None, "node": "3"}})  # none of its prompts running
        checker.handle({"type": OUTER_STEP_EVENT, "data": {"prompt_id": "theirs", "node": "3", "outer_step": 1}})
        checker.handle({"type": "execution_start", "data": {"prompt_id": "mine"}})
        checker.handle({"type": "preview_image", "data": {"prompt_id": "theirs", "node": "3"}})
        checker.handle({"type": "preview_image", "data": {"prompt_id": None, "node": "3"}})  # fine: its prompt runs
        checker.handle({"type": "executing", "data": {"prompt_id": "mine", "node": None}})
    finally:
        checker.close()
    assert len(checker.violations) == 3, checker.violations
    assert checker.ended == {"mine": "success"}


def test_many_prompts_from_several_clients(comfy_server):
    """A reduced scripts/load_test.py run (set NESTED_LOAD_PROMPTS for more). The memory check (RSS within 5% after
    the warm-up) is asserted by the script's full 200-prompt run on a server of its own, not on this shared one."""
    prompts = int(os.environ.get("NESTED_LOAD_PROMPTS", "40"))
    lines: list[str] = []
    started = time.monotonic()
    result = load_test.run_load_test(comfy_server.url, prompts=prompts, clients=3, warmup=min(10, prompts // 2),
                                     pid=comfy_server.process.pid, check_memory=False, timeout=300, log=lines.append)
    load_test.report(result, log=lines.append)
    summary = "\n".join(lines)
    assert time.monotonic() - started < 300, summary
    assert result["outcomes"] == {"success": prompts}, summary
    assert result["violations"] == [], summary
    assert result["pass"], summary
    assert result["interleaved_switches"] > 0, "the clients' prompts never alternated: no concurrency tested"
    for stats in result["per_client"]:
        assert stats["previews"] > 0 and stats["outer_step_events"] > 0, summary
    assert result["rss_after_run_mib"] is not None  # measured and reported (see the docstring)
