"""qshift: online test-time adaptation for cross-modal retrieval under query shift (REST, TCR, baselines)."""

__version__ = "0.1.0"
