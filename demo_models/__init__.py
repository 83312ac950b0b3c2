"""The test and demo models: the only nodes of this pack that build a MODEL.

``exemplar``: the exact denoiser of a small exemplar mixture (closed form, no weights): tests, benchmark, demo.

``digits``: class-conditional models of scikit-learn's handwritten digits (16x16 RGB pixel latents),
built from ComfyUI's own UNet, in an eps (SD1.5-style) and a flow (rectified-flow) variant, plus a
FID-like metric. See ``demo_models/digits/README.md``.
"""
