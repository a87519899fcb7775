"""What this installation has, as `perceiver-fast info` prints it: versions, the compiled extension
(or why it did not load) and each backend's availability."""

from __future__ import annotations

import torch

from . import extension
from .dispatch import BACKENDS


def installation_report() -> list[str]:
    from . import __version__

    cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
    lines = [f"perceiver-fast {__version__}, torch {torch.__version__} ({cuda})"]
    if extension.compiled is None:
        lines.append(f"extension: not loaded: {extension.LOAD_ERROR}")
    else:
        features = extension.compiled.cpu_features()
        paths = ", ".join(name for name, on in features.items() if on is True)
        kernels = "C++ and CUDA kernels" if extension.HAS_CUDA_KERNELS else "C++ kernels"
        lines.append(f"extension: loaded ({kernels}); cpu instruction set {features['isa']} (detected "
                     f"{features['isa_detected']}, cap {features['isa_cap']}); paths: {paths or 'portable only'}")
    for backend in BACKENDS:
        lines.append(f"backend {backend.name}: " + (f"unavailable: {backend.unavailable}" if backend.unavailable
                                                   else "available"))
    return lines
