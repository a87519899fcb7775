"""perceiver-fast: fused attention kernels for Perceiver-family models."""

from .attention import cross_attention, explain, latent_attention
from .backends import BACKEND_NAMES, BackendUnsupportedError
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = ["cross_attention", "latent_attention", "attention_reference", "explain", "BACKEND_NAMES",
           "BackendUnsupportedError", "__version__"]
