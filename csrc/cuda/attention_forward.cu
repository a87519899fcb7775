// Forward: one block per (query block, value-dim chunk, batch x head, key split). Four warps own
// 16 query rows each. Per key tile: S = Q K^T on tensor cores (WMMA 16x16x16, head dims staged in
// chunks of 64, zero-padded, so any size up to 1024 and Dqk != Dv work), an online softmax in
// base 2 over the warp's rows, then O = alpha O + P V with O kept in shared memory (the WMMA
// accumulator layout is opaque, so rescaling by row happens there). Split blocks write fp32
// partial (out, lse) that merge_splits_kernel combines.
#include <mma.h>

#include <cmath>

#include "attention.cuh"
#include "tiles.cuh"

namespace perceiver_fast::cuda {
namespace {

using namespace nvcuda;

constexpr int kScoreLd = kBlockKeys + 4;
constexpr int kOutLd = kDimChunk + 4;

struct SharedLayout {
  static constexpr size_t q = 0;
  static constexpr size_t k = q + sizeof(uint16_t) * kBlockQueries * kTileLd;
  static constexpr size_t v = k + sizeof(uint16_t) * kBlockKeys * kTileLd;
  static constexpr size_t p = v + sizeof(uint16_t) * kBlockKeys * kTileLd;
  static constexpr size_t s = p + sizeof(uint16_t) * kBlockQueries * kTileLd;
  static constexpr size_t o = s + sizeof(float) * kBlockQueries * kScoreLd;
  static constexpr size_t stats = o + sizeof(float) * kBlockQueries * kOutLd;
  static constexpr size_t bytes = stats + sizeof(float) * 3 * kBlockQueries;
};

template <typename T>
__device__ void attention_forward_block(AttentionParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + SharedLayout::q);
  T* k_s = reinterpret_cast<T*>(smem + SharedLayout::k);
  T* v_s = reinterpret_cast<T*>(smem + SharedLayout::v);
  T* p_s = reinterpret_cast<T*>(smem + SharedLayout::p);
  float* s_s = reinterpret_cast<float*>(smem + SharedLayout::s);
  float* o_s = reinterpret_cast<float*>(smem + SharedLayout::o);
  float* m_s = reinterpret_cast<float*>(smem + SharedLayout::stats);
  float* l_s = m_s + kBlockQueries;
  float* alpha_s = l_s + kBlockQueries;

  // Blocks in x only (gridDim.y and z stop at 65535): (split, batch x head, query block, value
  // chunk), the value chunk fastest.
  const int dv_chunks = (p.dim_v + kDimChunk - 1) / kDimChunk;
  const int n_blocks = (p.queries + kBlockQueries - 1) / kBlockQueries;
  const int64_t block = blockIdx.x;
  const int dv0 = static_cast<int>(block % dv_chunks) * kDimChunk;
  const int n_block = static_cast<int>(block / dv_chunks % n_blocks);
  const int64_t outer = block / dv_chunks / n_blocks;
  const int bh = static_cast<int>(outer % (static_cast<int64_t>(p.batch) * p.heads)), b = bh / p.heads,
            h = bh % p.heads, split = static_cast<int>(outer / (static_cast<int64_t>(p.batch) * p.heads));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = n_block * kBlockQueries;
  const int shift_causal = p.keys - p.queries;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const bool* mask = p.key_mask ? p.key_mask + static_cast<int64_t>(b) * p.keys : nullptr;

  for (int i = threadIdx.x; i < kBlockQueries * kOutLd; i += kThreads) o_s[i] = 0.f;
  for (int i = threadIdx.x; i < kBlockQueries; i += kThreads) {
    m_s[i] = -INFINITY;
    l_s[i] = 0.f;
  }

  const int lo = split * p.keys_per_split;
  int hi = min(lo + p.keys_per_split, p.keys);
  if (p.causal) hi = min(hi, row0 + kBlockQueries + shift_causal);
  const float scale_log2 = p.scale * kLog2e;

