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
  latent self-attention  B M C e + B e (2 Hs N^2 [unpatched] + 7 N D)
                                          x (the HF model keeps it to the end), two N x N score
                                          tensors per head (unpatched only), and seven N x D
                                          activations (hidden state, its LayerNorm, q, k, v,
                                          context, its copy)
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
B = 2, M = 2048: 192 MiB unpatched (measured 180) and 128 MiB patched (measured 125).

Training (one step: forward, backward of the summed output, optional optimizer step). The peak
above the weights, the optimizer state and the raw input is the largest of these stages, plus W.
With Hs heads over L latent layers run per forward (blocks x layers per block), MLPs of widening
w, cross-attention totals qk = H dqk and v = H dv, a layer's tail T = N D (2 + 2w) (the
LayerNorm input before its MLP, and the MLP's input, hidden and activation), the forward saves
for the backward, per batch item and element:

  input cross-attention  unpatched: M (2 C + qk + v) + H N M + N (D + qk + v) + T
                                          x and LayerNorm(x), K, V, the N x M probabilities, the
                                          latents' LayerNorm, q, the context
                         patched:   M C + N (D + 2 H C + 2 v) + T, and once per call (not per
                                          batch item) H C (D + dqk + dv)
                                          x only on the M side (the kernel recomputes LayerNorm(x),
                                          K and V), the folded queries and the output; the per-head
                                          weights the kernel folds
  latent layers          L (Hs N^2 + 6 N D + T) unpatched, L (7 N D + T) patched
                                          (probabilities, q, k, v, context, the LayerNorm output
                                          and its input; patched: q, k, v, the output, the output's
                                          copy for the dense layer, LayerNorm output and input)
  decoder (Q queries of Cq channels, Hd heads of dqk_d / dv_d, qk_d = Hd dqk_d, v_d = Hd dv_d)
                         unpatched: Q (6 Cq + qk_d + v_d + Hd N) + N (2 D + qk_d + v_d)
                         patched:   Q (6 Cq + qk_d + v_d (2 if Hd > 1 else 1)) + 2 N D
                         a small decoder (Q = 0 here): 4 N D

and, with S the sum of those (times B e), P_part the bytes of a part's parameters (their gradients
once the backward reaches the part) and G all of them, the stages are (the transients below per
batch item and element too, times B e)

  forward end                 S + the logits
  decoder backward            S + P_decoder + 2 logits + 2 Hd Q N (unpatched: dP, dS)
  latent backward, first      S - S_decoder + P_decoder + (2 Hs N^2 [unpatched] + 4 N D)
  latent backward, last       S_cross + G - P_input - P_cross + (2 Hs N^2 [unpatched] + 4 N D)
                                          the latent stack's activations freed, its gradients made
  cross-attention backward    S_cross + G + M C + H N M [unpatched]
                                          d LayerNorm(x) (unpatched also one N x M gradient at a
                                          time: dS takes the place of dP as the probabilities go;
                                          dK and dV replace the K and V they free)
  optimizer step (--optimizer) G          torch's CPU optimizers step parameter by parameter (on
                                          CUDA its foreach steps add parameter-sized temporaries,
                                          not modelled: the GPU has not been measured)

