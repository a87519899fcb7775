// What the forward and backward kernels share: the staging of head-dim chunks of an operand in
// shared memory, in the layout their WMMA loads read, and conversion to the input dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention.cuh"

namespace perceiver_fast::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;  // 16-byte row padding of the half-precision tiles (WMMA ldm multiple of 8)
constexpr int kTileLd = kDimChunk + kPad;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ T from_float(float x);
template <>
__device__ inline __half from_float(float x) { return __float2half_rn(x); }
template <>
__device__ inline __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }

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

}  // namespace perceiver_fast::cuda
