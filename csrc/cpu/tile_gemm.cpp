#include "tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <type_traits>
#include <vector>

#include "pack_avx512.h"
#include "rows_simd.h"
#include "vector_paths.h"

namespace perceiver_fast::cpu {
namespace {

std::atomic<bool> force_portable{false};

template <typename T>
at::ScalarType scalar_type() {
  return c10::CppTypeToScalarType<T>::value;
}

// brgemm exists in every torch we support, but it throws where oneDNN's micro-kernels are not
// built or the CPU lacks the instructions: try it once on a product whose answer is known.
template <typename T>
bool probe_brgemm(bool vnni) {
  try {
    // A = [[1, 2], [3, 4]]; B = [[5, 6], [7, 8]] (VNNI-2 order: 5 7 6 8); A*B = [[19, 22], [43, 50]].
    const T a[4] = {T(1), T(2), T(3), T(4)};
    const T b_plain[4] = {T(5), T(6), T(7), T(8)};
    const T b_vnni[4] = {T(5), T(7), T(6), T(8)};
    float c[4] = {0, 0, 0, 0};
    at::native::cpublas::brgemm(2, 2, 2, 2, 2, 2, false, a, vnni ? b_vnni : b_plain, c, vnni);
    at::native::cpublas::brgemm_release(vnni);
    return c[0] == 19 && c[1] == 22 && c[2] == 43 && c[3] == 50;
  } catch (const std::exception&) {
    return false;
  }
}

// oneDNN's micro-kernels need AVX2 for float32 and bfloat16 dot products (AVX512-BF16 or AMX) for
// bfloat16: the capped level of vector_paths.h decides, so a cap emulates a CPU without them.
template <typename T>
bool brgemm_available() {
  if constexpr (std::is_same_v<T, double>) {
    return false;
  } else {
    static const bool available = probe_brgemm<T>(std::is_same_v<T, c10::BFloat16>);
    const Isa needed = std::is_same_v<T, c10::BFloat16> ? Isa::avx512_bf16 : Isa::simd;
    return available && !force_portable.load() && active_isa() >= needed;
  }
}

// B of the split products: bfloat16 row 3d + t holds term t, in (hi, lo, hi) order, of the float32
// value(d, j) of the k x n matrix, laid out as TileGemm<bfloat16> lays out its B (rows past 3k zero).
template <typename Value>
void pack_split(int64_t k, int64_t n, Value value, SplitBF16* packed) {
  auto* dst = reinterpret_cast<c10::BFloat16*>(packed);
  const bool vnni = TileGemm<c10::BFloat16>::vnni();
  auto element = [&](int64_t r, int64_t j) -> c10::BFloat16& {
    return vnni ? dst[(r / 2) * 2 * n + 2 * j + (r & 1)] : dst[r * n + j];
  };
  for (int64_t d = 0; d < k; ++d) {
    for (int64_t j = 0; j < n; ++j) {
      const SplitBF16 x(value(d, j));  // (hi, hi, lo)
      element(3 * d, j) = x.term[0];
      element(3 * d + 1, j) = x.term[2];
      element(3 * d + 2, j) = x.term[0];
    }
  }
  for (int64_t r = 3 * k; r < 3 * TileGemm<SplitBF16>::padded_k(k); ++r) {
    for (int64_t j = 0; j < n; ++j) element(r, j) = c10::BFloat16(0.f);
  }
}

template <typename T>
void native_multiply(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, acc_type<T>* c,
                     int64_t ldc, bool accumulate) {
  using acc_t = acc_type<T>;
  if constexpr (!std::is_same_v<T, double>) {
    if (brgemm_available<T>()) {
      at::native::cpublas::brgemm(m, n, k, lda, n, ldc, accumulate, a, b, c, TileGemm<T>::vnni());
      return;
    }
  }
  const auto type = scalar_type<T>();
  const auto acc = scalar_type<acc_t>();
  auto a_view = at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, at::TensorOptions().dtype(type)).to(acc);
  auto b_view = at::from_blob(const_cast<T*>(b), {k, n}, {n, 1}, at::TensorOptions().dtype(type)).to(acc);
  auto c_view = at::from_blob(c, {m, n}, {ldc, 1}, at::TensorOptions().dtype(acc));
  if (accumulate) {
    c_view.addmm_(a_view, b_view);
  } else {
    at::mm_out(c_view, a_view, b_view);
  }
}

}  // namespace

