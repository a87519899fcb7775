"""Where time and memory go in a long-input Perceiver model: per-part time (torch.profiler ranges)
and peak memory, the whole-model peak, a predicted peak from a documented formula, and the
longest input that fits a memory budget. `perceiver-fast profile` is its command line."""

from .memory_model import ModelShape, largest_input, predicted_peak_bytes, stage_bytes
from .parts import PARTS, find_parts, profile_model, profile_models

__all__ = ["ModelShape", "PARTS", "find_parts", "largest_input", "predicted_peak_bytes", "profile_model", "profile_models", "stage_bytes"]
