// The small GEMMs of the attention loops, on oneDNN's brgemm micro-kernels where torch has them.
//
//   C[m x n] (+)= A[m x k] * B[k x n]
//
// A is row-major in the operand type T, C row-major in the accumulator type, and B is in the
// "packed" layout written by pack_rows / pack_transposed: plain row-major (leading dimension n)
// for float and double, VNNI-2 for bfloat16 (pairs of k rows interleaved element by element, k
// padded to even with zeros: the layout the AVX512-BF16 dot instructions read), and for SplitBF16
// the bfloat16 layout of its 3k bfloat16 rows (m, n, k and lda count SplitBF16 elements). Callers pad A's
// k columns the same way (padded_k). Where brgemm cannot run (another CPU, a torch without the
// oneDNN micro-kernels), or for float64, a portable path computes the same products with at::mm.
#pragma once

#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace perceiver_fast::cpu {

// A float32 operand of the "split bfloat16" products (torch's "tf32" float32 matmul precision):
// x = hi + lo with hi = bf16(x), lo = bf16(x - hi), and a * b taken as hi_a hi_b + hi_a lo_b + lo_a hi_b
// (about 16 significant bits; lo_a lo_b, about 2^-18 of the product, is dropped). Written as three
// depth steps of one bfloat16 GEMM: an A operand element holds (hi, hi, lo), and the B packers
// write (hi, lo, hi) for each depth step, so a single brgemm over 3x the depth sums the three terms.
// An infinite or NaN hi gets lo = 0 (not inf - inf). Still, a product with an infinite operand can
// be NaN where float32 gives an infinity (0 x inf in a term whose other factor's lo is 0), and a
// finite x beyond bfloat16's largest value (3.39e38) rounds to an infinite hi.
struct SplitBF16 {
  c10::BFloat16 term[3];

  SplitBF16() : term{c10::BFloat16(0.f), c10::BFloat16(0.f), c10::BFloat16(0.f)} {}
  SplitBF16(float x) {  // NOLINT: the A operand form, converted from float32 like the other types
    const c10::BFloat16 hi(x);
    const float hi_value = static_cast<float>(hi);
    term[0] = term[1] = hi;
    term[2] = c10::BFloat16(std::isfinite(hi_value) ? x - hi_value : 0.f);
  }
};
static_assert(sizeof(SplitBF16) == 3 * sizeof(c10::BFloat16), "SplitBF16 arrays are read as bfloat16 arrays");

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Forces the portable path (tests use it to cover the code other CPUs take).
void set_portable_gemm(bool portable);
bool portable_gemm();

// dst[j] = src[j] in the A operand form of the product type, for j < n (A operands written from
// float32 results).
void convert_row(const float* src, int64_t n, c10::BFloat16* dst);
void convert_row(const float* src, int64_t n, SplitBF16* dst);

// dst[j * rows + i] = src[i * cols + j] in T: a gradient block accumulated transposed (rows x cols,
// fp32 or fp64) written back as cols contiguous rows of `rows` values.
template <typename T>
void store_transposed(const acc_type<T>* src, int64_t rows, int64_t cols, T* dst);

template <typename T>
struct TileGemm {
  using acc_t = acc_type<T>;

  // Whether B is VNNI-packed (bfloat16 on the brgemm path) and k must be padded to even.
  static bool vnni();
  // Whether multiply runs on oneDNN's brgemm (else at::mm).
  static bool brgemm();
  static int64_t padded_k(int64_t k) { return vnni() ? (k + 1) / 2 * 2 : k; }

  // B = src (k_rows x n, source rows `ld` apart), converted to T. Writes padded_k(k_rows) rows.
  template <typename S>
  static void pack_rows(const S* src, int64_t ld, int64_t k_rows, int64_t n, T* dst);

  // B = transpose of src (src is n rows x k, rows `ld` apart). Writes padded_k(k) rows.
  template <typename S>
  static void pack_transposed(const S* src, int64_t ld, int64_t n, int64_t k, T* dst);

  // C (+)= A * B; k must already be padded_k of the true depth.
  static void multiply(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, acc_t* c, int64_t ldc,
                       bool accumulate);

  // Frees the micro-kernel state of the calling thread (AMX tile configuration on CPUs with AMX).
  static void release();
};

}  // namespace perceiver_fast::cpu
