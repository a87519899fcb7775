"""Where a launch goes: every launcher runs its kernels on its tensors' GPU."""

from __future__ import annotations

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Launches go to the tensor's GPU, not whichever is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
