// Fused cross/latent attention on the CPU: forward (out, lse) and backward (dq, dk, dv).
// Raw pointers and strides in, no tensors: the binding (csrc/binding.cpp) checks inputs and
// allocates. Every operand has a contiguous last dimension; outputs are contiguous.
#pragma once

#include <cstdint>

#include "dropout.h"

namespace perceiver_fast::cpu {

// A (batch, heads, rows, cols) operand with a contiguous last dimension.
template <typename T>
struct Strided {
  T* data;
  int64_t batch_stride, head_stride, row_stride;

  T* row(int64_t b, int64_t h, int64_t i) const { return data + b * batch_stride + h * head_stride + i * row_stride; }
};

struct Shape {
  int64_t batch, heads, queries, keys, dim_qk, dim_v;
};

// Loop sizes; zero picks the default. key_tile: keys per streamed K/V tile; row_block: query rows
// per GEMM; workers: parallel work items the key axis is split over (default: the thread count).
struct Tiling {
  int64_t key_tile = 0, row_block = 0, workers = 0;
};

template <typename T>
struct AttentionInputs {
  Shape shape;
  Strided<const T> q, k, v;
  const bool* key_mask;  // (batch, keys) contiguous, or null
  bool causal;
  double scale;
  Tiling tiling;
  Dropout dropout;  // of the attention probabilities (inactive: none)
};

// The GEMM operand type P: by default P = T. Instantiated for T in {float, double, bfloat16} with
// P = T, for float with P = SplitBF16 (float32 inputs under torch's "tf32" precision, tile_gemm.h),
// and for bfloat16 with P = float (CPUs without bfloat16 dot products: tiles widened as packed).
struct SplitBF16;

// out (B, H, N, Dv) and lse (B, H, N) float32, both contiguous.
template <typename T, typename P = T>
void attention_forward(const AttentionInputs<T>& in, T* out, float* lse);

// dout: any strides with a contiguous last dimension; out and lse as the forward wrote them.
// dq, dk, dv contiguous, every element written (0 for keys no query attends).
template <typename T, typename P = T>
void attention_backward(const AttentionInputs<T>& in, Strided<const T> dout, const T* out, const float* lse, T* dq,
                        T* dk, T* dv);

}  // namespace perceiver_fast::cpu
