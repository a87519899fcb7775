// Fused input attention backward. As in the forward, a worker's unit is (batch item, key tile)
// with every head. Per tile: recompute xn (and K, V), run each head's attention backward
// (attention_tiles.h) to get dK and dV of the tile, turn them into dxn
//   projection: dxn = dK Wk + dV Wv, and dWk += dK^T xn, dbk += colsum dK (same for V)
//   shortcut:   dxn = sum over heads of dK + dV (K = V = xn)
// and dxn into dx through the LayerNorm: dx = rstd (dxn - mean(dxn) - xn mean(dxn xn)).
// dx of each tile is written once; dq and the weight gradients gather per worker and are summed.
#include <c10/util/BFloat16.h>

#include <vector>

#include "attention_loops.h"
#include "attention_tiles.h"
#include "input_attention.h"
#include "input_tiles.h"
#include "parallel.h"
#include "tile_gemm.h"
#include "work_plan.h"

namespace perceiver_fast::cpu {
namespace {

// dx rows of a tile from dxn(j, d) = dxn[j * row_stride + d * col_stride].
template <typename T, typename acc_t>
void layer_norm_backward(const InputAttentionInputs<T>& in, const InputTile<T>& tile, const acc_t* dxn,
                         int64_t row_stride, int64_t col_stride, int64_t count, T* dx) {
  const int64_t c = tile.c;
  for (int64_t j = 0; j < count; ++j) {
    const acc_t* g = dxn + j * row_stride;
    const acc_t* xn = tile.xn.data() + j * c;
    T* out = dx + j * c;
    if (!in.normalize) {
      for (int64_t d = 0; d < c; ++d) out[d] = static_cast<T>(g[d * col_stride]);
      continue;
    }
    acc_t mean_g = 0, mean_gx = 0;
    for (int64_t d = 0; d < c; ++d) {
      mean_g += g[d * col_stride];
      mean_gx += g[d * col_stride] * xn[d];
    }
    mean_g /= static_cast<acc_t>(c);
    mean_gx /= static_cast<acc_t>(c);
    const acc_t r = tile.rstd[j];
    for (int64_t d = 0; d < c; ++d) out[d] = static_cast<T>(r * (g[d * col_stride] - mean_g - xn[d] * mean_gx));
  }
}

// g_t: the gradient of K (or V) of a tile, transposed (dims x count), as the two GEMM A operands
// of the projection backward, rows (count x padded dims, for dxn = dK W) and transposed with padded
// depth (dims x padded count, for dW = dK^T xn); its column sums go to the bias gradient.
template <typename T, typename acc_t>
void as_operands(const acc_t* g_t, int64_t dims, int64_t count, T* rows, T* transposed, acc_t* bias_grad) {
  using Gemm = TileGemm<T>;
  const int64_t dims_p = Gemm::padded_k(dims), count_p = Gemm::padded_k(count);
  for (int64_t d = 0; d < dims; ++d) {
    acc_t total = 0;
    for (int64_t j = 0; j < count; ++j) {
      const acc_t g = g_t[d * count + j];
      rows[j * dims_p + d] = static_cast<T>(g);
      transposed[d * count_p + j] = static_cast<T>(g);
      total += g;
    }
    if (count_p > count) transposed[d * count_p + count] = T(0);
    bias_grad[d] += total;
  }
}

// Per-worker sums of the projection gradients.
template <typename acc_t>
struct WeightGrads {
  std::vector<acc_t> k_weight, k_bias, v_weight, v_bias;

