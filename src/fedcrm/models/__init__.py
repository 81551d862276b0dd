"""The tabular MLP: its parameter layout in numpy (``layout``), its torch module (``mlp``) and saved artifacts.

Submodules are imported directly so the aggregator can use ``layout`` without torch.
"""
