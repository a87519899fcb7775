// CUDA cross/latent attention forward and backward (bf16/fp16 in, fp32 accumulation, tensor-core
// WMMA).
// Raw pointers, strides and a stream in; no torch: the binding (csrc/cuda_binding.cpp) checks
// inputs, allocates and picks the split count. Every operand has a contiguous last dimension.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace perceiver_fast::cuda {

enum class DType { float16, bfloat16 };

struct AttentionParams {
  const void *q, *k, *v;           // (B, H, N, Dqk), (B, H, M, Dqk), (B, H, M, Dv)
  const bool* key_mask;            // (B, M) contiguous, or null
  void* out;                       // (B, H, N, Dv) contiguous, q's dtype
  float* lse;                      // (B, H, N) contiguous
  float *part_out, *part_lse;      // split workspace (S, B, H, N, Dv) and (S, B, H, N); null when splits == 1
  int64_t q_stride[3], k_stride[3], v_stride[3];  // batch, head, row (elements)
  int batch, heads, queries, keys, dim_qk, dim_v;
  float scale;
  bool causal;      // bottom-right: query i sees key j iff j <= i + keys - queries
  int splits;       // key-axis splits (>= 1), each over keys_per_split keys
  int keys_per_split;
};

// Query rows and keys per block, and the head-dim chunk every tile is staged in.
constexpr int kBlockQueries = 64;
constexpr int kBlockKeys = 64;
constexpr int kDimChunk = 64;

// Launches the forward (and, with splits > 1, the merge of the partial results) on `stream`.
cudaError_t attention_forward(const AttentionParams& p, DType dtype, cudaStream_t stream);

struct AttentionBackwardParams {
  const void *q, *k, *v;           // as the forward's
  const void *out, *dout;          // (B, H, N, Dv): out contiguous (the forward's), dout any row strides
  const float* lse;                // (B, H, N) contiguous, the forward's
  const bool* key_mask;            // (B, M) contiguous, or null
  float* delta;                    // (B, H, N) workspace: rowsum(dout * out)
  float* dq_accum;                 // (B, H, N, Dqk) fp32, zero-filled: dq is summed here over key blocks
  void *dk, *dv;                   // (B, H, M, Dqk), (B, H, M, Dv) contiguous, q's dtype
  int64_t q_stride[3], k_stride[3], v_stride[3], dout_stride[3];  // batch, head, row (elements)
  int batch, heads, queries, keys, dim_qk, dim_v;
  float scale;
  bool causal;
};

// Launches the backward on `stream`: delta, then one block per (key block, head-dim chunk,
// batch x head) writing that chunk of dK and dV and adding its share of dq to dq_accum. The caller
// converts dq_accum to dq.
cudaError_t attention_backward(const AttentionBackwardParams& p, DType dtype, cudaStream_t stream);

}  // namespace perceiver_fast::cuda
