"""Perceiver AR generation (krasserm perceiver-io's CausalSequenceModel): a preallocated KV cache,
rotary applied when a key is written, fused decode steps. docs/generation.md."""

from .cache import DecodeCache, KVRing
from .generate import generate
from .krasserm import KrassermPerceiverAR
from .sampling import Sampling

__all__ = ["generate", "DecodeCache", "KVRing", "KrassermPerceiverAR", "Sampling"]
