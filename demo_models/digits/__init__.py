"""A class-conditional diffusion model of handwritten digits, trained in this repository.

- ``data``: scikit-learn's digits as 16x16 RGB images in [-1, 1], the fixed train / held-out split and the
  conditioning encoding (pure torch);
- ``metrics``: a small classifier CNN and a FID-like Frechet distance of its features (pure torch + scipy);
- ``model``: the ComfyUI adapter (ComfyUI's own ``UNetModel`` inside a ``BaseModel``, eps or flow);
- ``nodes``: the ``NestedDigitsModel`` and ``NestedDigitsPrompt`` nodes.

The weights in ``weights/`` are trained by ``scripts/train_digits.py``; see ``README.md`` here.
"""
