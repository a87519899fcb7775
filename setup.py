"""Build of perceiver-fast.

The Triton kernels live inside the package (perceiver_fast/kernels/). C++ sources under csrc/
build into `perceiver_fast._C` with torch's BuildExtension (ninja), against the torch installed in
the build environment: build with `pip install --no-build-isolation .` so that it is the torch you
run (the README's install section has the isolated route). CUDA sources build too where torch has
CUDA and a CUDA toolkit is found, unless PERCEIVER_FAST_CUDA=0; otherwise the CPU extension builds
and the build says why CUDA was skipped.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


CUDA_BINDING = "csrc/cuda_binding.cpp"  # needs torch's CUDA headers: built with the .cu files only
# The archs of torch's CUDA wheels (bfloat16 kernels compile out below sm_80): the Makefile's cuda-check list.
CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0a;10.0;12.0+PTX"


def cuda_skipped_reason(cpp_extension, torch) -> str | None:
    """Why the CUDA kernels are not built; None: they are."""
    if os.environ.get("PERCEIVER_FAST_CUDA", "").strip() == "0":
        return "PERCEIVER_FAST_CUDA=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} has no CUDA"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME, or put nvcc on PATH)"
    if not (Path(cpp_extension.CUDA_HOME) / "include" / "cuda_runtime.h").exists():
        return (f"CUDA_HOME={cpp_extension.CUDA_HOME} (torch's guess) has no include/cuda_runtime.h: set CUDA_HOME "
                f"to the toolkit's directory")
    return None


def libomp_prefix() -> Path | None:
    """Where Homebrew's libomp is (Apple clang has no OpenMP of its own), None if nowhere."""
    candidates = [os.environ.get("LIBOMP_PREFIX"), "/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    return next((Path(c) for c in candidates if c and (Path(c) / "include" / "omp.h").exists()), None)


def compiler_flags() -> tuple[list[str], list[str]]:
    """(compile, link) flags of the C++ sources for this platform's compiler. fp-contract off: products
    round as the source writes them. The softmax's max pass and its exponents must see the same
    rounded scaled scores; GCC's default fused one into a multiply-subtract, off by hundreds for
    scores near 1e9, and 2^x overflowed or vanished. OpenMP: torch's at::parallel_for is OpenMP in
    torch's own builds, and runs serially in code compiled without it (csrc/cpu/parallel.h then
    splits the work over threads itself)."""
    if sys.platform == "win32":  # MSVC: it contracts nothing under /fp:precise
        return ["/O2", "/openmp", "/fp:precise"], []
    flags = ["-O3", "-ffp-contract=off"]
    if sys.platform == "darwin":
        prefix = libomp_prefix()
        if prefix is None:
            print("perceiver-fast: building without OpenMP (no libomp: `brew install libomp`); the kernels split their "
                  "work over threads of their own")
            return flags, []
        return flags + ["-Xpreprocessor", "-fopenmp", f"-I{prefix / 'include'}"], [f"-L{prefix / 'lib'}", "-lomp"]
    if os.environ.get("PERCEIVER_FAST_OPENMP", "").strip() == "0":  # the threaded fallback, as CI's clang build tests it
        return flags, []
    return flags + ["-fopenmp"], ["-fopenmp"]


def extension_modules():
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    cpp_sources = [s for s in cpp_sources if s != CUDA_BINDING]
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    compile_flags, link_flags = compiler_flags()
    extra = {"cxx": compile_flags}
    skipped = cuda_skipped_reason(cpp_extension, torch) if cuda_sources else "no CUDA sources"
    if skipped is None:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # No GPU to build for (a CI or container build): every arch torch's CUDA wheels target.
            os.environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCHS
            print(f"perceiver-fast: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building for {CUDA_ARCHS}")
        # PERCEIVER_FAST_CUDA: binding.cpp adds the CUDA binding's functions to the module.
        ext = cpp_extension.CUDAExtension("perceiver_fast._C", cpp_sources + [CUDA_BINDING] + cuda_sources,
                                          extra_compile_args={**extra, "nvcc": ["-O3", "-std=c++17"]},
                                          define_macros=[("PERCEIVER_FAST_CUDA", None)],
                                          extra_link_args=link_flags)
    else:
        if torch.version.cuda:
            print(f"perceiver-fast: building the CPU extension without the CUDA kernels: {skipped}")
        ext = cpp_extension.CppExtension("perceiver_fast._C", cpp_sources, extra_compile_args=extra,
                                         extra_link_args=link_flags)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    name="perceiver-fast",
    version="0.1.0",
    description="Fused long-input cross-attention and latent self-attention kernels for Perceiver models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["perceiver_fast", "perceiver_fast.*"]),
    package_data={"perceiver_fast": ["shapes.json"]},
    # Tested: torch 2.13 (CI) and 2.11, the GPU machine's (make test-oldest-torch); triton 3.9 and 3.6, the GPU
    # machine's (make test-oldest-triton).
    # triton only where it has wheels (Linux); the Triton backend is then unavailable, saying so.
    install_requires=["torch>=2.11", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    # The libraries pf.patch replaces, for its tests and benchmark. krasserm's perceiver-io 0.11.0
    # declares Python < 3.11; install it with `pip install --no-deps --ignore-requires-python
    # perceiver-io==0.11.0` (the Makefile does).
    # The deployment runtimes the model benchmarks compare against (optional providers).
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "matplotlib", "transformers==5.23.0",
                             "perceiver-pytorch==0.11.0", "einops", "fairscale", "onnx", "onnxscript", "onnxruntime",
                             "openvino"],
                    "bench": ["pytest-benchmark", "matplotlib", "onnx", "onnxscript", "onnxruntime", "openvino"],
                    # torch.onnx.export(dynamo=True) of a patched model (docs/deployment.md)
                    "onnx": ["onnx", "onnxscript"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["perceiver-fast=perceiver_fast.cli:main"]},
)
