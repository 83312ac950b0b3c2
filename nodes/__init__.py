"""ComfyUI adapters: thin V3 nodes over ``nested_core``."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    from .nested_ksampler import NestedKSampler
    from .inner_solver import InnerSolverSelect
    from .outer_preview import OuterStepPreview
    from .exemplar_model import NestedExemplarModel

    return [NestedKSampler, InnerSolverSelect, OuterStepPreview, NestedExemplarModel]


class NestedDiffusionExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return all_nodes()


async def comfy_entrypoint() -> NestedDiffusionExtension:
    return NestedDiffusionExtension()
