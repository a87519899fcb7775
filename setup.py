"""Build of perceiver-fast.

The Triton kernels live inside the package (perceiver_fast/kernels/). C++ sources under csrc/
build into `perceiver_fast._C` with torch's BuildExtension (ninja); CUDA sources only where torch has CUDA. Build with
`pip install --no-build-isolation .` so the extension is compiled against the torch you
installed (an isolated build would download an unpinned torch).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


CUDA_BINDING = "csrc/cuda_binding.cpp"  # needs torch's CUDA headers: built with the .cu files only


def extension_modules():
    cpp_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cpp"))
    cpp_sources = [s for s in cpp_sources if s != CUDA_BINDING]
    if not cpp_sources:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*.cu"))
    # fp-contract=off: products round as the source writes them. The softmax's max pass and its
    # exponents must see the same rounded scaled scores; GCC's default fused one into a
    # multiply-subtract, off by hundreds for scores near 1e9, and 2^x overflowed or vanished.
    extra = {"cxx": ["-O3", "-fopenmp", "-ffp-contract=off"]}
    if torch.version.cuda and cuda_sources:
        # PERCEIVER_FAST_CUDA: binding.cpp adds the CUDA binding's functions to the module.
        ext = cpp_extension.CUDAExtension("perceiver_fast._C", cpp_sources + [CUDA_BINDING] + cuda_sources,
                                          extra_compile_args={**extra, "nvcc": ["-O3", "-std=c++17"]},
                                          define_macros=[("PERCEIVER_FAST_CUDA", None)],
                                          extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("perceiver_fast._C", cpp_sources, extra_compile_args=extra,
                                         extra_link_args=["-fopenmp"])
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
    # Tested: torch 2.13 (CI); triton 3.9 and 3.6, the GPU machine's (make test-oldest-triton).
    install_requires=["torch>=2.13", "triton>=3.6", "numpy"],
    # The libraries pf.patch replaces, for its tests and benchmark. krasserm's perceiver-io 0.11.0
    # declares Python < 3.11; install it with `pip install --no-deps --ignore-requires-python
    # perceiver-io==0.11.0` (the Makefile does).
    # The deployment runtimes the model benchmarks compare against (optional providers).
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "ninja", "matplotlib", "transformers==5.23.0",
                             "perceiver-pytorch==0.11.0", "einops", "fairscale", "onnx", "onnxruntime", "openvino"],
                    "bench": ["pytest-benchmark", "matplotlib", "onnx", "onnxruntime", "openvino"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["perceiver-fast=perceiver_fast.cli:main"]},
)
