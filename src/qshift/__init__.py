"""qshift: online test-time adaptation for cross-modal retrieval under query shift (REST, TCR, baselines)."""

__version__ = "0.1.0"

__all__ = ["Adapter", "load_model", "__version__"]


def __getattr__(name: str):  # lazy, so `qshift --version` does not import torch
    if name in ("Adapter", "load_model"):
        from qshift import api

        return getattr(api, name)
    raise AttributeError(f"module 'qshift' has no attribute {name!r}")
