"""Every GPU kernel of the library once, on small shapes, checked against the float64 reference: the
program compute-sanitizer runs (`make gpu`), small enough for its slowdown.

    python tools/gpu_smoke.py [--one]     # --one: a single small case per kernel (racecheck)
"""

from __future__ import annotations

import argparse
import sys

import torch

import perceiver_fast as pf
from perceiver_fast.reference import input_attention_reference

DEVICE = "cuda"

# (B, H, N, M, Dqk, Dv): odd sizes, a head dim over FlashAttention's limit, qk != v, a split key axis.
SHAPES = [(2, 2, 17, 100, 32, 32), (1, 1, 40, 300, 261, 261), (2, 2, 24, 90, 32, 160), (1, 1, 64, 2048, 64, 64)]
# The fused input attention's (B, H, N, M, C, Dqk, Dv): C below and above the head dims, several key
# chunks and splits of the projection method.
INPUT_SHAPES = [(2, 2, 17, 100, 24, 32, 16), (1, 4, 40, 3000, 96, 32, 48)]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare(run, reference, leaves: list[torch.Tensor], grad: bool) -> str | None:
    """None when run(*leaves) (and its gradients) are within bf16's reach of reference on float64
    copies, else what is wrong."""
    out = run(*leaves)
    doubled = [t.detach().double().requires_grad_(grad) for t in leaves]
    ref = reference(*doubled)
    problems = []
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    if relative_error(out, ref) > 2e-2:
        problems.append(f"output error {relative_error(out, ref):.2e}")
    if grad:
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, dout)
        ref_grads = torch.autograd.grad(ref, doubled, dout.double())
        largest = max(float(r.norm()) for r in ref_grads)
        for i, (g, r) in enumerate(zip(grads, ref_grads)):
            # A gradient that is exactly 0 (the key bias's: its bf16 rounding does not cancel) is judged
            # against the largest one.
            error = float((g.double() - r).norm()) / max(float(r.norm()), 0.1 * largest, 1e-30)
            if error > 5e-2:
                problems.append(f"gradient {i} error {error:.2e}")
    if out.is_cuda:
        torch.cuda.synchronize()
    return "; ".join(problems) or None


def bf16(*shape, grad: bool) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_(grad)


def check(backend: str, shape, key_mask: bool, causal: bool, grad: bool) -> str | None:
    B, H, N, M, dqk, dv = shape
    mask = (torch.rand(B, M, device=DEVICE) > 0.3) if key_mask else None
    leaves = [bf16(B, H, rows, dim, grad=grad) for rows, dim in ((N, dqk), (M, dqk), (M, dv))]
    return compare(lambda q, k, v: pf.cross_attention(q, k, v, key_mask=mask, causal=causal, backend=backend),
                   lambda q, k, v: pf.attention_reference(q, k, v, key_mask=mask, causal=causal)[0], leaves, grad)


def check_input(method: str, shape, key_mask: bool, causal: bool, grad: bool) -> str | None:
    """The Triton fused input attention of `method` (q, x and both projections' weights and biases)."""
    B, H, N, M, C, dqk, dv = shape
    mask = (torch.rand(B, M, device=DEVICE) > 0.3) if key_mask else None
    leaves = [bf16(B, H, N, dqk, grad=grad), bf16(B, M, C, grad=grad), bf16(H * dqk, C, grad=grad),
              bf16(H * dqk, grad=grad), bf16(H * dv, C, grad=grad), bf16(H * dv, grad=grad)]

    def names(q, x, wk, bk, wv, bv):
        return dict(k_weight=wk / C ** 0.5, k_bias=bk, v_weight=wv / C ** 0.5, v_bias=bv, key_mask=mask, causal=causal)

    return compare(lambda *t: pf.fused_input_attention(*t[:2], **names(*t), method=method, backend="triton"),
                   lambda *t: input_attention_reference(*t[:2], **names(*t)), leaves, grad)


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
    cases = [(check, backend, shape) for backend in ("triton", "cuda") for shape in shapes]
    cases += [(check_input, method, shape) for method in ("shortcut", "projection")
              for shape in (INPUT_SHAPES[:1] if args.one else INPUT_SHAPES)]
    for check_case, kind, shape in cases:
        for key_mask, causal in maskings:
            try:
                problem = check_case(kind, shape, key_mask, causal, True)
            except Exception as error:  # a kernel that fails to run is a finding, reported with the rest
                problem = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            failures += problem is not None
            print(f"{'FAIL' if problem else 'ok  '} {kind:10s} {shape} key_mask={int(key_mask)} "
                  f"causal={int(causal)} grad=1 {problem or ''}", flush=True)
    print(f"gpu_smoke: {failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
