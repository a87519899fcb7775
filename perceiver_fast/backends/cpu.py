"""The cpu backend: C++ kernels (csrc/cpu/) on oneDNN brgemm micro-kernels and AVX-512, AVX2 or NEON
row code; it fuses both input-attention methods. At every instruction-set level but avx512_bf16,
pf.explain says how the level's kernels measured against SDPA (cpu_levels.py). The kernels are the
functions of perceiver_fast._C, registered here as the "cpu" kernels of the ops; its linear kernels
(oneDNN GEMMs with fused epilogues) are cpu_linear's, which need no extension."""

from __future__ import annotations

import functools

import torch

from .. import extension
from ..ops import attention, input_attention, linear  # the op modules, whose KERNELS this fills
from ..validation import INPUT_ATTENTION, LINEAR, MAX_HEAD_DIM
from . import cpu_levels, cpu_linear
from .base import Backend, Capabilities, LinearCapabilities
from .probes import median_ms


class CpuBackend(Backend):
    name = "cpu"
    capabilities = Capabilities(
        devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32, torch.float64}),
        max_dim_qk=MAX_HEAD_DIM, max_dim_v=MAX_HEAD_DIM, key_mask=True, causal=True, grad=True,
        double_backward=False, dropout=True,
    )
    fused_input_methods = frozenset({"shortcut", "projection"})
    linear = LinearCapabilities(devices=frozenset({"cpu"}), dtypes=frozenset({torch.bfloat16, torch.float32}),
                                grad=True,
                                empty_batch=False)
    unavailable = extension.LOAD_ERROR
    linear_unavailable = cpu_linear.UNAVAILABLE

    def linear_refusals(self, problem, explicit: bool) -> list[str]:
        reasons = super().linear_refusals(problem, explicit)
        if not reasons and not explicit and problem.macs < cpu_linear.SMALL_PROBLEM_MACS:
            reasons.append(f"{problem.macs} multiply-adds, under {cpu_linear.SMALL_PROBLEM_MACS}: the op's call "
                           f"overhead (about 0.1 ms) would exceed what its GEMM saves over torch's")
        return reasons

    def dropout_keep_mask(self, seed, batch, heads, queries, keys, dropout_p):
        return extension.require().cpu_dropout_keep_mask(seed, batch, heads, queries, keys, dropout_p)

    def notes(self, problem) -> list[str]:
        if problem.op == LINEAR:
            return self._linear_notes(problem)
        level = cpu_levels.level_note()
        return ([level] if level else []) + self._precision_notes(problem)

    def _linear_notes(self, problem) -> list[str]:
        speedup = cpu_linear.onednn_speedup(problem.dtype, problem.rows == 1)
        if cpu_linear.gemm(problem.dtype, problem.rows) == "onednn":
            return [f"runs oneDNN GEMMs with fused epilogues: {speedup:.2f}x torch's F.linear here"]
        return [f"runs torch's own GEMM (F.linear): oneDNN's ran only {speedup:.2f}x as fast here"]

    def _precision_notes(self, problem) -> list[str]:
        if problem.dtype != torch.float32:
            return []
        precision = torch.backends.mkldnn.matmul.fp32_precision
        products = float32_products(fused=problem.op == INPUT_ATTENTION)
        if products == "bfloat16":
            return [f"runs float32 with bfloat16 products and float32 accumulation: torch's float32 matmul "
                    f"precision is 'bf16' and they ran {bf16_products_speedup():.2f}x as fast here"]
        if products == "split-bfloat16":
            return [f"runs float32 with split bfloat16 products (three per product, about 16 significant bits) and "
                    f"float32 accumulation: torch's float32 matmul precision is 'tf32' and they ran "
                    f"{split_products_speedup():.2f}x as fast here (a forward of at most 4 queries per head reads "
                    f"K and V in place in full float32)"]
        if precision == "bf16":
            return [f"runs full float32 although torch's float32 matmul precision is 'bf16': bfloat16 products "
                    f"ran only {bf16_products_speedup():.2f}x as fast here"]
        if precision == "tf32":
            why = ("the fused input kernels have no split products" if problem.op == INPUT_ATTENTION
                   else f"split bfloat16 products ran only {split_products_speedup():.2f}x as fast here")
            return [f"runs full float32 (more precise than the 'tf32' precision torch allows): {why}"]
        return []


