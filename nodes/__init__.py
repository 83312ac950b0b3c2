"""ComfyUI adapters: thin V3 nodes over ``nested_core``."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override


def all_nodes() -> list[type[io.ComfyNode]]:
    from .exemplar_model import NestedExemplarModel
    from .inner_solver import InnerSolverSelect
    from .nested_ksampler import NestedKSampler
    from .nested_sampler import NestedSampler
    from .outer_preview import OuterStepPreview

    return [NestedKSampler, NestedSampler, InnerSolverSelect, OuterStepPreview, NestedExemplarModel]


class NestedDiffusionExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> NestedDiffusionExtension:
    return NestedDiffusionExtension()
