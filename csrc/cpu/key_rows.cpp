#include "key_rows.h"

#include <c10/util/BFloat16.h>

#include <type_traits>

#include "key_rows_avx512.h"
#include "rows_simd.h"
#include "vector_paths.h"

namespace perceiver_fast::cpu {

template <typename T>
void dot_rows(const acc_type<T>* q, const T* k, int64_t stride, int64_t count, int64_t dim, acc_type<T>* scores) {
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx512_rows()) return avx512::dot_rows(q, k, stride, count, dim, scores);
    if (use_simd_rows()) return simd::dot_rows(q, k, stride, count, dim, scores);
  }
  for (int64_t j = 0; j < count; ++j) {
    const T* row = k + j * stride;
    acc_type<T> dot = 0;
    for (int64_t d = 0; d < dim; ++d) dot += q[d] * static_cast<acc_type<T>>(row[d]);
    scores[j] = dot;
  }
}

template <typename T>
void accumulate_rows(const acc_type<T>* p, const T* v, int64_t stride, int64_t count, int64_t dim, acc_type<T>* acc) {
  if constexpr (!std::is_same_v<T, double>) {
    if (use_avx512_rows()) return avx512::accumulate_rows(p, v, stride, count, dim, acc);
    if (use_simd_rows()) return simd::accumulate_rows(p, v, stride, count, dim, acc);
  }
  for (int64_t j = 0; j < count; ++j) {
    if (p[j] == 0) continue;  // masked, dropped or underflowed: nothing to add
    const T* row = v + j * stride;
    for (int64_t d = 0; d < dim; ++d) acc[d] += p[j] * static_cast<acc_type<T>>(row[d]);
  }
}

template void dot_rows(const float*, const float*, int64_t, int64_t, int64_t, float*);
template void dot_rows(const double*, const double*, int64_t, int64_t, int64_t, double*);
template void dot_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*);
template void accumulate_rows(const float*, const float*, int64_t, int64_t, int64_t, float*);
template void accumulate_rows(const double*, const double*, int64_t, int64_t, int64_t, double*);
template void accumulate_rows(const float*, const c10::BFloat16*, int64_t, int64_t, int64_t, float*);

}  // namespace perceiver_fast::cpu
