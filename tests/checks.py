"""Comparison helpers: every backend is judged against the float64 reference (docs/design.md)."""

from __future__ import annotations

import contextlib
import os

import torch

from perceiver_fast import attention_reference
from perceiver_fast.dropout import draw_seed
from perceiver_fast.ops.attention import attention
from perceiver_fast.reference import allowed_keys, dropout_keep_mask

FP32_RTOL = 1e-4


def random_inputs(B, H, N, M, dqk, dv, dtype=torch.float32, device="cpu", requires_grad=True):
    q = torch.randn(B, H, N, dqk, dtype=dtype, device=device)
    k = torch.randn(B, H, M, dqk, dtype=dtype, device=device)
    v = torch.randn(B, H, M, dv, dtype=dtype, device=device)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def random_key_mask(B, M, device="cpu", empty_batch=True):
    """Random keep-mask; with empty_batch the first batch entry has no key at all (when B > 1)."""
    mask = torch.rand(B, M, device=device) > 0.3
    if empty_batch and B > 1:
        mask[0] = False
    return mask


def reference_with_grads(q, k, v, dout, *, key_mask=None, causal=False, scale=None, compute_dtype=None,
                         dropout_p=0.0, dropout_keep=None):
    """(out, lse, (dq, dk, dv)) of the reference, computed in compute_dtype (float64 when None)."""
    dtype = compute_dtype or torch.float64
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = attention_reference(*leaves, key_mask=key_mask, causal=causal, scale=scale, dropout_p=dropout_p,
                                   dropout_keep=dropout_keep)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return out, lse, grads


def kernel_runner(kernel: str, kind: str = "cross", tiling=()):
    """run(q, k, v, key_mask, causal[, dropout_p]) -> (out, lse) on one kernel family's registered op,
    past dispatch, the dropout seed drawn as the public functions draw it: `tiling` overrides its
    loop sizes (see perceiver_fast.ops.attention)."""
    def run(q, k, v, key_mask, causal, dropout_p=0.0):
        seed = draw_seed(q.device) if dropout_p else None
        return attention(q, k, v, key_mask, causal, q.shape[-1] ** -0.5, dropout_p, seed, kernel, kind, list(tiling))
    return run


def rel_error(actual, expected) -> float:
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).norm()
    norm = expected.norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def assert_matches(name, actual, expected64, same_dtype_ref=None, rtol=FP32_RTOL, zero_atol=FP32_RTOL,
                   delta_rounding=0.0):
    """float32/64: relative Frobenius error <= rtol of float64, or the error's norm <= zero_atol where
    the float64 result is exactly 0. Half: see below; delta_rounding (dq, dk) from
    `output_rounding_in_delta`."""
    assert actual.shape == expected64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected64.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    if actual.dtype in (torch.float32, torch.float64):
        if expected64.norm() == 0:
            err = actual.detach().double().norm().item()
            assert err <= zero_atol, f"{name}: error {err:.3g} > {zero_atol:.3g} where the result is 0"
            return
        err = rel_error(actual, expected64)
        assert err <= rtol, f"{name}: relative error {err:.3g} > {rtol:.3g}"
        return
    # FlashAttention's rule: twice the same-dtype reference's error, plus twice the worst error of
    # merely rounding the exact result to this dtype (half an ulp of the largest value: a floor no
    # kernel can beat, since fp32 noise may move a value across a rounding boundary), plus fp32
    # accumulation noise for results that are exactly 0 (one key: dq = 0). The rounding this draw
    # happened to get is no floor: on few elements it can be far below half an ulp, and the bound
    # then failed about once in 10^4 comparisons of a correct kernel.
    expected64 = expected64.double()
    err = (actual.double() - expected64).abs().max().item()
    ref_err = (same_dtype_ref.double() - expected64).abs().max().item()
    rounding = torch.finfo(actual.dtype).eps / 2 * expected64.abs().max().item()
    bound = 2 * ref_err + 2 * rounding + 2 * delta_rounding + 1e-5
    assert err <= bound, (f"{name}: max error {err:.3g} > 2 x same-dtype reference's {ref_err:.3g} "
                          f"+ 2 x half an ulp of the largest value {rounding:.3g}")


