// Backward: each worker owns key tiles, recomputes their probabilities from the saved lse for all
// query rows, and writes dk and dv of its tiles once; dq gathers in a private fp32 buffer per
// segment, written directly when the segment holds the whole head, else summed over slots.
//
// Per tile and row block (S, P, dP, dS are rows x tile_keys):
//   S = Q K^T, dP = dO V^T, P = exp2(S*scale_log2 - lse2), dS = P (dP - delta) scale
//   dV^T += dO^T P,  dK^T += Q^T dS,  dQ += dS K
// dK and dV are accumulated transposed so that every GEMM's B operand is a row-major block that
// is already in memory (P and dS rows); they are transposed once per tile on the way out.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "attention_loops.h"
#include "softmax_rows.h"
#include "tile_gemm.h"
#include "work_plan.h"

namespace perceiver_fast::cpu {

template <typename T>
void attention_backward(const AttentionInputs<T>& in, Strided<const T> dout, const T* out, const float* lse, T* dq,
                        T* dk, T* dv) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  // float32/64: P and dS are used as GEMM operands where they are; bfloat16 packs copies.
  constexpr bool operands_in_place = std::is_same_v<T, acc_t>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<T>(s, in.tiling, Pass::backward);
  const WorkPlan plan = plan_work(s.batch * s.heads, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t n = s.queries, m = s.keys, dqk = s.dim_qk, dv_ = s.dim_v;
  const int64_t dqk_p = Gemm::padded_k(dqk), dv_p = Gemm::padded_k(dv_);
  // Transposed Q and dO are A operands whose depth runs over query rows: pad so that a padded
  // row block never reads past them.
  const int64_t n_p = n + 2;
  const int64_t kt = loop.key_tile, kt_p = Gemm::padded_k(kt), rb = loop.row_block, rb_p = Gemm::padded_k(rb);
  const acc_t scale = static_cast<acc_t>(in.scale), scale_log2 = static_cast<acc_t>(in.scale * M_LOG2E);

  std::vector<acc_t> slot_dq(plan.num_slots * n * dqk);

  at::parallel_for(0, plan.segments_of_worker.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> q_rows(n * dqk_p, T(0)), do_rows(n * dv_p, T(0)), q_t(dqk * n_p, T(0)), do_t(dv_ * n_p, T(0));
    std::vector<T> k_packed_t(dqk_p * kt), v_packed_t(dv_p * kt), k_packed(kt_p * dqk);
    std::vector<T> p_packed(operands_in_place ? 0 : rb_p * kt), ds_packed(operands_in_place ? 0 : rb_p * kt);
    std::vector<T> ds_rows(operands_in_place ? 0 : rb * kt_p);
    std::vector<acc_t> scores(rb * kt), dprobs(rb * kt), bias(kt), dk_t(dqk * kt), dv_t(dv_ * kt);
    std::vector<acc_t> dq_acc(n * dqk), lse2(n), delta(n);

    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head / s.heads, h = seg.head % s.heads;
        const T* out_head = out + seg.head * n * dv_;
        for (int64_t i = 0; i < n; ++i) {
          const T* q_row = in.q.row(b, h, i);
          const T* do_row = dout.row(b, h, i);
          std::copy_n(q_row, dqk, q_rows.data() + i * dqk_p);
          std::copy_n(do_row, dv_, do_rows.data() + i * dv_p);
          for (int64_t d = 0; d < dqk; ++d) q_t[d * n_p + i] = q_row[d];
          acc_t dot = 0;
          for (int64_t d = 0; d < dv_; ++d) {
            do_t[d * n_p + i] = do_row[d];
            dot += static_cast<acc_t>(do_row[d]) * static_cast<acc_t>(out_head[i * dv_ + d]);
          }
          delta[i] = dot;
          lse2[i] = static_cast<acc_t>(lse[seg.head * n + i]) * acc_t(M_LOG2E);
        }
        std::fill(dq_acc.begin(), dq_acc.end(), acc_t(0));
        const bool* mask_row = in.key_mask ? in.key_mask + b * m : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, m - j0), tjk = Gemm::padded_k(tj);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          if (all_masked) continue;  // dk, dv of these keys stay 0
          Gemm::pack_transposed(in.k.row(b, h, j0), in.k.row_stride, tj, dqk, k_packed_t.data());
          Gemm::pack_transposed(in.v.row(b, h, j0), in.v.row_stride, tj, dv_, v_packed_t.data());
          Gemm::pack_rows(in.k.row(b, h, j0), in.k.row_stride, tj, dqk, k_packed.data());
          bool first_block = true;
          for (int64_t r0 = first_row_seeing(s, in.causal, j0); r0 < n; r0 += rb) {
            const int64_t rows = std::min(rb, n - r0), rows_k = Gemm::padded_k(rows);
            Gemm::multiply(rows, tj, dqk_p, q_rows.data() + r0 * dqk_p, dqk_p, k_packed_t.data(), scores.data(), tj,
                           false);
            Gemm::multiply(rows, tj, dv_p, do_rows.data() + r0 * dv_p, dv_p, v_packed_t.data(), dprobs.data(), tj,
                           false);
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t row = r0 + i;
              softmax_backward_step(scores.data() + i * tj, dprobs.data() + i * tj,
                                    keys_seen(s, in.causal, row, j0, tj), tj, scale_log2, tile_bias, lse2[row],
                                    delta[row], scale);
            }
            const T *p_operand, *ds_operand, *ds_a;
            if constexpr (operands_in_place) {
              p_operand = scores.data();
              ds_operand = ds_a = dprobs.data();
            } else {
              Gemm::pack_rows(scores.data(), tj, rows, tj, p_packed.data());
              Gemm::pack_rows(dprobs.data(), tj, rows, tj, ds_packed.data());
              for (int64_t i = 0; i < rows; ++i) {
                T* dst = ds_rows.data() + i * tjk;
                std::copy_n(dprobs.data() + i * tj, tj, dst);
                std::fill(dst + tj, dst + tjk, T(0));
              }
              p_operand = p_packed.data();
              ds_operand = ds_packed.data();
              ds_a = ds_rows.data();
            }
            Gemm::multiply(dv_, tj, rows_k, do_t.data() + r0, n_p, p_operand, dv_t.data(), tj, !first_block);
            Gemm::multiply(dqk, tj, rows_k, q_t.data() + r0, n_p, ds_operand, dk_t.data(), tj, !first_block);
            Gemm::multiply(rows, dqk, tjk, ds_a, tjk, k_packed.data(), dq_acc.data() + r0 * dqk, dqk, true);
            first_block = false;
          }
          const int64_t key_offset = seg.head * m + j0;
          for (int64_t j = 0; j < tj; ++j) {
            for (int64_t d = 0; d < dqk; ++d) dk[(key_offset + j) * dqk + d] = static_cast<T>(dk_t[d * tj + j]);
            for (int64_t d = 0; d < dv_; ++d) dv[(key_offset + j) * dv_ + d] = static_cast<T>(dv_t[d * tj + j]);
          }
        }

        if (seg.slot < 0) {
          T* dq_head = dq + seg.head * n * dqk;
          for (int64_t x = 0; x < n * dqk; ++x) dq_head[x] = static_cast<T>(dq_acc[x]);
        } else {
          std::copy(dq_acc.begin(), dq_acc.end(), slot_dq.begin() + seg.slot * n * dqk);
        }
      }
    }
    Gemm::release();
  });

  at::parallel_for(0, s.batch * s.heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> total(n * dqk);
    for (int64_t head = begin; head < end; ++head) {
      const auto& slots = plan.slots_of_head[head];
      if (slots.empty()) continue;
      std::fill(total.begin(), total.end(), acc_t(0));
      for (int64_t slot : slots) {
        const acc_t* part = slot_dq.data() + slot * n * dqk;
        for (int64_t x = 0; x < n * dqk; ++x) total[x] += part[x];
      }
      T* dq_head = dq + head * n * dqk;
      for (int64_t x = 0; x < n * dqk; ++x) dq_head[x] = static_cast<T>(total[x]);
    }
  });
}

template void attention_backward(const AttentionInputs<float>&, Strided<const float>, const float*, const float*,
                                 float*, float*, float*);
template void attention_backward(const AttentionInputs<double>&, Strided<const double>, const double*, const float*,
                                 double*, double*, double*);
template void attention_backward(const AttentionInputs<c10::BFloat16>&, Strided<const c10::BFloat16>,
                                 const c10::BFloat16*, const float*, c10::BFloat16*, c10::BFloat16*, c10::BFloat16*);

}  // namespace perceiver_fast::cpu
