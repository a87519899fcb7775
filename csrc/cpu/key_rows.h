// Scores against, and probability-weighted sums over, rows of K and V read where they lie, with
// no packing: the forward's few-query path (a decode step: one query per head against a long
// cache), whose whole cost is streaming K and V once. Rows are `stride` elements apart, each with
// `dim` contiguous values; the query, probabilities and accumulator are in the accumulator type.
#pragma once

#include <cstdint>

#include "tile_gemm.h"

namespace perceiver_fast::cpu {

// scores[j] = q . k_j for j < count, k_j = k + j * stride.
template <typename T>
void dot_rows(const acc_type<T>* q, const T* k, int64_t stride, int64_t count, int64_t dim, acc_type<T>* scores);

// acc[d] += sum_j p[j] * v_j[d] for j < count, v_j = v + j * stride.
template <typename T>
void accumulate_rows(const acc_type<T>* p, const T* v, int64_t stride, int64_t count, int64_t dim, acc_type<T>* acc);

}  // namespace perceiver_fast::cpu
