"""Every GPU kernel of the library on small shapes, checked against the float64 reference: forward and
backward, key masks, causal, attention dropout (Triton; the reference takes the kernels' keep mask) and both
methods of the fused input attention. `make gpu` runs it first, and under compute-sanitizer with --one.

    python tools/gpu_smoke.py [--one]     # --one: a single small case per kernel and mode
"""

from __future__ import annotations

import argparse
import os
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
DROPOUT_P = 0.3


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def compare(run, reference, leaves: list[torch.Tensor]) -> str | None:
    """None when run(*leaves) and its gradients are within bf16's reach of reference on float64 copies,
    else what is wrong."""
    out = run(*leaves)
    doubled = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference(*doubled)
    problems = []
    if not torch.isfinite(out).all():
        problems.append("non-finite output")
    if relative_error(out, ref) > 2e-2:
        problems.append(f"output error {relative_error(out, ref):.2e}")
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


def bf16(*shape) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE, dtype=torch.bfloat16).requires_grad_()


def dropout_draw(B: int, H: int, N: int, M: int, p: float, backend: str):
    """(seed, keep): the keep mask the next call of `backend` draws after torch.manual_seed(seed), for the
    reference (None, None without dropout)."""
    if not p:
        return None, None
    seed = int(torch.randint(2**62, ()))
    torch.manual_seed(seed)
    return seed, pf.attention_dropout_mask(B, H, N, M, p, device=DEVICE, backend=backend)


def seeded(seed: int | None, run):
    """run, after torch.manual_seed(seed) where there is dropout: it draws the mask dropout_draw saw."""
    def call(*leaves):
        if seed is not None:
            torch.manual_seed(seed)
        return run(*leaves)
    return call


def check(backend: str, shape, key_mask: bool, causal: bool, dropout_p: float) -> str | None:
    B, H, N, M, dqk, dv = shape
    mask = (torch.rand(B, M, device=DEVICE) > 0.3) if key_mask else None
    leaves = [bf16(B, H, rows, dim) for rows, dim in ((N, dqk), (M, dqk), (M, dv))]
    seed, keep = dropout_draw(B, H, N, M, dropout_p, backend)
    settings = dict(key_mask=mask, causal=causal, dropout_p=dropout_p)
    return compare(seeded(seed, lambda q, k, v: pf.cross_attention(q, k, v, **settings, backend=backend)),
                   lambda q, k, v: pf.attention_reference(q, k, v, **settings, dropout_keep=keep)[0], leaves)


def check_input(method: str, shape, key_mask: bool, causal: bool, dropout_p: float) -> str | None:
    """The Triton fused input attention of `method` (q, x and both projections' weights and biases)."""
    B, H, N, M, C, dqk, dv = shape
    mask = (torch.rand(B, M, device=DEVICE) > 0.3) if key_mask else None
    # The shortcut drops probabilities only where V has no bias (the bias would pass through the dropped ones).
    v_bias = not (dropout_p and method == "shortcut")
    leaves = [bf16(B, H, N, dqk), bf16(B, M, C), bf16(H * dqk, C), bf16(H * dqk), bf16(H * dv, C)]
    leaves += [bf16(H * dv)] if v_bias else []
    seed, keep = dropout_draw(B, H, N, M, dropout_p, "triton")

    def names(q, x, wk, bk, wv, bv=None):
        return dict(k_weight=wk / C ** 0.5, k_bias=bk, v_weight=wv / C ** 0.5, v_bias=bv, key_mask=mask, causal=causal,
                    dropout_p=dropout_p)

    return compare(seeded(seed, lambda *t: pf.fused_input_attention(*t[:2], **names(*t), method=method,
                                                                    backend="triton")),
                   lambda *t: input_attention_reference(*t[:2], **names(*t), dropout_keep=keep), leaves)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", action="store_true", help="one small case per kernel and mode (compute-sanitizer)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: this script checked without a GPU, the Triton kernels under TRITON_INTERPRET=1 "
                             "and no cuda backend (make test)")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device")
        return 1
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_smoke: --device cpu runs the Triton kernels under the interpreter: set TRITON_INTERPRET=1")
        return 1
    backends = ("triton", "cuda") if DEVICE == "cuda" else ("triton",)
    shapes, input_shapes = (SHAPES[:1], INPUT_SHAPES[:1]) if args.one else (SHAPES, INPUT_SHAPES)
    maskings = [(True, True)] if args.one else [(False, False), (True, False), (False, True), (True, True)]
    # Dropout (Triton's kernels only: the cuda backend has none) with and without masks.
    dropped = [(True, True)] if args.one else [(False, False), (True, True)]
    cases = [(check, backend, shape, m, 0.0) for backend in backends for shape in shapes for m in maskings]
    cases += [(check, "triton", shape, m, DROPOUT_P) for shape in shapes for m in dropped]
    cases += [(check_input, method, shape, m, p) for method in ("shortcut", "projection") for shape in input_shapes
              for m, p in [*((m, 0.0) for m in maskings), *((m, DROPOUT_P) for m in dropped)]]
    failures = 0
    for check_case, kind, shape, (key_mask, causal), dropout_p in cases:
        try:
            problem = check_case(kind, shape, key_mask, causal, dropout_p)
        except Exception as error:  # a kernel that fails to run is a finding, reported with the rest
            problem = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
        failures += problem is not None
        print(f"{'FAIL' if problem else 'ok  '} {kind:10s} {shape} key_mask={int(key_mask)} causal={int(causal)} "
              f"dropout={dropout_p} forward+backward {problem or ''}", flush=True)
    print(f"gpu_smoke: {failures} of {len(cases)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
