// What the forward and backward kernels share: the staging of head-dim chunks of an operand in
// shared memory, in the layout their WMMA loads read, and conversion to the input dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "attention.cuh"

namespace perceiver_fast::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;  // 16-byte row padding of the half-precision tiles (WMMA ldm multiple of 8)
constexpr int kTileLd = kDimChunk + kPad;
constexpr float kLog2e = 1.4426950408889634f;

// Whether this compilation has WMMA fragments of T: bfloat16 ones need sm_80. Below it a bfloat16
// kernel compiles to a trap; the cuda backend refuses bfloat16 on such a GPU before any launch.
template <typename T>
__host__ __device__ constexpr bool wmma_available() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return !std::is_same_v<T, __nv_bfloat16>;
#else
  return true;
#endif
}

template <typename T>
__device__ T from_float(float x);
template <>
__device__ inline __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

// The larger of a and b, NaN where either is (fmaxf drops a NaN: a NaN score must reach its row).
__device__ inline float max_keeping_nan(float a, float b) { return a != a || b != b ? NAN : fmaxf(a, b); }

__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// rows x kDimChunk tile of a (rows, dim) operand into shared memory (rows kTileLd apart), zeros
// outside it.
template <typename T>
__device__ void load_tile(T* dst, const T* src, int64_t row_stride, int row0, int rows_total, int col0,
                          int cols_total, int rows) {
  for (int i = threadIdx.x; i < rows * kDimChunk; i += kThreads) {
    const int r = i / kDimChunk, c = i % kDimChunk;
    const int row = row0 + r, col = col0 + c;
    dst[r * kTileLd + c] = (row < rows_total && col < cols_total) ? src[row * row_stride + col] : from_float<T>(0.f);
  }
}

using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;

// acc[j] = the warp's 16 rows x 64 keys of X Y^T over the full head dim: X (64 query rows from q0,
// of `queries`) and Y (64 keys from key0, of `keys`) staged chunk by chunk through x_s and y_s.
template <typename T>
__device__ void scores(Accumulator (&acc)[4], T* x_s, const T* x, int64_t x_row_stride, int q0, int queries, T* y_s,
                       const T* y, int64_t y_row_stride, int key0, int keys, int dim, int warp) {
  for (auto& f : acc) nvcuda::wmma::fill_fragment(f, 0.f);
  for (int d0 = 0; d0 < dim; d0 += kDimChunk) {
    __syncthreads();
    load_tile(x_s, x, x_row_stride, q0, queries, d0, dim, 64);
    load_tile(y_s, y, y_row_stride, key0, keys, d0, dim, 64);
    __syncthreads();
    for (int kk = 0; kk < kDimChunk; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major> af;
      nvcuda::wmma::load_matrix_sync(af, x_s + warp * 16 * kTileLd + kk, kTileLd);
      for (int j = 0; j < 4; ++j) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major> bf;  // Y^T
        nvcuda::wmma::load_matrix_sync(bf, y_s + j * 16 * kTileLd + kk, kTileLd);
        nvcuda::wmma::mma_sync(acc[j], af, bf, acc[j]);
      }
    }
  }
}

}  // namespace perceiver_fast::cuda
