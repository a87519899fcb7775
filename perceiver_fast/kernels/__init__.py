"""Triton kernels and their launchers: tensors in, tensors out, no nn, no dispatch. Importing it needs triton."""

from .attention_backward import attention_backward
from .attention_forward import attention_forward
from .dropout import dropout_keep_mask
from .input_attention import input_attention_backward, input_attention_forward
from .projected_input_attention import projected_attention_backward, projected_attention_forward

__all__ = ["attention_forward", "attention_backward", "input_attention_forward", "input_attention_backward",
           "projected_attention_forward", "projected_attention_backward", "dropout_keep_mask"]
