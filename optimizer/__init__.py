"""optimizer: declarative, resumable, accuracy-gated LLM optimization with NVIDIA ModelOpt."""

__version__ = "0.1.0"
