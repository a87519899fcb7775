// Backward, FlashAttention-2's way: delta = rowsum(dO * O) first; then one block per (key block,
// head-dim chunk, batch x head) walks the query blocks that see its 64 keys. Per query block it
// recomputes S = Q K^T and dP = dO V^T over the full head dims (staged in chunks of 64), forms
// P = exp2(S scale log2e - lse log2e) and dS = P (dP - delta) scale, and accumulates its chunk of
// dV += P^T dO and dK += dS^T Q in registers (four warps own 16 keys each), adding its chunk of
// dQ = dS K to an fp32 buffer with atomics. Head dims above 64 recompute S and dP once per chunk:
// simple, and free at the common head dims of 64 and below.
#include <mma.h>

#include <cmath>

#include "attention.cuh"
#include "tiles.cuh"

namespace perceiver_fast::cuda {
namespace {

using namespace nvcuda;

constexpr int kScoreLd = kBlockKeys + 4;
static_assert(kBlockQueries == 64 && kBlockKeys == 64 && kDimChunk == 64,
              "the staging and the warps' 16-row slices assume 64 x 64 tiles");

struct BackwardShared {
  static constexpr size_t tile = sizeof(uint16_t) * 64 * kTileLd;
  static constexpr size_t q = 0, k = q + tile, v = k + tile, dout = v + tile, p = dout + tile, ds = p + tile;
  static constexpr size_t s = ds + tile;                                   // fp32 S, then dQ's staging
  static constexpr size_t dp = s + sizeof(float) * 64 * kScoreLd;          // fp32 dP
  static constexpr size_t stats = dp + sizeof(float) * 64 * kScoreLd;      // lse2 and delta of the rows
  static constexpr size_t bytes = stats + sizeof(float) * 2 * 64;
};

// One warp per query row: delta = sum_d dO * O in fp32.
template <typename T>
__global__ void delta_kernel(AttentionBackwardParams p) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.queries;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int64_t bh = row / p.queries, i = row % p.queries;
  const T* o = static_cast<const T*>(p.out) + row * p.dim_v;
  const T* d = static_cast<const T*>(p.dout) + (bh / p.heads) * p.dout_stride[0] + (bh % p.heads) * p.dout_stride[1] +
               i * p.dout_stride[2];
  float acc = 0.f;
  for (int c = lane; c < p.dim_v; c += 32) acc += to_float(o[c]) * to_float(d[c]);
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) p.delta[row] = acc;
}

// acc[j] (16 x 16, j = 0..3) += A B over 64 of depth: A's 16 rows start at `a` (row- or column-major
// with leading dimension kTileLd), B (64 x 64 row-major, kTileLd) at `b`.
template <typename T, typename ALayout>
__device__ void multiply_accumulate(Accumulator (&acc)[4], const T* a, int a_depth_step, const T* b) {
  for (int kk = 0; kk < 64; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> af;
    wmma::load_matrix_sync(af, a + kk * a_depth_step, kTileLd);
    for (int j = 0; j < 4; ++j) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
      wmma::load_matrix_sync(bf, b + kk * kTileLd + j * 16, kTileLd);
      wmma::mma_sync(acc[j], af, bf, acc[j]);
    }
  }
}

