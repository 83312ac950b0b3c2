"""Custom nodes for the pack's server tests only: the test server links this file into its ``custom_nodes``.

``NestedDiffusionTestSlowModel`` gives a MODEL whose every diffusion-model evaluation takes at least
``seconds_per_call`` (ComfyUI's unet function wrapper), like a large model on a GPU, and counts the evaluations and
the batch items they evaluated; ``GET /nested_diffusion_tests/model_calls`` answers those counts.
"""
from __future__ import annotations

import threading
import time

from aiohttp import web
from server import PromptServer

_lock = threading.Lock()
_counts = {"calls": 0, "items": 0}


class SlowModelForTests:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",),
                             "seconds_per_call": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 5.0, "step": 0.01})}}

    def patch(self, model, seconds_per_call):
        def wrapper(apply_model, args):
            with _lock:
                _counts["calls"] += 1
                _counts["items"] += int(args["input"].shape[0])
            time.sleep(seconds_per_call)
            return apply_model(args["input"], args["timestep"], **args["c"])

        clone = model.clone()
        clone.set_model_unet_function_wrapper(wrapper)
        return (clone,)


@PromptServer.instance.routes.get("/nested_diffusion_tests/model_calls")
async def model_calls(request):
    with _lock:
        return web.json_response(dict(_counts))


NODE_CLASS_MAPPINGS = {"NestedDiffusionTestSlowModel": SlowModelForTests}