  for (int kt = lo; kt < hi; kt += kBlockKeys) {
    // S = Q K^T for the warp's 16 rows and the tile's 64 keys.
    Accumulator s_frag[kBlockKeys / 16];
    scores(s_frag, q_s, q, p.q_stride[2], row0, p.queries, k_s, k, p.k_stride[2], kt, hi, p.dim_qk, warp);
    for (int j = 0; j < kBlockKeys / 16; ++j) {
      wmma::store_matrix_sync(s_s + warp * 16 * kScoreLd + j * 16, s_frag[j], kScoreLd, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax: two lanes per row, 32 keys each.
    {
      const int r = warp * 16 + lane / 2, half = lane % 2, row = row0 + r;
      float* s_row = s_s + r * kScoreLd;
      float tile_max = -INFINITY;
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const int key = kt + c;
        const bool allowed = row < p.queries && key < hi && (!mask || mask[key]) &&
                             (!p.causal || key <= row + shift_causal);
        const float x = allowed ? s_row[c] * scale_log2 : -INFINITY;
        s_row[c] = x;
        tile_max = max_keeping_nan(tile_max, x);
      }
      tile_max = max_keeping_nan(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      const float m_old = m_s[r], m_new = max_keeping_nan(m_old, tile_max);
      // Rows that have seen no key keep m = -inf; shifting them by 0 gives exp2(-inf) = 0, not NaN.
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      float sum = 0.f;
      for (int c = half * 32; c < half * 32 + 32; ++c) {
        const float e = exp2f(s_row[c] - shift);
        p_s[r * kTileLd + c] = from_float<T>(e);
        sum += e;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      __syncwarp();
      if (half == 0) {
        const float alpha = exp2f(m_old - shift);
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncwarp();
    for (int i = lane; i < 16 * kDimChunk; i += 32) {
      const int r = warp * 16 + i / kDimChunk;
      o_s[r * kOutLd + i % kDimChunk] *= alpha_s[r];
    }

    // O += P V for the value-dim chunk of this block.
    __syncthreads();
    load_tile(v_s, v, p.v_stride[2], kt, hi, dv0, p.dim_v, kBlockKeys);
    __syncthreads();
    for (int j = 0; j < kDimChunk / 16; ++j) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o_frag;
      float* o_tile = o_s + warp * 16 * kOutLd + j * 16;
      wmma::load_matrix_sync(o_frag, o_tile, kOutLd, wmma::mem_row_major);
      for (int kk = 0; kk < kBlockKeys; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
        wmma::load_matrix_sync(a, p_s + warp * 16 * kTileLd + kk, kTileLd);
        wmma::load_matrix_sync(bv, v_s + kk * kTileLd + j * 16, kTileLd);
        wmma::mma_sync(o_frag, a, bv, o_frag);
      }
      wmma::store_matrix_sync(o_tile, o_frag, kOutLd, wmma::mem_row_major);
    }
  }
  __syncthreads();

  // out = O / l (0 for a row with no key), lse = (m + log2 l) ln 2 (-inf for a row with no key).
  const int64_t head_row0 = static_cast<int64_t>(bh) * p.queries;
  for (int i = threadIdx.x; i < kBlockQueries * kDimChunk; i += kThreads) {
    const int r = i / kDimChunk, c = i % kDimChunk, row = row0 + r, col = dv0 + c;
    if (row >= p.queries || col >= p.dim_v) continue;
    const float l = l_s[r];
    const float value = l != 0.f ? o_s[r * kOutLd + c] / l : 0.f;  // a NaN l (a NaN score) gives NaN
    const int64_t at = (head_row0 + row) * p.dim_v + col;
    if (p.splits > 1) {
      p.part_out[static_cast<int64_t>(split) * p.batch * p.heads * p.queries * p.dim_v + at] = value;
    } else {
      static_cast<T*>(p.out)[at] = from_float<T>(value);
    }
  }
  if (dv0 == 0) {
    for (int r = threadIdx.x; r < kBlockQueries; r += kThreads) {
      const int row = row0 + r;
      if (row >= p.queries) continue;
      const float l = l_s[r];
      const float lse = l != 0.f ? (m_s[r] + log2f(l)) * 0.6931471805599453f : -INFINITY;
      if (p.splits > 1) {
        p.part_lse[static_cast<int64_t>(split) * p.batch * p.heads * p.queries + head_row0 + row] = lse;
      } else {
        p.lse[head_row0 + row] = lse;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(AttentionParams p) {
  if constexpr (wmma_available<T>()) {
    attention_forward_block<T>(p);
  } else {
    __trap();
  }
}

// out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse); one block per query row.
template <typename T>
__global__ void merge_splits_kernel(AttentionParams p) {
  const int64_t row = blockIdx.x;  // flattened (batch, head, query)
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.queries;
  float top = -INFINITY;
  for (int s = 0; s < p.splits; ++s) top = max_keeping_nan(top, p.part_lse[s * rows + row]);
  const float shift = top == -INFINITY ? 0.f : top;
  float total = 0.f;
  for (int s = 0; s < p.splits; ++s) total += expf(p.part_lse[s * rows + row] - shift);
  for (int c = threadIdx.x; c < p.dim_v; c += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < p.splits; ++s) {
      acc += expf(p.part_lse[s * rows + row] - shift) * p.part_out[(s * rows + row) * p.dim_v + c];
    }
    static_cast<T*>(p.out)[row * p.dim_v + c] = from_float<T>(total != 0.f ? acc / total : 0.f);
  }
  if (threadIdx.x == 0) p.lse[row] = total != 0.f ? shift + logf(total) : -INFINITY;
}

template <typename T>
cudaError_t launch(const AttentionParams& p, cudaStream_t stream) {
  const int64_t dv_chunks = (p.dim_v + kDimChunk - 1) / kDimChunk;
  const int64_t n_blocks = (p.queries + kBlockQueries - 1) / kBlockQueries;
  const int64_t blocks = n_blocks * dv_chunks * p.batch * p.heads * p.splits;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  cudaError_t status = cudaFuncSetAttribute(attention_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(SharedLayout::bytes));
  if (status != cudaSuccess) return status;
  attention_forward_kernel<T><<<grid, kThreads, SharedLayout::bytes, stream>>>(p);
  if (p.splits > 1) {
    merge_splits_kernel<T><<<static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * p.queries), 128, 0,
                             stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_forward(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim_qk < 1 || p.dim_v < 1 || p.dim_qk > 1024 || p.dim_v > 1024 || p.splits < 1 ||
      p.keys_per_split % kBlockKeys != 0) {
    return cudaErrorInvalidValue;
  }
  return dtype == DType::bfloat16 ? launch<__nv_bfloat16>(p, stream) : launch<__half>(p, stream);
}

}  // namespace perceiver_fast::cuda