# torch's float32 matmul precision (torch.backends.mkldnn.matmul.fp32_precision, which
# torch.set_float32_matmul_precision sets) is honoured for float32 inputs, each faster method only
# where a one-time probe finds it at least SPEEDUP_NEEDED as fast as full float32 (else full float32,
# always allowed):
# - "ieee"/"none": full float32.
# - "tf32" (at least TF32's 11 significant bits): the attention kernels' split bfloat16 products
#   (but the few-query forward, at most 4 queries per head, reads K and V in place in float32)
#   (csrc/cpu/tile_gemm.h: three bfloat16 products per float32 one, about 16 bits; softmax
#   statistics and accumulation in float32). They pay where bfloat16 products run at least about
#   3x float32's rate (AMX); with AVX512-BF16 alone they cost 1.4-2x full float32. The fused input
#   kernels have no split products and run full float32.
# - "bf16": the bfloat16 kernels (bfloat16 products; softmax statistics and accumulation in
#   float32; inputs, and so x before the fused LayerNorm, rounded to bfloat16 once; outputs
#   returned in float32).
SPEEDUP_NEEDED = 1.1


def _probe_speedup(faster) -> float:
    """Time of the float32 forward over faster(kernel, q, k, v, scale) on one cross-attention (8 heads,
    256 queries, 4096 keys, head dim 64), median of 9 each."""
    kernel = extension.require().cpu_attention_forward
    generator = torch.Generator().manual_seed(0)  # not torch's default one, the caller's (dropout seeds)
    q, k, v = (torch.randn(1, 8, n, 64, generator=generator) for n in (256, 4096, 4096))
    return median_ms(lambda: kernel(q, k, v, None, False, 0.125)) / median_ms(lambda: faster(kernel, q, k, v, 0.125))


@functools.cache
def bf16_products_speedup() -> float:
    """The probe of the bfloat16 kernel, its conversions included; measured once per process."""
    return _probe_speedup(lambda kernel, q, k, v, scale: kernel(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, False,
                                                               scale)[0].float())


@functools.cache
def split_products_speedup() -> float:
    """The probe of the split bfloat16 products; measured once per process."""
    return _probe_speedup(lambda kernel, q, k, v, scale: kernel(q, k, v, None, False, scale, split_bf16=True))


def float32_products(fused: bool = False) -> str:
    """How the kernels multiply float32 inputs now (see above): "bfloat16", "split-bfloat16" or
    "float32"; fused: for the fused input kernels."""
    precision = torch.backends.mkldnn.matmul.fp32_precision
    if precision == "bf16" and bf16_products_speedup() >= SPEEDUP_NEEDED:
        return "bfloat16"
    if precision == "tf32" and not fused and split_products_speedup() >= SPEEDUP_NEEDED:
        return "split-bfloat16"
    return "float32"


def _honouring_float32_precision(kernel, lse_position: int | None = None, fused: bool = False):
    """kernel, with float32 calls run in bfloat16 when float32_products(fused) says so (lse stays
    float32); the split products are the kernels' own (_split_products)."""
    @functools.wraps(kernel)
    def run(*args):
        if args[0].dtype != torch.float32 or float32_products(fused) != "bfloat16":
            return kernel(*args)
        halved = [a.bfloat16() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 and i != lse_position else a
                  for i, a in enumerate(args)]
        return tuple(t.float() if t.dtype == torch.bfloat16 else t for t in kernel(*halved))
    return run


def _split_products(q) -> bool:
    return q.dtype == torch.float32 and float32_products() == "split-bfloat16"


