"""Triton kernels and their launchers: tensors in, tensors out, no nn, no dispatch.

Installed as `perceiver_fast.kernels` (see setup.py's package_dir); importing it needs triton.
"""

from .attention_backward import attention_backward
from .attention_forward import attention_forward

__all__ = ["attention_forward", "attention_backward"]