The optimizer's state (AdamW: two moments per parameter, SGD with momentum: one buffer) lives
from the first step on, like the weights: it is added to the fixed bytes when a budget is
checked, not to the peak. Checked against measured training peaks on the CPU, float32 (unpatched,
patched): hf-vision-fourier at B = 2, M = 50176 and M = 9216 +1% and +1% (AdamW); hf-language at
B = 2, M = 2048 +1% and +5% (AdamW), at M = 512 +3% and +5% (SGD) (tests/test_profiler.py checks
a reduced vision-fourier model within 25%). hf-optical-flow is not covered: its per-pixel decoder's live
tensors depend on its query, key and output widths in ways the MLM decoder's terms above do not
capture, and its patched attention adds the CPU kernels' chunked query workspace (up to 256 MiB,
perceiver_fast/backends/cpu.py); docs/profiler.md says more.
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
    cross_qk: int              # per head
    cross_v: int               # per head
    self_heads: int
    self_layers: int           # latent self-attention layers run per forward (blocks x layers per block)
    element_bytes: int
    widening: int = 1          # the MLPs' hidden width over their input width
    decoder_queries: int = 0   # queries of a decoder that outputs per input (MLM, flow); 0: a small decoder
    decoder_channels: int = 0  # their channels
    decoder_heads: int = 0
    decoder_qk: int = 0        # per head
    decoder_v: int = 0         # per head
    decoder_dim: int = 0       # that decoder's output width (vocabulary, flow channels)


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
    latent_scores = 0 if patched else 2 * s.self_heads * N * N
    stages["latent self-attention"] = x + B * e * (latent_scores + 7 * N * D)
    if s.decoder_queries:
        Q, scores = s.decoder_queries, 0 if patched else 2 * s.decoder_heads * N
        stages["decoder"] = x + B * e * Q * (8 * s.decoder_channels + scores + s.decoder_dim)
    return stages


def predicted_peak_bytes(shape: ModelShape, patched: bool) -> int:
    """Peak memory of one inference forward above the weights and the raw input (module docstring)."""
    return max(stage_bytes(shape, patched).values()) + WORKSPACE_BYTES


def saved_bytes(s: ModelShape, patched: bool) -> dict[str, int]:
    """What the forward keeps for the backward, per part, in bytes (module docstring, training)."""
    B, M, C, N, D, e, W = s.batch, s.inputs, s.channels, s.latents, s.latent_dim, s.element_bytes, s.widening
    H, qk, v = s.cross_heads, s.cross_heads * s.cross_qk, s.cross_heads * s.cross_v
    layer_tail = N * D * (2 + 2 * W)  # the layer's LayerNorm input and its MLP (input, hidden, activation)
    if patched:
        cross = M * C + N * (D + 2 * H * C + 2 * v)
        latent = 7 * N * D
    else:
        cross = M * (2 * C + qk + v) + H * N * M + N * (D + qk + v)
        latent = s.self_heads * N * N + 6 * N * D
    # The fused kernel's per-head weights (q folded into Wk, Wk and Wv split by head), once per call.
    folded_weights = H * C * (D + s.cross_qk + s.cross_v) * e if patched else 0
    saved = {"input cross-attention": B * e * (cross + layer_tail) + folded_weights,
             "latent self-attention": B * e * s.self_layers * (latent + layer_tail)}
    Q, Cq, Hd = s.decoder_queries, s.decoder_channels, s.decoder_heads
    if Q:
        dqk, dv = Hd * s.decoder_qk, Hd * s.decoder_v
        if patched:
            decoder = Q * (6 * Cq + dqk + dv * (2 if Hd > 1 else 1)) + 2 * N * D
        else:
            decoder = Q * (6 * Cq + dqk + dv + Hd * N) + N * (2 * D + dqk + dv)
    else:
        decoder = 4 * N * D
    saved["decoder"] = B * e * decoder
    return saved