# The C++ kernels keep every query row of a head resident per worker (the row, its float32
# accumulator, and at most one partial state per worker for split keys): about
# 4 (dim_qk + 2 dim_v + 4) bytes per row and worker (6 for the split products' operands of three
# bfloat16 each, counted as 6 throughout), a workspace sized for a few hundred latents.
# A decoder with one query per pixel would make it the model's largest allocation (about 2 GiB for
# HF's optical-flow decoder at 182528 pixels), so a query axis whose workspace would pass
# QUERY_WORKSPACE_BYTES runs in chunks of rows, each an attention of its own over the keys its rows
# see. Each chunk reads (and in the fused input kernels normalizes) the keys again, so chunks stay
# large: 4096 rows cost that decoder 13% more time than one pass, 1024 rows 48%.
QUERY_WORKSPACE_BYTES = 256 * 2**20


def _query_chunks(queries: int, keys: int, causal: bool, tiling, dim_qk: int, dim_v: int,
                  operand_bytes: int = 4) -> list[tuple[slice, int]]:
    """(rows, keys seen) per chunk, the last rows first (they see every key); one chunk when the
    workspace fits. tiling[3], when given and positive, sets the rows per chunk (tests). Bottom-right
    causal alignment: row i sees key j iff j <= i + keys - queries."""
    if len(tiling) > 3 and tiling[3] > 0:
        chunk = tiling[3]
    else:
        workers = tiling[2] if len(tiling) > 2 and tiling[2] > 0 else torch.get_num_threads()
        chunk = max(4096, QUERY_WORKSPACE_BYTES // (workers * operand_bytes * (dim_qk + 2 * dim_v + 4)))
    return [(slice(start, min(start + chunk, queries)),
             max(0, min(keys, min(start + chunk, queries) + keys - queries)) if causal else keys)
            for start in reversed(range(0, queries, chunk))]


def _forward_in_chunks(q, chunks, call):
    """out and lse from call(rows, keys seen) per chunk; rows that see no key keep 0 and an lse of -inf."""
    if len(chunks) == 1:
        return call(*chunks[0])
    out = lse = None
    for rows, seen in chunks:
        if not seen:
            continue
        out_rows, lse_rows = call(rows, seen)
        if out is None:  # the first chunk holds the last rows, which see every key
            out = out_rows.new_zeros(*q.shape[:3], out_rows.shape[-1])
            lse = lse_rows.new_full(q.shape[:3], float("-inf"))
        out[:, :, rows], lse[:, :, rows] = out_rows, lse_rows
    return out, lse


def _backward_in_chunks(q, chunks, call, key_axes):
    """dq and the key side's gradients from call(rows, keys seen) -> (dq rows, *gradients) per chunk.
    key_axes[i]: the axis of gradient i that runs over the keys (None: a weight, summed whole); the
    sums run in float32 for bfloat16 (each chunk's gradient is already rounded to bfloat16, and the
    sum once more at the end)."""
    if len(chunks) == 1:
        return call(*chunks[0])
    dq, sums = torch.zeros_like(q), None
    for rows, seen in chunks:
        if not seen:
            continue
        dq_rows, *gradients = call(rows, seen)
        dq[:, :, rows] = dq_rows
        if sums is None:  # the last rows see every key: full-size gradients
            sums = [g.float() if g.dtype == torch.bfloat16 else g.clone() for g in gradients]
            continue
        for total, g, axis in zip(sums, gradients, key_axes):
            if g.numel():
                (total if axis is None else total.narrow(axis, 0, seen)).add_(g)
    return (dq, *(total.to(q.dtype) for total in sums))


def _loops(tiling, dropout_p, dropout_seed, rows: slice) -> dict:
    """The kernels' keyword arguments after `scale`: loop sizes, and the dropout of a chunk of rows
    (its mask indexed by the rows' positions in the whole problem)."""
    key_tile, row_block, workers = (list(tiling[:3]) + [0, 0, 0])[:3]
    return dict(key_tile=key_tile, row_block=row_block, workers=workers, dropout_p=dropout_p,
                dropout_seed=dropout_seed, row_offset=rows.start or 0)


# The ops' arguments less the kernel name (and `kind`, which picks Triton tiles); `tiling` is
# (key_tile, row_block, workers[, query_chunk]).
def _forward(q, k, v, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    kernel = extension.require().cpu_attention_forward
    split = _split_products(q)
    chunks = _query_chunks(q.shape[2], k.shape[2], causal, tiling, q.shape[-1], v.shape[-1], 6 if split else 4)
    return _forward_in_chunks(q, chunks, lambda rows, seen: kernel(
        q[:, :, rows], k[:, :, :seen], v[:, :, :seen], None if key_mask is None else key_mask[:, :seen], causal,
        scale, **_loops(tiling, dropout_p, dropout_seed, rows), split_bf16=split))


def _backward(dout, q, k, v, out, lse, key_mask, causal, scale, dropout_p, dropout_seed, kind, tiling):
    kernel = extension.require().cpu_attention_backward
    split = _split_products(q)
    chunks = _query_chunks(q.shape[2], k.shape[2], causal, tiling, q.shape[-1], v.shape[-1], 6 if split else 4)
    return _backward_in_chunks(q, chunks, lambda rows, seen: kernel(
        dout[:, :, rows], q[:, :, rows], k[:, :, :seen], v[:, :, :seen], out[:, :, rows], lse[:, :, rows],
        None if key_mask is None else key_mask[:, :seen], causal, scale,
        **_loops(tiling, dropout_p, dropout_seed, rows), split_bf16=split), key_axes=(2, 2))


def _value_dim(q, x, v_weight) -> int:
    """The fused input kernels' value width per head: the projection's, or x's channels (shortcut)."""
    return x.shape[-1] if v_weight is None else v_weight.shape[0] // q.shape[1]


def _input_forward(q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, key_mask, causal, scale, dropout_p,
                   dropout_seed, tiling):
    kernel = extension.require().cpu_input_attention_forward
    chunks = _query_chunks(q.shape[2], x.shape[1], causal, tiling, q.shape[-1], _value_dim(q, x, v_weight))
    return _forward_in_chunks(q, chunks, lambda rows, seen: kernel(
        q[:, :, rows], x[:, :seen], normalize, eps, k_weight, k_bias, v_weight, v_bias,
        None if key_mask is None else key_mask[:, :seen], causal, scale,
        **_loops(tiling, dropout_p, dropout_seed, rows)))


def _input_backward(dout, q, x, normalize, eps, k_weight, k_bias, v_weight, v_bias, out, lse, key_mask, causal, scale,
                    dropout_p, dropout_seed, tiling):
    kernel = extension.require().cpu_input_attention_backward
    chunks = _query_chunks(q.shape[2], x.shape[1], causal, tiling, q.shape[-1], _value_dim(q, x, v_weight))
    return _backward_in_chunks(q, chunks, lambda rows, seen: kernel(
        dout[:, :, rows], q[:, :, rows], x[:, :seen], normalize, eps, k_weight, k_bias, v_weight, v_bias,
        out[:, :, rows], lse[:, :, rows], None if key_mask is None else key_mask[:, :seen], causal, scale,
        **_loops(tiling, dropout_p, dropout_seed, rows)), key_axes=(1, None, None, None, None))


attention.KERNELS.register(CpuBackend.name, _honouring_float32_precision(_forward),
                           _honouring_float32_precision(_backward, lse_position=5))
linear.KERNELS.register(CpuBackend.name, cpu_linear.forward, cpu_linear.backward)
input_attention.KERNELS.register(CpuBackend.name, _honouring_float32_precision(_input_forward, fused=True),
                                 _honouring_float32_precision(_input_backward, lse_position=10, fused=True))
