"""The surrogate models MUFM and UFM (paper eq. 13 and eq. 2, section IV-B).

- :mod:`.objective`: data, targets, the objective, its gradients and the closed-form W;
- :mod:`.solver`: the batched full-batch gradient-descent solver and its λ grid.

No Hydra, no W&B, no job code (checked by import-linter, ``pyproject.toml``).
"""
