"""Attention dropout, the same contract on every backend: the keep mask each backend's kernels draw
equals the plain-torch Philox of perceiver_fast/reference.py bit for bit; outputs and every
gradient equal the float64 reference dropping by that mask (with key masks, causal, rows without
keys, the fused input attention); the mask's statistics; determinism under torch.manual_seed
whatever the threads and tiling; and the errors."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from checks import (MASKINGS, ROW_PATHS, assert_matches, backend_id, check_attention, forced_cpu_path, random_key_mask,
                    same_seed_keep_mask)

import perceiver_fast as pf
from perceiver_fast.dispatch import get_backend
from perceiver_fast.dropout import keep_threshold
from perceiver_fast.ops.attention import attention, attention_backward
from perceiver_fast.reference import dropout_keep_mask, input_attention_reference
from perceiver_fast.validation import validate_attention, validate_input_attention

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton kernels run on CPU tensors only under the interpreter (make test sets it).
BACKENDS = ["cpu", "reference"] + (["triton"] if INTERPRETING else [])
DTYPES = {"cpu": [torch.float32, torch.bfloat16, torch.float64], "reference": [torch.float32],
          "triton": [torch.float32, torch.bfloat16]}
CASES = [(backend, dtype) for backend in BACKENDS for dtype in DTYPES[backend]]
CASE_IDS = [f"{backend}-{str(dtype).replace('torch.', '')}" for backend, dtype in CASES]
# (B, H, N, M, Dqk, Dv): keys not a multiple of 4 nor of a tile, one query, N > M under causal.
SHAPES = {"odd": (2, 3, 17, 101, 16, 24), "one-query": (2, 2, 1, 70, 8, 8), "n-over-m": (2, 1, 40, 23, 16, 16)}


def cross(backend):
    def run(q, k, v, key_mask, causal, dropout_p):
        return pf.cross_attention(q, k, v, key_mask=key_mask, causal=causal, dropout_p=dropout_p, return_lse=True,
                                  backend=backend)
    return run


# The cpu kernel's Philox at each level its rows have here: AVX-512 (x86-64's native), the SIMD one
# (AVX2 or NEON), the portable one.
MASK_BACKENDS = [("cpu", rows) for rows in ROW_PATHS] + [(backend, None) for backend in BACKENDS if backend != "cpu"]


@pytest.mark.parametrize("backend", MASK_BACKENDS, ids=backend_id)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 9, 130), (3, 1, 4, 1000)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.97])
def test_kernels_draw_the_reference_mask(backend, shape, p):
    kernel, rows = backend
    seed = torch.randint(0, 2**63 - 1, (2,))
    with forced_cpu_path(rows) if rows else contextlib.nullcontext():
        got = get_backend(kernel).dropout_keep_mask(seed, *shape, p)
    assert got.dtype == torch.bool and got.shape == shape
    assert torch.equal(got, dropout_keep_mask(seed, *shape, p))


def test_reference_philox_is_philox4x32_10():
    # Random123's known-answer vectors for Philox4x32-10 (counter, key -> output).
    from perceiver_fast.reference import philox4x32

    def words(counter, key):
        return [int(w) for w in philox4x32(tuple(torch.tensor([c]) for c in counter), key)]

    assert words((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert words((ones,) * 4, (ones, ones)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert words((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.3, 0.8])
def test_mask_statistics(backend, p):
    # 2 x 4 x 64 x 1000 = 512000 draws: the kept fraction within 6 binomial sigmas of 1 - p, each
    # key column (counter word j & 3) and each head likewise within 6 sigmas of its own count.
    keep = pf.attention_dropout_mask(2, 4, 64, 1000, p, backend=backend).double()
    for values in (keep.flatten(), *(keep[..., r::4].flatten() for r in range(4)), *keep.unbind(1)):
        sigma = math.sqrt(p * (1 - p) / values.numel())
        assert abs(values.mean().item() - (1 - p)) <= 6 * sigma
    assert (1 - keep_threshold(p) / 2**32) == pytest.approx(1 - p, abs=2**-31)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_output_keeps_the_mean(backend):
    # Uniform probabilities (q = 0) over values of 1: each output is (kept keys / M) / (1 - p), 1 on
    # average; the mean over 2 x 4 x 64 rows of 1000 keys within 6 sigmas.
    p, M = 0.3, 1000
    q, k, v = torch.zeros(2, 4, 64, 8), torch.randn(2, 4, M, 8), torch.ones(2, 4, M, 8)
    out = pf.cross_attention(q, k, v, dropout_p=p, backend=backend)
    sigma = math.sqrt(p / (1 - p) / M / (2 * 4 * 64))
    assert abs(out[..., 0].double().mean().item() - 1) <= 6 * sigma
    assert torch.equal(out[..., 0], out[..., 7])  # one mask per score, shared by every value channel


@pytest.mark.parametrize("backend,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_cross_attention_matches_reference_with_the_same_mask(backend, dtype, key_mask, causal, shape):
    # random_key_mask leaves the first batch item no key at all: its rows give 0 and no gradient
    check_attention(cross(backend), shape, dtype, key_mask, causal, dropout_p=0.25)


@pytest.mark.parametrize("backend,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_latent_attention_matches_reference_with_the_same_mask(backend, dtype, causal):
    B, H, N, D = 2, 2, 48, 16
    q, k, v = (torch.randn(B, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3))
    seed, keep = same_seed_keep_mask(B, H, N, N, 0.2)
    torch.manual_seed(seed)
    out = pf.latent_attention(q, k, v, causal=causal, dropout_p=0.2, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = pf.attention_reference(*leaves, causal=causal, dropout_p=0.2, dropout_keep=keep)[0]
    want_grads = torch.autograd.grad(want, leaves, dout.double())
    same = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    same_out = pf.attention_reference(*same, causal=causal, dropout_p=0.2, dropout_keep=keep,
                                      compute_dtype=dtype)[0].to(dtype)
    same_grads = torch.autograd.grad(same_out, same, dout)
    assert_matches("out", out, want, same_out)
    for name, g, w, s in zip(("dq", "dk", "dv"), grads, want_grads, same_grads):
        assert_matches(name, g, w, s)


INPUT_METHODS = {"cpu": ["projection", "shortcut"], "reference": ["projection"], "triton": ["projection", "shortcut"]}
INPUT_CASES = [(b, m) for b in BACKENDS for m in INPUT_METHODS[b]]


@pytest.mark.parametrize("backend,method", INPUT_CASES, ids=[f"{b}-{m}" for b, m in INPUT_CASES])
@pytest.mark.parametrize("key_mask,causal", MASKINGS)
def test_fused_input_attention_matches_reference_with_the_same_mask(backend, method, key_mask, causal):
    # The shortcut with dropout is exact only without a bias on V (the validation refuses it otherwise).
    B, H, N, M, C, dqk, dv = 2, 2, 9, 45, 12, 8, 6
    shortcut = method == "shortcut"
    q = torch.randn(B, H, N, dqk, requires_grad=True)
    x = torch.randn(B, M, C, requires_grad=True)
    weights = dict(k_weight=torch.randn(H * dqk, C) / C ** 0.5, k_bias=torch.randn(H * dqk),
                   v_weight=torch.randn(H * dv, C) / C ** 0.5, v_bias=None if shortcut else torch.randn(H * dv),
                   norm_weight=1 + 0.1 * torch.randn(C), norm_bias=None if shortcut else 0.1 * torch.randn(C))
    for t in weights.values():
        if t is not None:
            t.requires_grad_()
    mask = random_key_mask(B, M) if key_mask else None
    seed, keep = same_seed_keep_mask(B, H, N, M, 0.3)
    torch.manual_seed(seed)
    out = pf.fused_input_attention(q, x, **weights, key_mask=mask, causal=causal, method=method, dropout_p=0.3,
                                   backend=backend)
    leaves = [q, x] + [t for t in weights.values() if t is not None]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    doubled = {name: None if t is None else t.detach().double().requires_grad_() for name, t in weights.items()}
    q64, x64 = q.detach().double().requires_grad_(), x.detach().double().requires_grad_()
    want = input_attention_reference(q64, x64, **doubled, key_mask=mask, causal=causal, dropout_p=0.3,
                                     dropout_keep=keep)
    want_grads = torch.autograd.grad(want, [q64, x64] + [t for t in doubled.values() if t is not None], dout.double())
    assert_matches("out", out, want)
    names = ["dq", "dx"] + [f"d{name}" for name, t in weights.items() if t is not None]
    for name, g, w in zip(names, grads, want_grads):
        if name == "dk_bias":  # exactly 0: the key bias cancels in the softmax
            assert g.abs().max() <= 1e-5 * max(1.0, float(w.abs().max()) + 1)
            continue
        assert_matches(name, g, w)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tiling", [[], [5, 3, 2], [16, 0, 3, 7]], ids=["default", "odd-tiles", "query-chunks"])
def test_cpu_result_depends_on_the_seed_alone(threads, tiling):
    # The mask follows each score's position, not the tile, worker or chunk that computes it: every
    # thread count and tiling (tiles of 5 keys, rows in chunks of 7) gives the same-mask reference.
    B, H, N, M, D = 2, 2, 20, 77, 16
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (N, M, M))
    seed = torch.randint(0, 2**63 - 1, (2,))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, lse = attention(q, k, v, None, True, 0.25, 0.4, seed, "cpu", "cross", tiling)
        dout = torch.randn_like(out)
        grads = attention_backward(dout, q, k, v, out, lse, None, True, 0.25, 0.4, seed, "cpu", "cross", tiling)
    finally:
        torch.set_num_threads(previous)
    keep = dropout_keep_mask(seed, B, H, N, M, 0.4)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = pf.attention_reference(*leaves, causal=True, scale=0.25, dropout_p=0.4, dropout_keep=keep)[0]
    want_grads = torch.autograd.grad(want, leaves, dout)
    assert torch.allclose(out, want, rtol=0, atol=1e-12)
    for g, w in zip(grads, want_grads):
        assert torch.allclose(g, w, rtol=0, atol=1e-6)  # the saved lse is float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_result_other_seed_other_result(backend):
    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for n in (10, 60, 60))

    def step(seed):
        torch.manual_seed(seed)
        out = pf.cross_attention(q, k, v, dropout_p=0.5, backend=backend)
        return out, torch.autograd.grad(out.square().sum(), (q, k, v))

    first, again, other = step(7), step(7), step(8)
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))
    assert not torch.equal(first[0], other[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dropout_draws_nothing_and_changes_nothing(backend):
    q, k, v = (torch.randn(2, 2, n, 16) for n in (10, 60, 60))
    state = torch.get_rng_state()
    out = pf.cross_attention(q, k, v, dropout_p=0.0, backend=backend)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(out, pf.cross_attention(q, k, v, backend=backend))


def test_public_mask_is_the_mask_of_the_next_call():
    q, k, v = (torch.randn(2, 3, n, 8) for n in (6, 50, 50))
    v = torch.eye(50).expand(2, 3, 50, 50)  # out = the dropped probabilities themselves
    torch.manual_seed(3)
    keep = pf.attention_dropout_mask(2, 3, 6, 50, 0.5)
    torch.manual_seed(3)
    out = pf.cross_attention(q, k, v.contiguous(), dropout_p=0.5, backend="cpu")
    assert torch.equal(out != 0, keep)


def test_compiled_call_matches_eager_with_eager_random_draws():
    import torch._inductor.config as inductor_config

    q, k, v = (torch.randn(2, 2, n, 16, requires_grad=True) for n in (10, 60, 60))

    def step(q, k, v):
        return pf.cross_attention(q, k, v, dropout_p=0.3, backend="cpu").square().sum()

    torch.manual_seed(11)
    eager = step(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        compiled = torch.compile(step, fullgraph=True)
        torch.manual_seed(11)
        got = compiled(q, k, v)
        got_grads = torch.autograd.grad(got, (q, k, v))
    assert torch.allclose(got, eager, rtol=1e-6)
    for g, e in zip(got_grads, eager_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-6)


def test_registered_op_with_dropout_passes_opcheck():
    q, k, v = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (5, 30, 30))
    seed = torch.randint(0, 2**63 - 1, (2,))
    args = (q, k, v, random_key_mask(2, 30), True, 0.3, 0.2, seed, "cpu", "cross", [])
    torch.library.opcheck(attention, args)


def test_errors_name_the_argument():
    q, k, v = (torch.randn(1, 1, n, 8) for n in (4, 9, 9))
    for bad, kind in ((1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError),
                      (True, TypeError)):
        with pytest.raises(kind, match="dropout_p"):
            pf.cross_attention(q, k, v, dropout_p=bad)
    with pytest.raises(ValueError, match="dropout_p"):
        pf.latent_attention(q, q, q, dropout_p=1.5)
    x, weights = torch.randn(1, 9, 6), dict(k_weight=torch.randn(8, 6), v_weight=torch.randn(8, 6),
                                            v_bias=torch.randn(8))
    with pytest.raises(ValueError, match="shortcut.*dropout_p=0.1"):
        pf.fused_input_attention(q, x, **weights, method="shortcut", dropout_p=0.1)
    # with a bias on V, auto takes the projection under dropout
    assert validate_input_attention(q, x, **weights, dropout_p=0.1).method == "projection"
    with pytest.raises(ValueError, match="dropout_p must be > 0"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.0)
    with pytest.raises(ValueError, match="keys must be an int"):
        pf.attention_dropout_mask(1, 1, 2, -2, 0.5)
    with pytest.raises(ValueError, match="backend 'cuda' (is unavailable|has no attention dropout)"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.5, backend="cuda")


def test_dropout_mask_of_a_backend_without_dropout_is_refused(monkeypatch):
    monkeypatch.setattr(get_backend("cuda"), "unavailable", None)  # as on a machine with CUDA kernels
    with pytest.raises(ValueError, match="backend 'cuda' has no attention dropout, so no dropout mask"):
        pf.attention_dropout_mask(1, 1, 2, 2, 0.5, backend="cuda")


def test_backends_without_dropout_say_so():
    q, k, v = (torch.randn(1, 1, n, 8, dtype=torch.bfloat16) for n in (4, 9, 9))
    reasons = pf.explain(pf.cross_attention, q, k, v, dropout_p=0.1)
    assert "dropout not supported (dropout_p > 0)" in reasons["cuda"] or reasons["cuda"] == [
        "the CUDA kernels are not built (perceiver_fast._C was compiled against a torch without CUDA)"]
    from perceiver_fast.backends.cuda import CudaBackend

    problem = validate_attention(q, k, v, dropout_p=0.1)
    assert "dropout not supported (dropout_p > 0)" in CudaBackend.capabilities.refusals(problem)
