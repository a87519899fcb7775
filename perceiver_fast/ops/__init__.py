"""The library's ops, registered with torch.library: one module per op (`attention`, `input_attention`, `linear`),
each with its custom op and the one for its backward, a fake implementation of each and the
autograd formula, so that torch.compile sees them as single graph nodes. Every op takes the name
of the kernel family that runs it ("cpu": C++ or, for the linear op, oneDNN through torch; "triton"; "cuda": CUDA C++), chosen by the backend
dispatch (perceiver_fast/dispatch.py); each backend registers its kernels in the op's KERNELS.
Import an op from its module: `from perceiver_fast.ops.attention import attention`. `sharded` runs
either op over a key axis sharded across the ranks of a process group, on the same kernels."""