template <typename T>
__device__ void attention_backward_block(AttentionBackwardParams p) {
  extern __shared__ __align__(32) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem + BackwardShared::q);
  T* k_s = reinterpret_cast<T*>(smem + BackwardShared::k);
  T* v_s = reinterpret_cast<T*>(smem + BackwardShared::v);
  T* do_s = reinterpret_cast<T*>(smem + BackwardShared::dout);
  T* p_s = reinterpret_cast<T*>(smem + BackwardShared::p);
  T* ds_s = reinterpret_cast<T*>(smem + BackwardShared::ds);
  float* s_s = reinterpret_cast<float*>(smem + BackwardShared::s);
  float* dp_s = reinterpret_cast<float*>(smem + BackwardShared::dp);
  float* lse2_s = reinterpret_cast<float*>(smem + BackwardShared::stats);
  float* delta_s = lse2_s + 64;

  const int dqk_chunks = (p.dim_qk + kDimChunk - 1) / kDimChunk, dv_chunks = (p.dim_v + kDimChunk - 1) / kDimChunk;
  const int chunks = max(dqk_chunks, dv_chunks);
  // Blocks in x only (gridDim.y and z stop at 65535): (batch x head, key block, chunk), chunk fastest.
  const int key_blocks = (p.keys + kBlockKeys - 1) / kBlockKeys;
  const int64_t block = blockIdx.x;
  const int chunk = static_cast<int>(block % chunks), c0 = chunk * kDimChunk;
  const int key0 = static_cast<int>(block / chunks % key_blocks) * kBlockKeys;
  const int bh = static_cast<int>(block / chunks / key_blocks), b = bh / p.heads, h = bh % p.heads;
  const bool with_dk = chunk < dqk_chunks, with_dv = chunk < dv_chunks;  // dP and dS serve dK and dQ only
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int shift_causal = p.keys - p.queries;
  const float scale_log2 = p.scale * kLog2e;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_stride[0] + h * p.dout_stride[1];
  const bool* mask = p.key_mask ? p.key_mask + static_cast<int64_t>(b) * p.keys : nullptr;
  const int64_t head_row0 = static_cast<int64_t>(bh) * p.queries;

  Accumulator dk_acc[4], dv_acc[4];
  for (int j = 0; j < 4; ++j) {
    wmma::fill_fragment(dk_acc[j], 0.f);
    wmma::fill_fragment(dv_acc[j], 0.f);
  }

  // Bottom-right causal: row i sees key j iff j <= i + shift; the first row seeing key0.
  const int first_row = p.causal ? max(0, key0 - shift_causal) : 0;
  for (int q0 = first_row / kBlockQueries * kBlockQueries; q0 < p.queries; q0 += kBlockQueries) {
    __syncthreads();  // the previous query block is done with every buffer
    for (int r = threadIdx.x; r < 64; r += kThreads) {
      const int row = q0 + r;
      lse2_s[r] = row < p.queries ? p.lse[head_row0 + row] * kLog2e : -INFINITY;
      delta_s[r] = row < p.queries ? p.delta[head_row0 + row] : 0.f;
    }
    Accumulator acc[4];
    scores(acc, q_s, q, p.q_stride[2], q0, p.queries, k_s, k, p.k_stride[2], key0, p.keys, p.dim_qk, warp);
    for (int j = 0; j < 4; ++j) {
      wmma::store_matrix_sync(s_s + warp * 16 * kScoreLd + j * 16, acc[j], kScoreLd, wmma::mem_row_major);
    }
    if (with_dk) {
      scores(acc, do_s, dout, p.dout_stride[2], q0, p.queries, v_s, v, p.v_stride[2], key0, p.keys, p.dim_v, warp);
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(dp_s + warp * 16 * kScoreLd + j * 16, acc[j], kScoreLd, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // P and dS of the warp's 16 rows; a masked pair, or a row that saw no key (lse = -inf), gives 0
    // (selected, not multiplied: whatever V holds at a masked key never reaches dS).
    for (int i = lane; i < 16 * 64; i += 32) {
      const int r = warp * 16 + i / 64, c = i % 64, row = q0 + r, key = key0 + c;
      const bool allowed = row < p.queries && key < p.keys && (!mask || mask[key]) &&
                           (!p.causal || key <= row + shift_causal) && lse2_s[r] != -INFINITY;
      // p <= 1: recomputed scores may round above the forward's (fminf would drop a NaN). __fmul_rn
      // is never fused into the subtraction: the forward's max took the rounded product.
      const float exponent = __fmul_rn(s_s[r * kScoreLd + c], scale_log2) - lse2_s[r];
      const float prob = allowed ? exp2f(exponent > 0.f ? 0.f : exponent) : 0.f;
      p_s[r * kTileLd + c] = from_float<T>(prob);
      if (with_dk) {
        ds_s[r * kTileLd + c] =
            from_float<T>(allowed ? prob * (dp_s[r * kScoreLd + c] - delta_s[r]) * p.scale : 0.f);
      }
    }
    __syncthreads();  // every warp's P and dS rows, and the chunk's operands below, are read by all warps
    if (with_dk) {
      load_tile(q_s, q, p.q_stride[2], q0, p.queries, c0, p.dim_qk, 64);
      load_tile(k_s, k, p.k_stride[2], key0, p.keys, c0, p.dim_qk, 64);
    }
    if (with_dv) load_tile(do_s, dout, p.dout_stride[2], q0, p.queries, c0, p.dim_v, 64);
    __syncthreads();

    // dV^(chunk) += P^T dO and dK^(chunk) += dS^T Q for the warp's 16 keys: column-major reads of
    // P and dS give their transposes.
    if (with_dv) multiply_accumulate<T, wmma::col_major>(dv_acc, p_s + warp * 16, kTileLd, do_s);
    if (with_dk) {
      multiply_accumulate<T, wmma::col_major>(dk_acc, ds_s + warp * 16, kTileLd, q_s);
      // dQ^(chunk) of the warp's 16 query rows = dS K, staged in s_s (S is consumed) and added.
      for (auto& f : acc) wmma::fill_fragment(f, 0.f);
      multiply_accumulate<T, wmma::row_major>(acc, ds_s + warp * 16 * kTileLd, 1, k_s);
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(s_s + warp * 16 * kScoreLd + j * 16, acc[j], kScoreLd, wmma::mem_row_major);
      }
      __syncwarp();
      for (int i = lane; i < 16 * 64; i += 32) {
        const int r = warp * 16 + i / 64, c = i % 64, row = q0 + r, col = c0 + c;
        if (row < p.queries && col < p.dim_qk) {
          atomicAdd(p.dq_accum + (head_row0 + row) * p.dim_qk + col, s_s[r * kScoreLd + c]);
        }
      }
    }
  }

  // The block's chunk of dK and dV, every one of its keys written (0 where no query saw it).
  __syncthreads();
  for (int j = 0; j < 4; ++j) {
    wmma::store_matrix_sync(s_s + warp * 16 * kScoreLd + j * 16, dk_acc[j], kScoreLd, wmma::mem_row_major);
    wmma::store_matrix_sync(dp_s + warp * 16 * kScoreLd + j * 16, dv_acc[j], kScoreLd, wmma::mem_row_major);
  }
  __syncthreads();
  const int64_t head_key0 = static_cast<int64_t>(bh) * p.keys;
  for (int i = threadIdx.x; i < 64 * 64; i += kThreads) {
    const int r = i / 64, c = i % 64, key = key0 + r;
    if (key >= p.keys) continue;
    if (with_dk && c0 + c < p.dim_qk) {
      static_cast<T*>(p.dk)[(head_key0 + key) * p.dim_qk + c0 + c] = from_float<T>(s_s[r * kScoreLd + c]);
    }
    if (with_dv && c0 + c < p.dim_v) {
      static_cast<T*>(p.dv)[(head_key0 + key) * p.dim_v + c0 + c] = from_float<T>(dp_s[r * kScoreLd + c]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) attention_backward_kernel(AttentionBackwardParams p) {
  if constexpr (wmma_available<T>()) {
    attention_backward_block<T>(p);
  } else {
    __trap();
  }
}

template <typename T>
cudaError_t launch_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads * p.queries;
  delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  const int chunks = (max(p.dim_qk, p.dim_v) + kDimChunk - 1) / kDimChunk;
  const int64_t key_blocks = (p.keys + kBlockKeys - 1) / kBlockKeys;
  const int64_t blocks = key_blocks * chunks * p.batch * p.heads;
  if (blocks > 2147483647) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  cudaError_t status = cudaFuncSetAttribute(attention_backward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(BackwardShared::bytes));
  if (status != cudaSuccess) return status;
  attention_backward_kernel<T><<<grid, kThreads, BackwardShared::bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t attention_backward(const AttentionBackwardParams& p, DType dtype, cudaStream_t stream) {
  if (p.dim_qk < 1 || p.dim_v < 1 || p.dim_qk > 1024 || p.dim_v > 1024 || p.queries < 1 || p.keys < 1) {
    return cudaErrorInvalidValue;
  }
  return dtype == DType::bfloat16 ? launch_backward<__nv_bfloat16>(p, stream) : launch_backward<__half>(p, stream);
}

}  // namespace perceiver_fast::cuda
