"""The library's ops, registered with torch.library: one custom op per op (and one for its backward),
each with a fake implementation and an autograd formula, so that torch.compile sees them as single
graph nodes. Every op takes the name of the kernel family that runs it ("cpu": C++, "triton",
"cuda": CUDA C++), chosen by the backend dispatch (perceiver_fast/dispatch.py)."""

from .attention import attention, attention_backward
from .input_attention import input_attention, input_attention_backward

__all__ = ["attention", "attention_backward", "input_attention", "input_attention_backward"]
