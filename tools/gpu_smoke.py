"""Every GPU kernel of the library once, on small shapes, checked against the float64 reference: the
program compute-sanitizer runs (`make gpu`), small enough for its slowdown.

    python tools/gpu_smoke.py [--one]     # --one: a single small case per kernel (racecheck)
"""

from __future__ import annotations

import argparse
import sys

import torch

import perceiver_fast as pf

# (B, H, N, M, Dqk, Dv): odd sizes, a head dim over FlashAttention's limit, qk != v, a split key axis.
SHAPES = [(2, 2, 17, 100, 32, 32), (1, 1, 40, 300, 261, 261), (2, 2, 24, 90, 32, 160), (1, 1, 64, 2048, 64, 64)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def check(backend: str, shape, key_mask: bool, causal: bool, grad: bool) -> str | None:
    """None when the backend's output (and gradients) are within bf16's reach of float64, else what is wrong."""
    B, H, N, M, dqk, dv = shape
    q, k, v = (torch.randn(B, H, rows, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
               for rows, dim in ((N, dqk), (M, dqk), (M, dv)))
    mask = (torch.rand(B, M, device="cuda") > 0.3) if key_mask else None
    out = pf.cross_attention(q, k, v, key_mask=mask, causal=causal, backend=backend)
    ref = pf.attention_reference(*(t.detach().double() for t in (q, k, v)), key_mask=mask, causal=causal)[0]
    problems = []
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    if relative_error(out, ref) > 2e-2:
        problems.append(f"output error {relative_error(out, ref):.2e}")
    if grad:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref_grads = torch.autograd.grad(pf.attention_reference(*leaves, key_mask=mask, causal=causal)[0], leaves,
                                        dout.double())
        for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
            if relative_error(g, r) > 5e-2:
                problems.append(f"{name} error {relative_error(g, r):.2e}")
    torch.cuda.synchronize()
    return "; ".join(problems) or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", action="store_true", help="one small case per kernel (for racecheck)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 1
    shapes = SHAPES[:1] if args.one else SHAPES
    maskings = [(True, True)] if args.one else [(False, False), (True, False), (False, True), (True, True)]
    failures = 0
    for backend, grad in (("triton", True), ("cuda", True)):
        for shape in shapes:
            for key_mask, causal in maskings:
                try:
                    problem = check(backend, shape, key_mask, causal, grad)
                except Exception as error:  # a kernel that fails to run is a finding, reported with the rest
                    problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                failures += problem is not None
                print(f"{'FAIL' if problem else 'ok  '} {backend:6s} {shape} key_mask={int(key_mask)} "
                      f"causal={int(causal)} grad={int(grad)} {problem or ''}", flush=True)
    print(f"gpu_smoke: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