  void add_to(WeightGrads& total) const {
    for (auto [part, sum] : {std::pair{&k_weight, &total.k_weight}, std::pair{&k_bias, &total.k_bias},
                             std::pair{&v_weight, &total.v_weight}, std::pair{&v_bias, &total.v_bias}}) {
      for (size_t i = 0; i < part->size(); ++i) (*sum)[i] += (*part)[i];
    }
  }
};

}  // namespace

template <typename T>
void input_attention_backward(const InputAttentionInputs<T>& in, Strided<const T> dout, const T* out,
                              const float* lse, const InputAttentionGrads<T>& grads) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<T>(s, in.tiling, Pass::backward);
  const WorkPlan plan = plan_work(s.batch, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t heads = s.heads, n = s.queries, m = s.keys, dqk = s.dim_qk, dv = s.dim_v, kt = loop.key_tile;
  const int64_t c = in.channels, hk = heads * dqk, hv = heads * dv, ktk = Gemm::padded_k(kt);
  const bool shortcut = in.shortcut();
  const PackedWeights<T> weights(in, true);
  const auto workers = static_cast<int64_t>(plan.segments_of_worker.size());

  std::vector<acc_t> slot_dq(plan.num_slots * heads * n * dqk);
  std::vector<WeightGrads<acc_t>> worker_grads(workers);

  parallel_for(0, workers, [&](int64_t begin, int64_t end) {
    std::vector<HeadRows<T>> rows(heads, HeadRows<T>(s));
    const int64_t dqk_p = rows[0].dqk_p, dv_p = rows[0].dv_p;
    std::vector<T> k_packed_t(dqk_p * kt), v_packed_t(shortcut ? 0 : dv_p * kt), k_packed(ktk * dqk);
    std::vector<acc_t> bias(kt), dk_t(hk * kt), dv_t(hv * kt), dxn(kt * c);
    std::vector<T> dx_tile(kt * c);
    // Projection only: dK, dV as A operands of dxn = dK Wk (rows) and of dW = dK^T xn (transposed).
    std::vector<T> dk_rows, dv_rows, dk_t_op, dv_t_op, xn_packed;
    WeightGrads<acc_t>& wg = worker_grads[begin];
    if (!shortcut) {
      dk_rows.assign(kt * Gemm::padded_k(hk), T(0));
      dv_rows.assign(kt * Gemm::padded_k(hv), T(0));
      dk_t_op.resize(hk * ktk);
      dv_t_op.resize(hv * ktk);
      xn_packed.resize(ktk * c);
      wg = {std::vector<acc_t>(hk * c), std::vector<acc_t>(hk), std::vector<acc_t>(hv * c), std::vector<acc_t>(hv)};
    }
    InputTile<T> tile(in, kt);
    BackwardScratch<T> scratch(loop);

    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head;
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t head = b * heads + h;
          rows[h].load(in.q, dout, b, h, out + head * n * dv, lse + head * n);
        }
        const bool* mask_row = in.key_mask ? in.key_mask + b * m : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, m - j0), tjk = Gemm::padded_k(tj);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          if (all_masked) continue;  // dx of these rows stays 0
          const KeyTile<acc_t> key_tile{j0, tj, tile_bias};
          tile.normalize(in, b, j0, tj);

          if (shortcut) {
            // K = V = xn for every head: pack once, and sum every head's dK^T + dV^T as dxn^T.
            Gemm::pack_transposed(tile.xn.data(), c, tj, c, k_packed_t.data());
            Gemm::pack_rows(tile.xn.data(), c, tj, c, k_packed.data());
            std::fill_n(dxn.begin(), c * tj, acc_t(0));
            for (int64_t h = 0; h < heads; ++h) {
              backward_tile(s, in.causal, loop, key_tile, rows[h], k_packed_t.data(), k_packed_t.data(),
                            k_packed.data(), in.scale, dk_t.data(), dv_t.data(), tj, in.dropout, b * heads + h,
                            scratch);
              for (int64_t x = 0; x < c * tj; ++x) dxn[x] += dk_t[x] + dv_t[x];
            }
            layer_norm_backward(in, tile, dxn.data(), 1, tj, tj, dx_tile.data());
          } else {
            tile.project(in, weights, tj);
            for (int64_t h = 0; h < heads; ++h) {
              Gemm::pack_transposed(tile.k.data() + h * dqk, hk, tj, dqk, k_packed_t.data());
              Gemm::pack_transposed(tile.v.data() + h * dv, hv, tj, dv, v_packed_t.data());
              Gemm::pack_rows(tile.k.data() + h * dqk, hk, tj, dqk, k_packed.data());
              backward_tile(s, in.causal, loop, key_tile, rows[h], k_packed_t.data(), v_packed_t.data(),
                            k_packed.data(), in.scale, dk_t.data() + h * dqk * tj, dv_t.data() + h * dv * tj, tj,
                            in.dropout, b * heads + h, scratch);
            }
            const int64_t hk_p = Gemm::padded_k(hk), hv_p = Gemm::padded_k(hv);
            as_operands(dk_t.data(), hk, tj, dk_rows.data(), dk_t_op.data(), wg.k_bias.data());
            as_operands(dv_t.data(), hv, tj, dv_rows.data(), dv_t_op.data(), wg.v_bias.data());
            Gemm::multiply(tj, c, hk_p, dk_rows.data(), hk_p, weights.k_rows.data(), dxn.data(), c, false);
            Gemm::multiply(tj, c, hv_p, dv_rows.data(), hv_p, weights.v_rows.data(), dxn.data(), c, true);
            Gemm::pack_rows(tile.xn.data(), c, tj, c, xn_packed.data());
            Gemm::multiply(hk, c, tjk, dk_t_op.data(), tjk, xn_packed.data(), wg.k_weight.data(), c, true);
            Gemm::multiply(hv, c, tjk, dv_t_op.data(), tjk, xn_packed.data(), wg.v_weight.data(), c, true);
            layer_norm_backward(in, tile, dxn.data(), c, 1, tj, dx_tile.data());
          }
          std::copy_n(dx_tile.data(), tj * c, grads.dx + (b * m + j0) * c);
        }

