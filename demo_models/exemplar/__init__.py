"""The exact denoiser: a ComfyUI MODEL whose denoiser is the closed-form posterior mean of a small mixture of
exemplar images (tests, benchmark and demo; no weights, no downloads).

- ``exemplars``: the mixture, its exact posterior mean for eps, v and flow models, and distances to it (pure torch);
- ``nodes``: the ComfyUI adapter and the ``NestedExemplarModel`` and ``NestedExemplarPrompt`` nodes.
"""
