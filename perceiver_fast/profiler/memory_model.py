"""Predicted peak memory of a Perceiver's inference forward, from the tensors alive at once.

With e the element size, B the batch, M inputs of C channels (after preprocessing), N latents of
width D, one cross-attention of H heads (dims dqk, dv) and latent self-attention of Hs heads, the
peak above the model's weights and its raw input is the largest of these stages, plus W:

  preprocessing          2 B M C e        the input x and the pieces it is concatenated from
                                          (position features, the reshaped raw input)
  cross-attention        unpatched: B e (2 M C + M H (dqk + dv) + 2 H N M)
                                          x, LayerNorm(x), K, V, and two N x M score tensors
                                          (scores and probabilities)
                         patched:   B M C e + 2 B H N C e
                                          x, and the fused kernel's folded queries and output
  latent self-attention  B M C e + B e (2 Hs N^2 + 7 N D)
                                          x (the HF model keeps it to the end), two N x N score
                                          tensors per head, and seven N x D activations (hidden
                                          state, its LayerNorm, q, k, v, context, its copy)
  decoder (MLM)          B M C e + B e Q (8 Cq + 2 Hd N + V), with Q = M queries of Cq channels,
                                          Hd heads and V outputs (the vocabulary): eight Q x Cq
                                          activations (query, its LayerNorm, context, output
                                          projection, residual, the MLP's LayerNorm, hidden and
                                          activation), two Q x N score tensors per head
                                          (unpatched only) and the logits
  W = 16 MiB                              runtime workspace (threads, GEMM library buffers),
                                          measured on the 2-core CPU at M = 1024

The terms were checked against measured peaks of HF PerceiverForImageClassificationFourier on
the CPU (tests/test_profiler.py): at B = 2, M = 50176 in float32 the formula gives 808 MiB
unpatched (measured 827) and 216 MiB patched (measured 199); and of HF PerceiverForMaskedLM at
B = 2, M = 2048: 192 MiB unpatched (measured 180) and 128 MiB patched (measured 125). Forward
only: training peaks (saved activations, gradients) are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

WORKSPACE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class ModelShape:
    batch: int
    inputs: int
    channels: int
    raw_channels: int
    latents: int
    latent_dim: int
    cross_heads: int
    cross_qk: int
    cross_v: int
    self_heads: int
    self_layers: int
    element_bytes: int
    decoder_queries: int = 0   # queries of a decoder that outputs per input (MLM); 0: a small decoder
    decoder_channels: int = 0  # their channels
    decoder_heads: int = 0
    decoder_dim: int = 0       # that decoder's output width (vocabulary)


def stage_bytes(s: ModelShape, patched: bool) -> dict[str, int]:
    """The live bytes of each stage of the forward (see the module docstring)."""
    B, M, C, N, D, e = s.batch, s.inputs, s.channels, s.latents, s.latent_dim, s.element_bytes
    H, dqk, dv = s.cross_heads, s.cross_qk, s.cross_v
    x = B * M * C * e
    stages = {"preprocessing": 2 * x}
    if patched:
        stages["cross-attention"] = x + 2 * B * H * N * C * e
    else:
        stages["cross-attention"] = B * e * (2 * M * C + M * H * (dqk + dv) + 2 * H * N * M)
    stages["latent self-attention"] = x + B * e * (2 * s.self_heads * N * N + 7 * N * D)
    if s.decoder_queries:
        Q, scores = s.decoder_queries, 0 if patched else 2 * s.decoder_heads * N
        stages["decoder"] = x + B * e * Q * (8 * s.decoder_channels + scores + s.decoder_dim)
    return stages


def predicted_peak_bytes(shape: ModelShape, patched: bool) -> int:
    """Peak memory of one inference forward above the weights and the raw input (module docstring)."""
    return max(stage_bytes(shape, patched).values()) + WORKSPACE_BYTES


def largest_input(shape_at: Callable[[int], ModelShape], fixed_bytes: int, budget: int, patched: bool,
                  length_of: Callable[[int], int] = lambda k: k, limit: int = 1 << 31) -> int | None:
    """The largest input length length_of(k) (k = 1, 2, ...) whose predicted peak plus fixed_bytes
    (weights) plus the raw input fits in budget; None when not even the first does.

    length_of maps a step to an input length (hf-vision-fourier: k -> k^2, square images)."""

    def fits(k: int) -> bool:
        shape = shape_at(length_of(k))
        raw_input = shape.batch * shape.inputs * shape.raw_channels * shape.element_bytes
        return fixed_bytes + raw_input + predicted_peak_bytes(shape, patched) <= budget

    if not fits(1):
        return None
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return length_of(low)


def with_inputs(shape: ModelShape, length: int) -> ModelShape:
    """shape at another input length (an MLM decoder has one query per input)."""
    return replace(shape, inputs=length, decoder_queries=length if shape.decoder_queries else 0)