def training_stage_bytes(s: ModelShape, patched: bool, parameter_bytes: dict[str, int],
                         optimizer: str | None = None) -> dict[str, int]:
    """The live bytes of each stage of a training step (module docstring, training). parameter_bytes:
    the bytes of the parameters of each part (PARTS) and of the rest ("other"), which their gradients
    take once the backward has reached them."""
    B, M, C, N, D, e = s.batch, s.inputs, s.channels, s.latents, s.latent_dim, s.element_bytes
    H = s.cross_heads
    saved = saved_bytes(s, patched)
    everything = sum(saved.values())
    gradients = sum(parameter_bytes.values())
    decoder_gradients = parameter_bytes.get("decoder", 0)
    encoder_gradients = sum(parameter_bytes.get(part, 0) for part in ("input preprocessing", "input cross-attention"))
    Q, Hd = s.decoder_queries, s.decoder_heads
    logits = B * e * Q * s.decoder_dim
    stages = {"forward end": everything + logits}
    decoder_scores = 0 if patched else 2 * Hd * Q * N
    stages["decoder backward"] = everything + decoder_gradients + 2 * logits + B * e * decoder_scores
    latent_transient = B * e * ((0 if patched else 2 * s.self_heads * N * N) + 4 * N * D)
    stages["latent backward, first layer"] = everything - saved["decoder"] + decoder_gradients + latent_transient
    stages["latent backward, last layer"] = (saved["input cross-attention"] + gradients - encoder_gradients
                                             + latent_transient)
    cross_scores = 0 if patched else H * N * M
    stages["cross-attention backward"] = saved["input cross-attention"] + gradients + B * e * (cross_scores + M * C)
    if optimizer is not None:
        stages["optimizer step"] = gradients  # CPU steps go parameter by parameter: no parameter-sized lists
    return stages


def training_peak_bytes(shape: ModelShape, patched: bool, parameter_bytes: dict[str, int],
                        optimizer: str | None = None) -> int:
    """Peak memory of one training step above the weights, the optimizer state and the raw input."""
    return max(training_stage_bytes(shape, patched, parameter_bytes, optimizer).values()) + WORKSPACE_BYTES


def optimizer_state_bytes(optimizer: str | None, parameter_bytes: int) -> int:
    """AdamW keeps two moments per parameter, SGD with momentum one buffer."""
    return parameter_bytes * {"adamw": 2, "sgd": 1, None: 0}[optimizer]


FixedBytes = int | Callable[[ModelShape], int]


def fits_budget(shape: ModelShape, fixed_bytes: FixedBytes, budget: int, peak_bytes: Callable[[ModelShape], int]) -> bool:
    """Whether peak_bytes(shape) plus fixed_bytes (weights, optimizer state; a function of the shape
    where they grow with the input, as position embeddings do) plus the raw input fit in budget."""
    raw_input = shape.batch * shape.inputs * shape.raw_channels * shape.element_bytes
    fixed = fixed_bytes(shape) if callable(fixed_bytes) else fixed_bytes
    return fixed + raw_input + peak_bytes(shape) <= budget


def _largest_step(fits: Callable[[int], bool], limit: int) -> int | None:
    """The largest k >= 1 with fits(k) (fits falls from true to false as k grows); None when fits(1) fails."""
    if not fits(1):
        return None
    low, high = 1, 2
    while high < limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def largest_input(shape: ModelShape, fixed_bytes: FixedBytes, budget: int, peak_bytes: Callable[[ModelShape], int],
                  length_of: Callable[[int], int] = lambda k: k, limit: int = 1 << 31) -> int | None:
    """The largest input length length_of(k) (k = 1, 2, ...) at shape's batch that fits budget
    (fits_budget); None when not even the first does. length_of maps a step to an input length
    (hf-vision-fourier: k -> k^2, square images)."""
    step = _largest_step(lambda k: fits_budget(with_inputs(shape, length_of(k)), fixed_bytes, budget, peak_bytes),
                         limit)
    return None if step is None else length_of(step)


def largest_batch(shape: ModelShape, fixed_bytes: FixedBytes, budget: int, peak_bytes: Callable[[ModelShape], int],
                  limit: int = 1 << 20) -> int | None:
    """The largest batch at shape's input length that fits budget (fits_budget); None when not even 1 does."""
    return _largest_step(lambda b: fits_budget(replace(shape, batch=b), fixed_bytes, budget, peak_bytes), limit)


def with_inputs(shape: ModelShape, length: int) -> ModelShape:
    """shape at another input length (an MLM decoder has one query per input)."""
    return replace(shape, inputs=length, decoder_queries=length if shape.decoder_queries else 0)
