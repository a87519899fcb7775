// Fused input attention of a Perceiver cross-attention layer: the queries attend over an input x
// (B, M, C) that is layer-normalised and projected to K and V tile by tile, so nothing of size
// M x d is ever stored. LayerNorm here has no affine part: the caller folds gamma and beta into
// the projection (W diag(gamma), b + W beta).
//
// Two ways to get K and V of a tile from xn (the tile of normalised x, rows x C):
//   projection: K = xn Wk^T + bk and V = xn Wv^T + bv, one GEMM each for all heads at once;
//   shortcut:   K = V = xn, shared by every head (Wk is null). The caller has folded Wk into the
//               queries (q Wk_h, the key bias cancels in the softmax) and applies Wv after.
// The shortcut costs 4 N M C FLOPs per head against 2 M C (Dqk + Dv) + 2 N M (Dqk + Dv) for the
// projection; the caller picks (perceiver_fast/input_attention.py).
#pragma once

#include <cstdint>

#include "attention.h"

namespace perceiver_fast::cpu {

template <typename T>
struct InputAttentionInputs {
  // dim_qk and dim_v per head as the attention sees them (both C for the shortcut).
  Shape shape;
  Strided<const T> q;
  const T* x;  // (batch, keys, channels), rows x_row_stride apart, contiguous channels
  int64_t x_batch_stride, x_row_stride, channels;
  bool normalize;  // false: xn = x
  double eps;
  // (heads * dim_qk, channels) / (heads * dim_qk), (heads * dim_v, channels) / (heads * dim_v), all
  // contiguous; k_weight null for the shortcut (then the others are null too).
  const T *k_weight, *k_bias, *v_weight, *v_bias;
  const bool* key_mask;  // (batch, keys) contiguous, or null
  bool causal;
  double scale;
  Tiling tiling;
  Dropout dropout;  // of the attention probabilities (inactive: none)

  bool shortcut() const { return k_weight == nullptr; }
};

// out (B, H, N, Dv) and lse (B, H, N) float32, both contiguous.
template <typename T>
void input_attention_forward(const InputAttentionInputs<T>& in, T* out, float* lse);

// Gradients: dq (B, H, N, Dqk) and dx (B, M, C) contiguous; with the projection also
// dk_weight, dk_bias, dv_weight, dv_bias shaped as their weights (null for the shortcut). dx and
// the projection gradients must be zero-filled.
template <typename T>
struct InputAttentionGrads {
  T *dq, *dx, *dk_weight, *dk_bias, *dv_weight, *dv_bias;
};

template <typename T>
void input_attention_backward(const InputAttentionInputs<T>& in, Strided<const T> dout, const T* out,
                              const float* lse, const InputAttentionGrads<T>& grads);

}  // namespace perceiver_fast::cpu