def output_rounding_in_delta(q, k, dout, out64, lse64, key_mask, causal, dtype) -> tuple[float, float]:
    """The most dq and dk (max abs) can move because the backward takes FlashAttention's
    delta = rowsum(dO * O) from the output rounded to `dtype`: that rounding moves delta_i by at
    most u sum_d |dO_id O_id| (u: the unit roundoff), and dS_ij = P_ij (dP_ij - delta_i) scale
    carries it into dq = dS K and dk = dS^T Q. PyTorch's same-dtype reference takes delta another
    way, so its error does not cover this one where the gradients cancel (a row with two keys)."""
    q64, k64, do64 = q.detach().double(), k.detach().double(), dout.detach().double()
    scale = q.shape[-1] ** -0.5
    shift = torch.finfo(dtype).eps / 2 * (do64.abs() * out64.detach().double().abs()).sum(-1, keepdim=True)
    lse = lse64.double()[..., None]
    probs = torch.exp(q64 @ k64.transpose(-1, -2) * scale - torch.where(torch.isinf(lse), 0.0, lse))
    allowed = allowed_keys(q.shape[0], q.shape[2], k.shape[2], key_mask, causal, q.device)
    probs = torch.where(torch.isinf(lse), 0.0, probs if allowed is None else probs * allowed)
    carried = probs * shift * scale
    return ((carried @ k64.abs()).max().item(), (carried.transpose(-1, -2) @ q64.abs()).max().item())


def assert_lse_matches(lse, lse64, rtol=1e-4):
    assert lse.dtype == torch.float32 and lse.shape == lse64.shape
    empty = torch.isneginf(lse64)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly for rows with no key"
    assert not torch.isnan(lse).any()
    if (~empty).any():
        err = (lse[~empty].double() - lse64[~empty].double()).abs().max().item()
        assert err <= rtol * max(1.0, lse64[~empty].abs().max().item()), f"lse error {err:.3g}"


# name: (B, H, N, M, Dqk, Dv); odd sizes on purpose.
CROSS_SHAPES = {
    "small": (2, 2, 17, 100, 32, 32),
    "one-query": (2, 1, 1, 100, 16, 16),
    "one-key": (2, 2, 33, 1, 16, 24),
    "m1000": (1, 1, 20, 1000, 32, 32),
    "n257": (1, 1, 257, 80, 16, 16),
    "d261": (1, 1, 40, 150, 261, 261),
    "qk32-v160": (2, 2, 24, 90, 32, 160),
    "d1024": (1, 1, 16, 70, 1024, 1024),
    "tiny-heads": (2, 3, 9, 50, 3, 5),
}
# (key_mask, causal); causal with N > M (rows with no key) and N < M are both in CROSS_SHAPES.
MASKINGS = [(False, False), (True, False), (False, True), (True, True)]


def same_seed_keep_mask(batch, heads, queries, keys, dropout_p, device="cpu"):
    """(generator seed, keep mask): the mask a call with dropout_p draws right after
    torch.manual_seed(generator seed), by the plain-torch definition (None without dropout)."""
    seed = int(torch.randint(2**31, ()))
    torch.manual_seed(seed)
    keep = dropout_keep_mask(draw_seed(torch.device(device)), batch, heads, queries, keys, dropout_p) \
        if dropout_p else None
    return seed, keep


def check_attention(run, shape, dtype, key_mask, causal, device="cpu", dropout_p=0.0, rtol=FP32_RTOL, inputs=None):
    """run(q, k, v, key_mask=, causal=[, dropout_p=]) -> (out, lse): output, lse and dq/dk/dv against
    float64; with dropout_p, against the reference dropping by the mask the call draws. float32 and
    float64 results are judged by rtol (assert_matches): relative, or where the result is exactly 0
    (dq and dk of rows with one key) relative to the largest of the four results. key_mask: True for
    a random one, or the mask itself; inputs: the q, k, v to use instead of random ones."""
    B, H, N, M, dqk, dv = shape
    if inputs is None:
        q, k, v = random_inputs(B, H, N, M, dqk, dv, dtype=dtype, device=device)
    else:
        q, k, v = (t.detach().to(dtype).requires_grad_() for t in inputs)
    if isinstance(key_mask, torch.Tensor):
        mask = key_mask
    else:
        mask = random_key_mask(B, M, device=device) if key_mask else None
    dropout = dict(dropout_p=dropout_p) if dropout_p else {}
    seed, keep = same_seed_keep_mask(B, H, N, M, dropout_p, device)
    torch.manual_seed(seed)
    out, lse = run(q, k, v, key_mask=mask, causal=causal, **dropout)
    assert out.dtype == dtype and out.shape == (B, H, N, dv)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    dropout = dict(dropout_p=dropout_p, dropout_keep=keep)
    out64, lse64, grads64 = reference_with_grads(q, k, v, dout, key_mask=mask, causal=causal, **dropout)
    same = (reference_with_grads(q, k, v, dout, key_mask=mask, causal=causal, compute_dtype=dtype, **dropout)
            if dtype in (torch.float16, torch.bfloat16) else (None, None, (None, None, None)))
    zero_atol = rtol * max(t.norm().item() for t in (out64, *grads64))
    assert_matches("out", out, out64, same[0], rtol, zero_atol)
    assert_lse_matches(lse, lse64, max(rtol, 1e-4))
    empty_rows = torch.isneginf(lse64)
    assert (out[empty_rows] == 0).all(), "a query with no key must give output 0"
    shifts = (output_rounding_in_delta(q, k, dout, out64, lse64, mask, causal, dtype) if same[0] is not None
              else (0.0, 0.0))
    for name, g, g64, g_same, shift in zip(("dq", "dk", "dv"), grads, grads64, same[2], (*shifts, 0.0)):
        assert g.dtype == dtype
        assert_matches(name, g, g64, g_same, rtol, zero_atol, shift)


