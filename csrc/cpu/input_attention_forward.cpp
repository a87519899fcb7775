// Fused input attention forward. A worker's unit is (batch item, key tile) with every head: the
// tile's x rows are normalised (and projected) once and then serve all heads, whose query rows
// and online-softmax states stay resident. Split batch items merge per head as in
// attention_forward.cpp, slot s of head h at s * heads + h.
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

template <typename T>
void input_attention_forward(const InputAttentionInputs<T>& in, T* out, float* lse) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  const Shape& s = in.shape;
  const LoopSizes loop = loop_sizes<T>(s, in.tiling, Pass::forward);
  const WorkPlan plan = plan_work(s.batch, tile_costs(s, in.causal, loop), loop.workers);
  const int64_t heads = s.heads, n = s.queries, dv = s.dim_v, dqk = Gemm::padded_k(s.dim_qk), kt = loop.key_tile;
  const acc_t scale_log2 = static_cast<acc_t>(in.scale * M_LOG2E);
  const PackedWeights<T> weights(in, false);

  SlotStates<acc_t> slots(plan.num_slots * heads, n, dv);

  parallel_for(0, plan.segments_of_worker.size(), [&](int64_t begin, int64_t end) {
    std::vector<T> q_rows(heads * n * dqk, T(0)), k_packed(dqk * kt), v_packed(Gemm::padded_k(kt) * dv);
    std::vector<acc_t> bias(kt), acc(heads * n * dv), max(heads * n), sum(heads * n);
    InputTile<T> tile(in, kt);
    ForwardScratch<T> scratch(loop);
    auto state = [&](int64_t h) {
      return RowState<acc_t>{acc.data() + h * n * dv, max.data() + h * n, sum.data() + h * n};
    };

    for (int64_t w = begin; w < end; ++w) {
      for (const Segment& seg : plan.segments_of_worker[w]) {
        const int64_t b = seg.head;
        for (int64_t h = 0; h < heads; ++h) {
          for (int64_t i = 0; i < n; ++i) {
            std::copy_n(in.q.row(b, h, i), s.dim_qk, q_rows.data() + (h * n + i) * dqk);
          }
          state(h).reset(n, dv);
        }
        const bool* mask_row = in.key_mask ? in.key_mask + b * s.keys : nullptr;

        for (int64_t t = seg.tile_begin; t < seg.tile_end; ++t) {
          const int64_t j0 = t * kt, tj = std::min(kt, s.keys - j0);
          bool all_masked;
          const acc_t* tile_bias = key_mask_bias(mask_row, j0, tj, bias.data(), all_masked);
          if (all_masked) continue;
          const KeyTile<acc_t> key_tile{j0, tj, tile_bias};
          tile.normalize(in, b, j0, tj);
          if (in.shortcut()) {
            Gemm::pack_transposed(tile.xn.data(), tile.c, tj, tile.c, k_packed.data());
            Gemm::pack_rows(tile.xn.data(), tile.c, tj, tile.c, v_packed.data());
          } else {
            tile.project(in, weights, tj);
          }
          for (int64_t h = 0; h < heads; ++h) {
            if (!in.shortcut()) {
              Gemm::pack_transposed(tile.k.data() + h * s.dim_qk, tile.hk, tj, s.dim_qk, k_packed.data());
              Gemm::pack_rows(tile.v.data() + h * dv, tile.hv, tj, dv, v_packed.data());
            }
            forward_tile(s, in.causal, loop, key_tile, q_rows.data() + h * n * dqk, dqk, k_packed.data(),
                         v_packed.data(), scale_log2, state(h), in.dropout, b * heads + h, scratch);
          }
        }

        for (int64_t h = 0; h < heads; ++h) {
          const int64_t head = b * heads + h;
          if (seg.slot < 0) {
            write_output(s, state(h), out + head * n * dv, lse + head * n);
          } else {
            slots.store(seg.slot * heads + h, state(h), n, dv);
          }
        }
      }
    }
    Gemm::release();
  });

  parallel_for(0, s.batch * heads, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      if (plan.slots_of_head[head / heads].empty()) continue;
      merge_slots(s, slots_of_head_in_batch_plan(plan, head, heads), slots, out + head * n * dv, lse + head * n);
    }
  });
}

template void input_attention_forward(const InputAttentionInputs<float>&, float*, float*);
template void input_attention_forward(const InputAttentionInputs<double>&, double*, float*);
template void input_attention_forward(const InputAttentionInputs<c10::BFloat16>&, c10::BFloat16*, float*);

}  // namespace perceiver_fast::cpu
