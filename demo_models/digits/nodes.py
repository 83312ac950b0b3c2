"""ComfyUI nodes of the digits demo: the trained model as a MODEL, and its "prompt" as CONDITIONING."""
from __future__ import annotations

from comfy_api.latest import io

from .data import CLASS_CHOICES, choice_to_label, digit_context
from .model import VARIANTS, load_digits_model


class NestedDigitsModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedDigitsModel",
            display_name="Digits Model (nested demo)",
            category="sampling/nested/demo",
            description=(
                "A small learned diffusion model of handwritten digits (16x16, trained in this pack on scikit-learn's "
                "digits): ComfyUI's own UNet, class-conditional. Sample it with EmptyChromaRadianceLatentImage "
                "(16x16), condition it with 'Digits Prompt (nested demo)', decode with VAELoader 'pixel_space'."
            ),
            inputs=[
                io.Combo.Input("variant", options=list(VARIANTS), default="eps",
                               tooltip="eps: SD1.5-style discrete eps model; flow: rectified flow (SD3/Flux-style); "
                                       "v: v-prediction on the SD1.5 schedule (SD2.x-style)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL")],
        )

    @classmethod
    def execute(cls, variant: str) -> io.NodeOutput:
        return io.NodeOutput(load_digits_model(variant))


class NestedDigitsPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="NestedDigitsPrompt",
            display_name="Digits Prompt (nested demo)",
            category="sampling/nested/demo",
            description="The conditioning of the Digits Model: which digit to draw, or 'any' (the unconditional "
                        "class; use it as the negative for classifier-free guidance). A zero conditioning also means 'any'.",
            inputs=[
                io.Combo.Input("digit", options=list(CLASS_CHOICES), default="any", tooltip="The digit, or any digit."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, digit: str) -> io.NodeOutput:
        return io.NodeOutput([[digit_context([choice_to_label(digit)]), {}]])
