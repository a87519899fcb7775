"""The compiled extension `perceiver_fast._C` (csrc/), loaded once when the package is imported.

Every module that runs a C++ or CUDA kernel takes it from here. Availability is settled at import
so that dispatch, which asks on every call, costs nothing and stays traceable by torch.compile.
Where it does not load, one warning at import says why and how to build it; `pf.explain` and
`perceiver-fast info` show the same reason, and every op still runs (Triton where it applies, else
the reference backend: plain PyTorch).
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

BUILD_COMMAND = "pip install --no-build-isolation ."
# Caps the instruction sets of the C++ kernels' paths (csrc/cpu/vector_paths.h): read at import.
CPU_ISA_VARIABLE = "PERCEIVER_FAST_CPU_ISA"


class ExtensionWarning(RuntimeWarning):
    """perceiver_fast._C did not load: the C++ kernels (the cpu backend) are unavailable."""


def _load_error(error: ImportError) -> str:
    if isinstance(error, ModuleNotFoundError) and error.name == "perceiver_fast._C":
        return (f"the C++ extension perceiver_fast._C is not built (an install or checkout without it); build it "
                f"against the torch you run ({torch.__version__}) with `{BUILD_COMMAND}` in the source tree "
                f"(`make install` in a checkout)")
    return (f"the C++ extension perceiver_fast._C does not load: {error}. Most often it was built against another "
            f"torch than this one ({torch.__version__}); rebuild it with `{BUILD_COMMAND}` in the source tree")


try:
    compiled = importlib.import_module("perceiver_fast._C")
except ImportError as error:
    compiled = None
    LOAD_ERROR: str | None = _load_error(error)
    warnings.warn(f"{LOAD_ERROR}. Until then the ops run without the cpu backend (the reference backend on the "
                  f"CPU: plain PyTorch, slower and materialising the scores)", ExtensionWarning, stacklevel=2)
else:
    LOAD_ERROR = None
    if os.environ.get(CPU_ISA_VARIABLE):
        try:
            compiled.set_cpu_isa(os.environ[CPU_ISA_VARIABLE])
        except ValueError as error:
            raise ValueError(f"{CPU_ISA_VARIABLE}={os.environ[CPU_ISA_VARIABLE]!r}: {error}") from None

# The instruction-set level the C++ kernels run at in this process (the CPU's, capped), settled here
# so that dispatch reads a constant.
CPU_ISA: str | None = None if compiled is None else compiled.cpu_features()["isa"]

# The CUDA kernels are compiled in only where the extension was built against a torch with CUDA.
HAS_CUDA_KERNELS = compiled is not None and hasattr(compiled, "cuda_attention_forward")


def require():
    """The extension module; RuntimeError saying why when it is not available."""
    if compiled is None:
        raise RuntimeError(LOAD_ERROR)
    return compiled
