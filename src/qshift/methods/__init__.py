"""Test-time adaptation methods behind one registry: ``qshift.methods.create(name, model, gallery, **cfg)``."""
from qshift.methods import confidence_baselines, entropy_baselines, rest, simple, tcr  # noqa: F401  (register the built-in methods)
from qshift.methods.base import Method, available_methods, create, register

__all__ = ["Method", "available_methods", "create", "register"]
