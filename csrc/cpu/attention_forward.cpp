// Forward: every worker streams its key tiles once, with all query rows of the head resident
// (queries, fp32 accumulator, running max and sum), so K and V are read from memory exactly once.
// A head of few queries (a decode step) reads its tiles in place instead of packing them for GEMMs.
#include <c10/util/BFloat16.h>

#include <vector>

#include "attention.h"
#include "attention_loops.h"
#include "attention_tiles.h"
#include "key_rows.h"
#include "parallel.h"
#include "phase_timer.h"
#include "tile_gemm.h"
#include "work_plan.h"

namespace perceiver_fast::cpu {
namespace {

// Heads of at most this many queries take the few-query path: a GEMM of so few rows runs far below
// its rate, and packing K and V for it doubles the memory traffic that is the whole cost. It reads
// K and V in their own type and multiplies in float32 whatever the GEMM operand type P.
constexpr int64_t kFewQueries = 4;

// forward_tile for few queries: scores from K's rows in place, one query at a time (the tile stays
// in cache across them), the same softmax step, and V's rows summed in place.
template <typename T, typename P>
void few_query_tile(const AttentionInputs<T>& in, int64_t b, int64_t h, const KeyTile<acc_type<T>>& tile,
                    const acc_type<T>* q_rows, acc_type<T> scale_log2, const RowState<acc_type<T>>& state,
                    ForwardScratch<P>& scratch) {
  using acc_t = acc_type<T>;
  const Shape& s = in.shape;
  const TileDropout<acc_t> dropped{in.dropout, b * s.heads + h, scratch.keep};
  acc_t* probs = scratch.scores.data();
  for (int64_t i = first_row_seeing(s, in.causal, tile.start); i < s.queries; ++i) {
    const int64_t seen = keys_seen(s, in.causal, i, tile.start, tile.count);
    {
      PhaseScope timed(Phase::key_rows);
      dot_rows<T>(q_rows + i * s.dim_qk, in.k.row(b, h, tile.start), in.k.row_stride, seen, s.dim_qk, probs);
    }
    acc_t* acc = state.acc + i * s.dim_v;
    {
      PhaseScope timed(Phase::softmax);
      const acc_t alpha = softmax_forward_step(probs, probs, seen, seen, scale_log2, tile.bias, state.max[i],
                                               state.sum[i], dropped.row(i, tile.start, seen));
      if (alpha != acc_t(1)) {
        for (int64_t d = 0; d < s.dim_v; ++d) acc[d] *= alpha;
      }
    }
    PhaseScope timed(Phase::key_rows);
    accumulate_rows<T>(probs, in.v.row(b, h, tile.start), in.v.row_stride, seen, s.dim_v, acc);
  }
}

}  // namespace

template <typename T, typename P>
void attention_forward(const AttentionInputs<T>& in, T* out, float* lse) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<P>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<P>(s, in.tiling, Pass::forward);
  const WorkPlan plan = plan_work(s.batch * s.heads, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t n = s.queries, dv = s.dim_v, dqk = Gemm::padded_k(s.dim_qk), kt = loop.key_tile;
  const acc_t scale_log2 = static_cast<acc_t>(in.scale * M_LOG2E);

  SlotStates<acc_t> slots(plan.num_slots, n, dv);
  const bool few = n <= kFewQueries;

  parallel_for(0, plan.segments_of_worker.size(), [&](int64_t begin, int64_t end) {
    std::vector<P> q_rows(few ? 0 : n * dqk, P()), k_packed(few ? 0 : dqk * kt),
        v_packed(few ? 0 : Gemm::padded_k(kt) * dv);
    std::vector<acc_t> q_wide(few ? n * s.dim_qk : 0);  // the few-query path's queries, widened once
    std::vector<acc_t> bias(kt), acc(n * dv), max(n), sum(n);
    const RowState<acc_t> state{acc.data(), max.data(), sum.data()};
    ForwardScratch<P> scratch(loop);
    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head / s.heads, h = seg.head % s.heads;
        {
          PhaseScope timed(Phase::load);
          for (int64_t i = 0; i < n; ++i) {
            if (few) {
              std::copy_n(in.q.row(b, h, i), s.dim_qk, q_wide.data() + i * s.dim_qk);
            } else {
              std::copy_n(in.q.row(b, h, i), s.dim_qk, q_rows.data() + i * dqk);
            }
          }
        }
        state.reset(n, dv);
        const bool* mask_row = in.key_mask ? in.key_mask + b * s.keys : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, s.keys - j0);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          if (all_masked) continue;
          if (few) {
            few_query_tile(in, b, h, KeyTile<acc_t>{j0, tj, tile_bias}, q_wide.data(), scale_log2, state, scratch);
            continue;
          }
          {
            PhaseScope timed(Phase::pack);
            Gemm::pack_transposed(in.k.row(b, h, j0), in.k.row_stride, tj, s.dim_qk, k_packed.data());
            Gemm::pack_rows(in.v.row(b, h, j0), in.v.row_stride, tj, dv, v_packed.data());
          }
          forward_tile(s, in.causal, loop, KeyTile<acc_t>{j0, tj, tile_bias}, q_rows.data(), dqk, k_packed.data(),
                       v_packed.data(), scale_log2, state, in.dropout, seg.head, scratch);
        }

        PhaseScope timed(Phase::store);
        if (seg.slot < 0) {
          write_output(s, state, out + seg.head * n * dv, lse + seg.head * n);
        } else {
          slots.store(seg.slot, state, n, dv);
        }
      }
    }
    Gemm::release();
  });

  parallel_for(0, s.batch * s.heads, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      if (plan.slots_of_head[head].empty()) continue;
      PhaseScope timed(Phase::merge);
      merge_slots(s, plan.slots_of_head[head], slots, out + head * n * dv, lse + head * n);
    }
  });
}

template void attention_forward(const AttentionInputs<float>&, float*, float*);
template void attention_forward(const AttentionInputs<double>&, double*, float*);
template void attention_forward(const AttentionInputs<c10::BFloat16>&, c10::BFloat16*, float*);
template void attention_forward<float, SplitBF16>(const AttentionInputs<float>&, float*, float*);
template void attention_forward<c10::BFloat16, float>(const AttentionInputs<c10::BFloat16>&, c10::BFloat16*, float*);

}  // namespace perceiver_fast::cpu
