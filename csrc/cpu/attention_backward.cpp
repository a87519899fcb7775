// Backward: each worker owns key tiles, recomputes their probabilities from the saved lse for all
// query rows (attention_tiles.h), and writes dk and dv of its tiles once; dq gathers in a private
// fp32 buffer per segment, written directly when the segment holds the whole head, else summed
// over slots.
#include <c10/util/BFloat16.h>

#include <vector>

#include "attention.h"
#include "attention_loops.h"
#include "attention_tiles.h"
#include "parallel.h"
#include "phase_timer.h"
#include "tile_gemm.h"
#include "work_plan.h"

namespace perceiver_fast::cpu {

template <typename T, typename P>
void attention_backward(const AttentionInputs<T>& in, Strided<const T> dout, const T* out, const float* lse, T* dq,
                        T* dk, T* dv) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<P>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<P>(s, in.tiling, Pass::backward);
  const WorkPlan plan = plan_work(s.batch * s.heads, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t n = s.queries, m = s.keys, dqk = s.dim_qk, dv_ = s.dim_v, kt = loop.key_tile;

  std::vector<acc_t> slot_dq(plan.num_slots * n * dqk);

  parallel_for(0, plan.segments_of_worker.size(), [&](int64_t begin, int64_t end) {
    HeadRows<T, P> rows(s);
    std::vector<P> k_packed_t(rows.dqk_p * kt), v_packed_t(rows.dv_p * kt), k_packed(Gemm::padded_k(kt) * dqk);
    std::vector<acc_t> bias(kt), dk_t(dqk * kt), dv_t(dv_ * kt);
    BackwardScratch<P> scratch(loop);

    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head / s.heads, h = seg.head % s.heads;
        {
          PhaseScope timed(Phase::load);
          rows.load(in.q, dout, b, h, out + seg.head * n * dv_, lse + seg.head * n);
        }
        const bool* mask_row = in.key_mask ? in.key_mask + b * m : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, m - j0);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          const int64_t key_offset = seg.head * m + j0;
          if (all_masked) {  // no query attends these keys
            PhaseScope timed(Phase::store);
            std::fill_n(dk + key_offset * dqk, tj * dqk, T(0));
            std::fill_n(dv + key_offset * dv_, tj * dv_, T(0));
            continue;
          }
          {
            PhaseScope timed(Phase::pack);
            Gemm::pack_transposed(in.k.row(b, h, j0), in.k.row_stride, tj, dqk, k_packed_t.data());
            Gemm::pack_transposed(in.v.row(b, h, j0), in.v.row_stride, tj, dv_, v_packed_t.data());
            Gemm::pack_rows(in.k.row(b, h, j0), in.k.row_stride, tj, dqk, k_packed.data());
          }
          backward_tile(s, in.causal, loop, KeyTile<acc_t>{j0, tj, tile_bias}, rows, k_packed_t.data(),
                        v_packed_t.data(), k_packed.data(), in.scale, dk_t.data(), dv_t.data(), tj, in.dropout,
                        seg.head, scratch);
          PhaseScope timed(Phase::store);
          store_transposed(dk_t.data(), dqk, tj, dk + key_offset * dqk);
          store_transposed(dv_t.data(), dv_, tj, dv + key_offset * dv_);
        }

        PhaseScope timed(Phase::store);
        if (seg.slot < 0) {
          T* dq_head = dq + seg.head * n * dqk;
          for (int64_t x = 0; x < n * dqk; ++x) dq_head[x] = static_cast<T>(rows.dq[x]);
        } else {
          std::copy(rows.dq.begin(), rows.dq.end(), slot_dq.begin() + seg.slot * n * dqk);
        }
      }
    }
    Gemm::release();
  });

  parallel_for(0, s.batch * s.heads, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      if (plan.slots_of_head[head].empty()) continue;
      PhaseScope timed(Phase::merge);
      sum_dq_slots(plan.slots_of_head[head], slot_dq, n * dqk, dq + head * n * dqk);
    }
  });
}

template void attention_backward(const AttentionInputs<float>&, Strided<const float>, const float*, const float*,
                                 float*, float*, float*);
template void attention_backward(const AttentionInputs<double>&, Strided<const double>, const double*, const float*,
                                 double*, double*, double*);
template void attention_backward(const AttentionInputs<c10::BFloat16>&, Strided<const c10::BFloat16>,
                                 const c10::BFloat16*, const float*, c10::BFloat16*, c10::BFloat16*, c10::BFloat16*);

template void attention_backward<float, SplitBF16>(const AttentionInputs<float>&, Strided<const float>, const float*,
                                                  const float*, float*, float*, float*);
template void attention_backward<c10::BFloat16, float>(const AttentionInputs<c10::BFloat16>&,
                                                       Strided<const c10::BFloat16>, const c10::BFloat16*,
                                                       const float*, c10::BFloat16*, c10::BFloat16*, c10::BFloat16*);

}  // namespace perceiver_fast::cpu