void set_portable_gemm(bool portable) { force_portable.store(portable); }
bool portable_gemm() { return force_portable.load(); }

template <typename T>
bool TileGemm<T>::brgemm() {
  if constexpr (std::is_same_v<T, SplitBF16>) {
    return TileGemm<c10::BFloat16>::brgemm();
  } else {
    return brgemm_available<T>();
  }
}

template <typename T>
bool TileGemm<T>::vnni() {
  if constexpr (std::is_same_v<T, SplitBF16>) {
    return TileGemm<c10::BFloat16>::vnni();
  } else {
    return std::is_same_v<T, c10::BFloat16> && brgemm_available<T>();
  }
}

template <typename T>
template <typename S>
void TileGemm<T>::pack_rows(const S* src, int64_t ld, int64_t k_rows, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, SplitBF16>) {
    if (vnni() && use_avx512_rows()) {
      return avx512::pack_rows_split_vnni(src, ld, k_rows, n, reinterpret_cast<uint32_t*>(dst));
    }
    return pack_split(k_rows, n, [&](int64_t d, int64_t j) { return src[d * ld + j]; }, dst);
  }
  if (!vnni()) {
    for (int64_t r = 0; r < k_rows; ++r) {
      for (int64_t j = 0; j < n; ++j) dst[r * n + j] = static_cast<T>(src[r * ld + j]);
    }
    return;
  }
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<S, float>) {
    if (use_avx512_rows()) return avx512::pack_rows_vnni(src, ld, k_rows, n, dst);
  }
  for (int64_t r = 0; r < k_rows; r += 2) {
    const S* even = src + r * ld;
    const S* odd = r + 1 < k_rows ? even + ld : nullptr;
    T* out = dst + r * n;
    for (int64_t j = 0; j < n; ++j) {
      out[2 * j] = static_cast<T>(even[j]);
      out[2 * j + 1] = odd ? static_cast<T>(odd[j]) : T(0);
    }
  }
}

template <typename T>
template <typename S>
void TileGemm<T>::pack_transposed(const S* src, int64_t ld, int64_t n, int64_t k, T* dst) {
  if constexpr (std::is_same_v<T, SplitBF16>) {
    if (vnni() && use_avx512_rows()) {  // transpose in float32, then pack the rows
      std::vector<float> transposed(k * n);
      avx512::transpose_words(src, ld * int64_t(sizeof(float)), n, 2 * k, reinterpret_cast<uint32_t*>(transposed.data()));
      return avx512::pack_rows_split_vnni(transposed.data(), n, k, n, reinterpret_cast<uint32_t*>(dst));
    }
    return pack_split(k, n, [&](int64_t d, int64_t j) { return src[j * ld + d]; }, dst);
  }
  if constexpr (std::is_same_v<T, S> && !std::is_same_v<T, double>) {
    // float32 rows are words; bfloat16 pairs (d, d + 1) are the words of the VNNI-2 layout
    if (use_avx512_rows() && (std::is_same_v<T, float> || vnni())) {
      return avx512::transpose_words(src, ld * int64_t(sizeof(T)), n, k * int64_t(sizeof(T) / 2),
                                     reinterpret_cast<uint32_t*>(dst));
    }
  }
  if constexpr (std::is_same_v<T, float>) {
    if (use_simd_rows()) return simd::transpose(src, ld, n, k, dst);
  }
  if (!vnni()) {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < k; ++d) dst[d * n + j] = static_cast<T>(src[j * ld + d]);
    }
    return;
  }
  // VNNI-2 of the transpose: element pairs (d, d+1) of source row j sit side by side.
  const int64_t k_even = k / 2 * 2;
  for (int64_t j = 0; j < n; ++j) {
    const S* row = src + j * ld;
    for (int64_t d = 0; d < k_even; d += 2) {
      dst[d * n + 2 * j] = static_cast<T>(row[d]);
      dst[d * n + 2 * j + 1] = static_cast<T>(row[d + 1]);
    }
    if (k_even < k) {
      dst[k_even * n + 2 * j] = static_cast<T>(row[k_even]);
      dst[k_even * n + 2 * j + 1] = T(0);
    }
  }
}

