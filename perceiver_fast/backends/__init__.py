"""The backends, one module each; dispatch over them is in perceiver_fast/dispatch.py."""

from .base import Backend, Capabilities
from .cpu import CpuBackend
from .cuda import CudaBackend
from .onnx_export import OnnxExportBackend
from .reference import ReferenceBackend
from .triton import TritonBackend

__all__ = ["Backend", "Capabilities", "CpuBackend", "CudaBackend", "OnnxExportBackend", "ReferenceBackend", "TritonBackend"]
