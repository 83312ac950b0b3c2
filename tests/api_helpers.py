"""Shared pieces of the tests that drive a real ComfyUI server over HTTP and the websocket."""
from __future__ import annotations

import io

from comfyui_nested_diffusion.protocol import OUTER_STEP_EVENT
from comfyui_nested_diffusion.tools.api_graphs import PREVIEW, SAMPLER, SAVE, exemplar_graph  # noqa: F401  (the tests'
from PIL import Image

# node ids)

OUTER, INNER, BATCH, SIZE = 4, 5, 2, 32


def nested_prompt(seed: int, *, outer_steps: int = OUTER, inner_steps: int = INNER, prefix: str = "nested_api",
                  step_schedule: str | None = None, exemplar_defaults: dict | None = None) -> dict:
    """Exemplar model -> NestedKSampler -> VAEDecode(pixel_space) -> SaveImage, plus OuterStepPreview.

    ComfyUI caches node outputs between prompts: give every prompt that must really sample its own seed.
    """
    sampler = {"seed": seed, "outer_steps": outer_steps, "inner_steps": inner_steps, "cfg": 1.0, "sampler_name": "euler",
               "scheduler": "normal", "denoise": 1.0}
    inner_solver = None if step_schedule is None else {"sampler_name": "euler", "scheduler": "normal", "steps": inner_steps,
                                                       "eta": 0.85, "s_noise": 1.0, "step_schedule": step_schedule}
    return exemplar_graph("NestedKSampler", sampler, size=SIZE, batch=BATCH, exemplar_defaults=exemplar_defaults,
                          prefix=prefix, outer_step_preview=True, inner_solver=inner_solver)


def of_type(events: list[dict], kind: str, node: str | None = None) -> list[dict]:
    return [e for e in events if e["type"] == kind and (node is None or e["data"].get("node") == node)]


def decode(image_bytes: bytes):
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return image


def mean_abs_difference(a, b) -> float:
    """Mean absolute difference of two same-size RGB images, in 0..255 units."""
    return sum(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes())) / len(a.tobytes())


def check_outer_step_events(events: list[dict], prompt_id: str) -> list[dict]:
    steps = of_type(events, OUTER_STEP_EVENT, SAMPLER)
    assert [e["data"]["outer_step"] for e in steps] == list(range(1, OUTER + 1))
    assert [e["data"]["nfe"] for e in steps] == [INNER * k for k in range(1, OUTER + 1)]
    assert {e["data"]["outer_steps"] for e in steps} == {OUTER}
    assert {e["data"]["nfe_total"] for e in steps} == {OUTER * INNER}
    assert {e["data"]["prompt_id"] for e in steps} == {prompt_id}
    sigmas = [e["data"]["sigma"] for e in steps]
    assert all(a > b > 0 for a, b in zip(sigmas, sigmas[1:])), sigmas
    return steps


def previews_per_outer_step(events: list[dict]) -> list[list[dict]]:
    """The binary previews of the sampler node, grouped by the outer-step event that follows them
    (the node sends its inner result as a preview, then the event)."""
    groups: list[list[dict]] = [[]]
    for event in events:
        if event["type"] == "preview_image" and event["data"]["node"] == SAMPLER:
            groups[-1].append(event)
        elif event["type"] == OUTER_STEP_EVENT and event["data"].get("node") == SAMPLER:
            groups.append([])
    return groups