def check_non_contiguous(run):
    """HF and lucidrains hold heads as (B, N, H, D); v here also has a strided last dimension."""
    B, H, N, M, D = 2, 3, 12, 70, 16
    q = torch.randn(B, N, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, M, H, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, M, H, 2 * D)[..., ::2].transpose(1, 2).requires_grad_()
    out, _ = run(q, k, v, key_mask=None, causal=False)
    dout = torch.randn(B, N, H, D).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out64, _, grads64 = reference_with_grads(q, k, v, dout)
    assert_matches("out", out, out64)
    for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
        assert_matches(name, g, g64)


# Latent self-attention shapes (N == M).
LATENT_SHAPES = {"n64-d32": (2, 2, 64, 64, 32, 32), "n100-qk32-v160": (1, 2, 100, 100, 32, 160),
                 "n48-d128": (1, 1, 48, 48, 128, 128), "n1": (2, 1, 1, 1, 8, 8)}


def _lower_isa_levels() -> list[str]:
    """The instruction-set levels below the one in use (csrc/cpu/vector_paths.h), highest first: each
    the paths of a CPU that has only that much (x86-64: avx512, avx2, portable)."""
    from perceiver_fast.extension import compiled as _C
    if _C is None:
        return []
    features = _C.cpu_features()
    levels = features["isa_levels"]
    return levels[:levels.index(features["isa"])][::-1]


# The C++ kernel's paths this machine can force: "native" is what runs here (the CPU's level, under
# PERCEIVER_FAST_CPU_ISA where set), then each lower instruction-set level, then the at::mm GEMMs.
ISA_PATHS = _lower_isa_levels()
CPU_PATHS = ["native", *ISA_PATHS, "portable-gemm"]
# The row code's own paths (softmax steps, few-query rows): native, the SIMD rows, the portable loops.
ROW_PATHS = ["native", *(level for level in ISA_PATHS if level in ("avx2", "neon", "portable"))]


def besides_level(notes: list[str]) -> list[str]:
    """pf.explain's cpu notes less the line naming this process's instruction-set level, which it adds
    at every level but the one measured fastest (backends/cpu_levels.py: a capped x86 level, or NEON)."""
    from perceiver_fast.backends.cpu_levels import level_note
    return [note for note in notes if note != level_note()]


@contextlib.contextmanager
def forced_cpu_path(path: str):
    from perceiver_fast.extension import CPU_ISA_VARIABLE, compiled as _C
    if path in ISA_PATHS:
        _C.set_cpu_isa(path)
    _C.set_portable_gemm(path == "portable-gemm")
    try:
        yield
    finally:
        _C.set_cpu_isa(os.environ.get(CPU_ISA_VARIABLE) or "none")
        _C.set_portable_gemm(False)


# Every (backend, cpu path) that runs CPU tensors here: the cpu kernel on each forced path, Triton
# under TRITON_INTERPRET=1, the reference.
def runnable_backends() -> list[tuple[str, str | None]]:
    backends = [("cpu", path) for path in CPU_PATHS]
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append(("triton", None))
    return backends + [("reference", None)]


def backend_id(backend: tuple[str, str | None]) -> str:
    kernel, path = backend
    return kernel if path is None else f"{kernel}-{path}"
