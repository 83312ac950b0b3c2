"""NestedSampler: nested diffusion as a SAMPLER for SamplerCustom / SamplerCustomAdvanced."""
from __future__ import annotations

from comfy_api.latest import io

from . import rerun
from .nested_ksampler import optional_inputs
from .nested_run import NestedDiffusionSampler, NestedSettings, RunLimits
from .planning import InnerSolverSpec

# The paper's inner default: DDIM with eta 0.85, which is ComfyUI's euler_ancestral with eta 0.85.
PAPER_INNER_SOLVER = InnerSolverSpec(sampler_name="euler_ancestral", scheduler="normal", steps=10, eta=0.85, s_noise=1.0)


class NestedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="NestedSampler",
            display_name="Nested Sampler (anytime)",
            category="sampling/nested",
            description="Nested Diffusion as a SAMPLER for SamplerCustom and SamplerCustomAdvanced: the connected "
                        "SIGMAS are the outer steps, each running a complete inner diffusion with the guider's model. "
                        "As in NestedKSampler, a schedule ending at 0 drops its last non-zero sigma, so "
                        "BasicScheduler with N+1 steps gives N outer steps. Without inner_solver: euler_ancestral "
                        "(eta 0.85), normal, 10 steps.",
            inputs=optional_inputs(),
            outputs=[io.Sampler.Output()],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs):
        # An early stop (Finish now, max_seconds) of a run with this SAMPLER makes the next identical prompt build a new
        # one, so that SamplerCustom(Advanced), whose cache key includes this node's, samples again (see rerun.py).
        return rerun.fingerprint("NestedSampler", inputs)

    @classmethod
    def execute(cls, inner_solver=None, outer_eta=0.0, max_nfe=0, max_seconds=0.0, outer_step="auto",
                update_seconds=0.0) -> io.NodeOutput:
        settings = NestedSettings(inner_solver or PAPER_INNER_SOLVER, outer_eta, outer_step, RunLimits(max_nfe, max_seconds),
                                  update_seconds)
        hidden = cls.hidden  # None when execute is called outside ComfyUI's executor (scripts, tests)
        key = rerun.key_from_prompt("NestedSampler", getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None),
                                    ["inner_solver", "outer_eta", "max_nfe", "max_seconds", "outer_step",
                                     "update_seconds"])
        return io.NodeOutput(NestedDiffusionSampler(settings, rerun_key=key, cached_output=True))
