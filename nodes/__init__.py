"""ComfyUI adapters: thin V3 nodes over ``nested_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def all_nodes() -> list[type[io.ComfyNode]]:
    from ..demo_models.digits.nodes import NestedDigitsModel, NestedDigitsPrompt
    from ..demo_models.exemplar.nodes import NestedExemplarModel, NestedExemplarPrompt
    from .inner_solver import InnerSolverSelect
    from .measurement import NestedDegradeImage, NestedInverseProblem
    from .nested_ksampler import NestedKSampler, NestedKSamplerAdvanced
    from .nested_sampler import NestedSampler
    from .outer_preview import OuterStepPreview
    from .pick_candidate import NestedPickCandidate

    return [NestedKSampler, NestedKSamplerAdvanced, NestedSampler, InnerSolverSelect, OuterStepPreview,
            NestedPickCandidate, NestedExemplarModel, NestedExemplarPrompt, NestedDigitsModel, NestedDigitsPrompt,
            NestedInverseProblem, NestedDegradeImage]


class NestedDiffusionExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> NestedDiffusionExtension:
    from .distributed import register_distributed_routes
    from .steering import register_routes

    register_routes()
    register_distributed_routes()  # only where ComfyUI-Distributed is installed
    return NestedDiffusionExtension()