        for (int64_t h = 0; h < heads; ++h) {
          const int64_t head = b * heads + h;
          if (seg.slot < 0) {
            T* dq_head = grads.dq + head * n * dqk;
            for (int64_t x = 0; x < n * dqk; ++x) dq_head[x] = static_cast<T>(rows[h].dq[x]);
          } else {
            std::copy(rows[h].dq.begin(), rows[h].dq.end(), slot_dq.begin() + (seg.slot * heads + h) * n * dqk);
          }
        }
      }
    }
    Gemm::release();
  });

  parallel_for(0, s.batch * heads, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      if (plan.slots_of_head[head / heads].empty()) continue;
      sum_dq_slots(slots_of_head_in_batch_plan(plan, head, heads), slot_dq, n * dqk, grads.dq + head * n * dqk);
    }
  });

  if (shortcut) return;
  WeightGrads<acc_t> total{std::vector<acc_t>(hk * c), std::vector<acc_t>(hk), std::vector<acc_t>(hv * c),
                           std::vector<acc_t>(hv)};
  for (const auto& part : worker_grads) {
    if (!part.k_weight.empty()) part.add_to(total);
  }
  for (int64_t i = 0; i < hk * c; ++i) grads.dk_weight[i] = static_cast<T>(total.k_weight[i]);
  for (int64_t i = 0; i < hk; ++i) grads.dk_bias[i] = static_cast<T>(total.k_bias[i]);
  for (int64_t i = 0; i < hv * c; ++i) grads.dv_weight[i] = static_cast<T>(total.v_weight[i]);
  for (int64_t i = 0; i < hv; ++i) grads.dv_bias[i] = static_cast<T>(total.v_bias[i]);
}

template void input_attention_backward(const InputAttentionInputs<float>&, Strided<const float>, const float*,
                                       const float*, const InputAttentionGrads<float>&);
template void input_attention_backward(const InputAttentionInputs<double>&, Strided<const double>, const double*,
                                       const float*, const InputAttentionGrads<double>&);
template void input_attention_backward(const InputAttentionInputs<c10::BFloat16>&, Strided<const c10::BFloat16>,
                                       const c10::BFloat16*, const float*, const InputAttentionGrads<c10::BFloat16>&);

}  // namespace perceiver_fast::cpu
