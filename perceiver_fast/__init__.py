"""perceiver-fast: fused attention kernels for Perceiver-family models."""

from . import generation, nn
from .attention import attention_dropout_mask, cross_attention, latent_attention
from .dispatch import BACKEND_NAMES, BackendUnsupportedError
from .explain import explain
from .input_attention import fused_input_attention
from .linear import linear
from .patching import PatchReport, patch, unpatch
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = ["nn", "generation", "cross_attention", "latent_attention", "fused_input_attention", "linear", "attention_dropout_mask",
           "attention_reference", "explain", "BACKEND_NAMES", "BackendUnsupportedError", "patch", "unpatch",
           "PatchReport", "__version__"]