void convert_row(const float* src, int64_t n, c10::BFloat16* dst) {
  if (use_avx512_rows()) return avx512::convert_row(src, n, dst);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<c10::BFloat16>(src[j]);
}

void convert_row(const float* src, int64_t n, SplitBF16* dst) {
  if (use_avx512_rows()) return avx512::convert_row_split(src, n, reinterpret_cast<uint16_t*>(dst));
  for (int64_t j = 0; j < n; ++j) dst[j] = SplitBF16(src[j]);
}

template <typename T>
void store_transposed(const acc_type<T>* src, int64_t rows, int64_t cols, T* dst) {
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx512_rows()) {
      if constexpr (std::is_same_v<T, float>) {
        return avx512::transpose_words(src, cols * int64_t(sizeof(float)), rows, 2 * cols,
                                       reinterpret_cast<uint32_t*>(dst));
      } else {  // transposed in float32, then rounded as one contiguous run
        std::vector<float> transposed(rows * cols);
        avx512::transpose_words(src, cols * int64_t(sizeof(float)), rows, 2 * cols,
                                reinterpret_cast<uint32_t*>(transposed.data()));
        return convert_row(transposed.data(), rows * cols, dst);
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (use_simd_rows()) return simd::transpose(src, cols, rows, cols, dst);
    }
  }
  for (int64_t j = 0; j < cols; ++j) {
    for (int64_t i = 0; i < rows; ++i) dst[j * rows + i] = static_cast<T>(src[i * cols + j]);
  }
}

template void store_transposed(const float*, int64_t, int64_t, float*);
template void store_transposed(const double*, int64_t, int64_t, double*);
template void store_transposed(const float*, int64_t, int64_t, c10::BFloat16*);

template <typename T>
void TileGemm<T>::multiply(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, acc_t* c,
                           int64_t ldc, bool accumulate) {
  if constexpr (std::is_same_v<T, SplitBF16>) {  // one bfloat16 GEMM over the 3k terms
    TileGemm<c10::BFloat16>::multiply(m, n, 3 * k, reinterpret_cast<const c10::BFloat16*>(a), 3 * lda,
                                      reinterpret_cast<const c10::BFloat16*>(b), c, ldc, accumulate);
  } else {
    native_multiply(m, n, k, a, lda, b, c, ldc, accumulate);
  }
}

template <typename T>
void TileGemm<T>::release() {
  if constexpr (std::is_same_v<T, SplitBF16>) {
    TileGemm<c10::BFloat16>::release();
  } else {
    if (brgemm_available<T>()) at::native::cpublas::brgemm_release(vnni());
  }
}

template struct TileGemm<float>;
template struct TileGemm<SplitBF16>;
template struct TileGemm<double>;
template struct TileGemm<c10::BFloat16>;

#define PF_PACKERS(T, S)                                                                                  \
  template void TileGemm<T>::pack_rows<S>(const S*, int64_t, int64_t, int64_t, T*);                       \
  template void TileGemm<T>::pack_transposed<S>(const S*, int64_t, int64_t, int64_t, T*);
PF_PACKERS(float, float)
PF_PACKERS(double, double)
PF_PACKERS(c10::BFloat16, c10::BFloat16)
PF_PACKERS(c10::BFloat16, float)
PF_PACKERS(float, c10::BFloat16)
PF_PACKERS(SplitBF16, float)
#undef PF_PACKERS

}  // namespace perceiver_fast::cpu
