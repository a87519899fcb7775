// Forward: every worker streams its key tiles once, with all query rows of the head resident
// (queries, fp32 accumulator, running max and sum), so K and V are read from memory exactly once.
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
namespace {

template <typename acc_t>
constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

// Online-softmax state of one head's query rows: unnormalized output, running max (base 2), sum.
template <typename acc_t>
struct RowState {
  acc_t* acc;
  acc_t* max;
  acc_t* sum;
};

template <typename T, typename acc_t>
void write_output(const Shape& s, RowState<const acc_t> state, T* out, float* lse) {
  for (int64_t i = 0; i < s.queries; ++i) {
    const acc_t* acc = state.acc + i * s.dim_v;
    T* out_row = out + i * s.dim_v;
    if (state.sum[i] == 0) {
      std::fill(out_row, out_row + s.dim_v, T(0));
      lse[i] = -std::numeric_limits<float>::infinity();
      continue;
    }
    const acc_t inv = acc_t(1) / state.sum[i];
    for (int64_t d = 0; d < s.dim_v; ++d) out_row[d] = static_cast<T>(acc[d] * inv);
    lse[i] = static_cast<float>((state.max[i] + std::log2(state.sum[i])) * acc_t(M_LN2));
  }
}

// Combines the partial states of a head's segments into the final output.
template <typename T, typename acc_t>
void merge_slots(const Shape& s, const std::vector<int64_t>& slots, const std::vector<acc_t>& slot_acc,
                 const std::vector<acc_t>& slot_max, const std::vector<acc_t>& slot_sum, T* out, float* lse) {
  const int64_t n = s.queries, dv = s.dim_v;
  std::vector<acc_t> acc(n * dv, acc_t(0)), max(n, neg_inf<acc_t>), sum(n, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t slot : slots) max[i] = std::max(max[i], slot_max[slot * n + i]);
    if (max[i] == neg_inf<acc_t>) continue;
    for (int64_t slot : slots) {
      const acc_t m = slot_max[slot * n + i];
      if (m == neg_inf<acc_t>) continue;
      const acc_t w = std::exp2(m - max[i]);
      sum[i] += w * slot_sum[slot * n + i];
      const acc_t* part = slot_acc.data() + (slot * n + i) * dv;
      for (int64_t d = 0; d < dv; ++d) acc[i * dv + d] += w * part[d];
    }
  }
  write_output(s, RowState<const acc_t>{acc.data(), max.data(), sum.data()}, out, lse);
}

}  // namespace

template <typename T>
void attention_forward(const AttentionInputs<T>& in, T* out, float* lse) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  // float32 probabilities overwrite their scores in place; bfloat16 ones go to their own buffer.
  constexpr bool probs_in_place = std::is_same_v<T, acc_t>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<T>(s, in.tiling, Pass::forward);
  const WorkPlan plan = plan_work(s.batch * s.heads, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t n = s.queries, dv = s.dim_v, dqk = Gemm::padded_k(s.dim_qk);
  const int64_t kt = loop.key_tile, rb = loop.row_block;
  const acc_t scale_log2 = static_cast<acc_t>(in.scale * M_LOG2E);

  std::vector<acc_t> slot_acc(plan.num_slots * n * dv), slot_max(plan.num_slots * n), slot_sum(plan.num_slots * n);

  at::parallel_for(0, plan.segments_of_worker.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<T> q_rows(n * dqk, T(0)), k_packed(dqk * kt), v_packed(Gemm::padded_k(kt) * dv);
    std::vector<T> probs_buffer(probs_in_place ? 0 : rb * Gemm::padded_k(kt));
    std::vector<acc_t> scores(rb * kt), bias(kt), acc(n * dv), max(n), sum(n);
    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head / s.heads, h = seg.head % s.heads;
        for (int64_t i = 0; i < n; ++i) std::copy_n(in.q.row(b, h, i), s.dim_qk, q_rows.data() + i * dqk);
        std::fill(acc.begin(), acc.end(), acc_t(0));
        std::fill(max.begin(), max.end(), neg_inf<acc_t>);
        std::fill(sum.begin(), sum.end(), acc_t(0));
        const bool* mask_row = in.key_mask ? in.key_mask + b * s.keys : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, s.keys - j0), tjk = Gemm::padded_k(tj);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          if (all_masked) continue;
          Gemm::pack_transposed(in.k.row(b, h, j0), in.k.row_stride, tj, s.dim_qk, k_packed.data());
          Gemm::pack_rows(in.v.row(b, h, j0), in.v.row_stride, tj, dv, v_packed.data());
          for (int64_t r0 = first_row_seeing(s, in.causal, j0); r0 < n; r0 += rb) {
            const int64_t rows = std::min(rb, n - r0);
            Gemm::multiply(rows, tj, dqk, q_rows.data() + r0 * dqk, dqk, k_packed.data(), scores.data(), tj, false);
            T* probs;
            if constexpr (probs_in_place) probs = scores.data(); else probs = probs_buffer.data();
            for (int64_t i = 0; i < rows; ++i) {
              const int64_t row = r0 + i;
              const acc_t alpha = softmax_forward_step(scores.data() + i * tj, probs + i * tjk,
                                                       keys_seen(s, in.causal, row, j0, tj), tjk, scale_log2,
                                                       tile_bias, max[row], sum[row]);
              if (alpha != acc_t(1)) {
                acc_t* acc_row = acc.data() + row * dv;
                for (int64_t d = 0; d < dv; ++d) acc_row[d] *= alpha;
              }
            }
            Gemm::multiply(rows, dv, tjk, probs, tjk, v_packed.data(), acc.data() + r0 * dv, dv, true);
          }
        }

        if (seg.slot < 0) {
          const int64_t head_offset = seg.head * n;
          write_output(s, RowState<const acc_t>{acc.data(), max.data(), sum.data()}, out + head_offset * dv,
                       lse + head_offset);
        } else {
          std::copy(acc.begin(), acc.end(), slot_acc.begin() + seg.slot * n * dv);
          std::copy(max.begin(), max.end(), slot_max.begin() + seg.slot * n);
          std::copy(sum.begin(), sum.end(), slot_sum.begin() + seg.slot * n);
        }
      }
    }
    Gemm::release();
  });

  const int64_t heads = s.batch * s.heads;
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      if (plan.slots_of_head[head].empty()) continue;
      merge_slots(s, plan.slots_of_head[head], slot_acc, slot_max, slot_sum, out + head * n * dv, lse + head * n);
    }
  });
}

template void attention_forward(const AttentionInputs<float>&, float*, float*);
template void attention_forward(const AttentionInputs<double>&, double*, float*);
template void attention_forward(const AttentionInputs<c10::BFloat16>&, c10::BFloat16*, float*);

}  // namespace perceiver_fast::cpu
