"""The compiled extension `perceiver_fast._C` (csrc/), loaded once when the package is imported.

Every module that runs a C++ or CUDA kernel takes it from here. Availability is settled at import
so that dispatch, which asks on every call, costs nothing and stays traceable by torch.compile.
"""

from __future__ import annotations

try:
    from . import _C as compiled
except ImportError as error:
    compiled = None
    LOAD_ERROR: str | None = (f"the C++ extension perceiver_fast._C is not built or does not load ({error}); "
                              "reinstall with `pip install --no-build-isolation .`")
else:
    LOAD_ERROR = None

# The CUDA kernels are compiled in only where the extension was built against a torch with CUDA.
HAS_CUDA_KERNELS = compiled is not None and hasattr(compiled, "cuda_attention_forward")


def require():
    """The extension module; RuntimeError saying why when it is not available."""
    if compiled is None:
        raise RuntimeError(LOAD_ERROR)
    return compiled
