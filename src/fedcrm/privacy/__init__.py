"""Differential privacy: mechanisms, accounting (persistable, checked on load), the membership-inference audit.

Submodules are imported directly. ``rdp``, ``accounting``, ``mechanisms`` and
``plans`` are pure Python and numpy (the aggregator and the manifests use
them); ``dpsgd`` needs torch and Opacus, ``audit`` torch and pandas, ``plots``
matplotlib, so this package imports nothing by itself.
"""
