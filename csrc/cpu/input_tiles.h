// One key tile of the fused input attention: LayerNorm of its x rows, and (projection path) its K
// and V for all heads. Shared by input_attention_forward.cpp and input_attention_backward.cpp.
#pragma once

#include <cmath>
#include <vector>

#include "input_attention.h"
#include "tile_gemm.h"

namespace perceiver_fast::cpu {

// The projection weights, packed once per call as GEMM B operands.
template <typename T>
struct PackedWeights {
  using Gemm = TileGemm<T>;
  std::vector<T> k_t, v_t;        // Wk^T, Wv^T: (padded C) x heads*dim
  std::vector<T> k_rows, v_rows;  // Wk, Wv: (padded heads*dim) x C, for the backward's dxn = dK Wk

  PackedWeights(const InputAttentionInputs<T>& in, bool with_rows) {
    if (in.shortcut()) return;
    const int64_t c = in.channels, hk = in.shape.heads * in.shape.dim_qk, hv = in.shape.heads * in.shape.dim_v;
    k_t.resize(Gemm::padded_k(c) * hk);
    v_t.resize(Gemm::padded_k(c) * hv);
    Gemm::pack_transposed(in.k_weight, c, hk, c, k_t.data());
    Gemm::pack_transposed(in.v_weight, c, hv, c, v_t.data());
    if (!with_rows) return;
    k_rows.resize(Gemm::padded_k(hk) * c);
    v_rows.resize(Gemm::padded_k(hv) * c);
    Gemm::pack_rows(in.k_weight, c, hk, c, k_rows.data());
    Gemm::pack_rows(in.v_weight, c, hv, c, v_rows.data());
  }
};

template <typename T>
struct InputTile {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  int64_t c, c_p, hk, hv;
  std::vector<acc_t> xn, rstd;  // normalised rows (tile x C) and 1/sigma of each
  std::vector<T> xn_rows;       // xn as a GEMM A operand (tile x padded C), projection only
  std::vector<acc_t> k, v;      // tile x heads*dim_qk, tile x heads*dim_v, projection only

  InputTile(const InputAttentionInputs<T>& in, int64_t key_tile)
      : c(in.channels), c_p(Gemm::padded_k(c)), hk(in.shape.heads * in.shape.dim_qk),
        hv(in.shape.heads * in.shape.dim_v), xn(key_tile * c), rstd(key_tile) {
    if (in.shortcut()) return;
    xn_rows.assign(key_tile * c_p, T(0));
    k.resize(key_tile * hk);
    v.resize(key_tile * hv);
  }

  // xn = (x - mean) / sqrt(var + eps) for rows [j0, j0 + count) of batch item b, statistics in the
  // accumulator type as torch's LayerNorm keeps them.
  void normalize(const InputAttentionInputs<T>& in, int64_t b, int64_t j0, int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      const T* x = in.x + b * in.x_batch_stride + (j0 + j) * in.x_row_stride;
      acc_t* out = xn.data() + j * c;
      acc_t mean = 0, r = 1;
      if (in.normalize) {
        // omp simd: the reductions vectorise without licence to reorder anything else.
#pragma omp simd reduction(+ : mean)
        for (int64_t d = 0; d < c; ++d) mean += static_cast<acc_t>(x[d]);
        mean /= static_cast<acc_t>(c);
        acc_t var = 0;
#pragma omp simd reduction(+ : var)
        for (int64_t d = 0; d < c; ++d) {
          const acc_t centred = static_cast<acc_t>(x[d]) - mean;
          var += centred * centred;
        }
        var /= static_cast<acc_t>(c);
        r = acc_t(1) / std::sqrt(var + static_cast<acc_t>(in.eps));
      }
      for (int64_t d = 0; d < c; ++d) out[d] = (static_cast<acc_t>(x[d]) - mean) * r;
      rstd[j] = r;
    }
  }

  // k = xn Wk^T + bk and v = xn Wv^T + bv for the tile's rows, all heads at once.
  void project(const InputAttentionInputs<T>& in, const PackedWeights<T>& w, int64_t count) {
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t d = 0; d < c; ++d) xn_rows[j * c_p + d] = static_cast<T>(xn[j * c + d]);
    }
    Gemm::multiply(count, hk, c_p, xn_rows.data(), c_p, w.k_t.data(), k.data(), hk, false);
    Gemm::multiply(count, hv, c_p, xn_rows.data(), c_p, w.v_t.data(), v.data(), hv, false);
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t d = 0; d < hk; ++d) k[j * hk + d] += static_cast<acc_t>(in.k_bias[d]);
      for (int64_t d = 0; d < hv; ++d) v[j * hv + d] += static_cast<acc_t>(in.v_bias[d]);
    }
  }
};

}  // namespace perceiver_fast::cpu
