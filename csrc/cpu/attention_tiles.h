// The work of one key tile for one head, shared by the plain kernels (attention_*.cpp), whose K and
// V tiles are slices of k and v, and the fused input kernels (input_attention_*.cpp), which
// normalise and project them from x first. Callers pack K and V (tile_gemm.h layouts) and keep the
// per-head row state; these functions run the GEMMs and softmax over the query rows that see the tile.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "attention_loops.h"
#include "dropout.h"
#include "phase_timer.h"
#include "softmax_rows.h"
#include "tile_gemm.h"

namespace perceiver_fast::cpu {

template <typename acc_t>
constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

// Keys [start, start + count) of a head and their mask bias (null: none of them is masked).
template <typename acc_t>
struct KeyTile {
  int64_t start, count;
  const acc_t* bias;
};

// The dropout of one head's rows over a key tile: its keep bits, a row at a time, into `words`.
template <typename acc_t>
struct TileDropout {
  const Dropout& dropout;
  int64_t head;  // flattened b * H + h
  std::vector<uint64_t>& words;

  KeepRow<acc_t> row(int64_t row, int64_t key_start, int64_t keys) const {
    if (!dropout.active()) return {};
    dropout_keep_bits(dropout, head, row, key_start, keys, words.data());
    return {words.data(), static_cast<acc_t>(1.0 / (1.0 - dropout.p))};
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

// Online-softmax state of one head's query rows: unnormalized output, running max (base 2), sum.
template <typename acc_t>
struct RowState {
  acc_t* acc;
  acc_t* max;
  acc_t* sum;

  void reset(int64_t rows, int64_t dim_v) const {
    std::fill(acc, acc + rows * dim_v, acc_t(0));
    std::fill(max, max + rows, neg_inf<acc_t>);
    std::fill(sum, sum + rows, acc_t(0));
  }
};

// T in the scratch buffers and tile functions: the GEMM operand type (TileGemm), which the kernels'
// input type is converted to (HeadRows names both).
template <typename T>
struct ForwardScratch {
  using acc_t = acc_type<T>;
  // float32 probabilities overwrite their scores in place; bfloat16 ones go to their own buffer,
  // and split ones are written there from the float32 row.
  static constexpr bool probs_in_place = std::is_same_v<T, acc_t>;
  std::vector<acc_t> scores;
  std::vector<T> probs;
  std::vector<uint64_t> keep;  // one row's dropout keep bits

  explicit ForwardScratch(const LoopSizes& loop)
      : scores(loop.row_block * loop.key_tile),
        probs(probs_in_place ? 0 : loop.row_block * TileGemm<T>::padded_k(loop.key_tile)),
        keep(keep_words(loop.key_tile)) {}
};

// Folds one key tile into the state of every query row that sees it. q_rows: the head's queries,
// rows q_ld apart (q_ld = padded dim_qk); k_packed: K^T of the tile, v_packed: V of the tile;
// head: the flattened b * H + h whose dropout mask applies.
template <typename T>
void forward_tile(const Shape& s, bool causal, const LoopSizes& loop, const KeyTile<acc_type<T>>& tile,
                  const T* q_rows, int64_t q_ld, const T* k_packed, const T* v_packed, acc_type<T> scale_log2,
                  const RowState<acc_type<T>>& state, const Dropout& dropout, int64_t head,
                  ForwardScratch<T>& scratch) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  const int64_t n = s.queries, dv = s.dim_v, rb = loop.row_block, tj = tile.count, tjk = Gemm::padded_k(tj);
  const TileDropout<acc_t> dropped{dropout, head, scratch.keep};
  for (int64_t r0 = first_row_seeing(s, causal, tile.start); r0 < n; r0 += rb) {
    const int64_t rows = std::min(rb, n - r0);
    acc_t* scores = scratch.scores.data();
    {
      PhaseScope timed(Phase::gemm);
      Gemm::multiply(rows, tj, q_ld, q_rows + r0 * q_ld, q_ld, k_packed, scores, tj, false);
    }
    T* probs;
    if constexpr (ForwardScratch<T>::probs_in_place) probs = scores; else probs = scratch.probs.data();
    {
      PhaseScope timed(Phase::softmax);
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t row = r0 + i, seen = keys_seen(s, causal, row, tile.start, tj);
        acc_t alpha;
        if constexpr (std::is_same_v<T, SplitBF16>) {
          acc_t* row_probs = scores + i * tj;
          alpha = softmax_forward_step(row_probs, row_probs, seen, tj, scale_log2, tile.bias, state.max[row],
                                       state.sum[row], dropped.row(row, tile.start, seen));
          convert_row(row_probs, tj, probs + i * tjk);
          std::fill(probs + i * tjk + tj, probs + (i + 1) * tjk, T());
        } else {
          alpha = softmax_forward_step(scores + i * tj, probs + i * tjk, seen, tjk, scale_log2, tile.bias,
                                       state.max[row], state.sum[row], dropped.row(row, tile.start, seen));
        }
        if (alpha != acc_t(1)) {
          acc_t* acc_row = state.acc + row * dv;
          for (int64_t d = 0; d < dv; ++d) acc_row[d] *= alpha;
        }
      }
    }
    PhaseScope timed(Phase::gemm);
    Gemm::multiply(rows, dv, tjk, probs, tjk, v_packed, state.acc + r0 * dv, dv, true);
  }
}

// out = acc / sum, lse = ln(sum) + max; a row that saw no key gets 0 and -inf.
template <typename T, typename acc_t>
void write_output(const Shape& s, const RowState<acc_t>& state, T* out, float* lse) {
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

// Partial row states of the segments of a split head, slot after slot (slot s at s * rows).
template <typename acc_t>
struct SlotStates {
  std::vector<acc_t> acc, max, sum;

  SlotStates(int64_t slots, int64_t rows, int64_t dim_v) : acc(slots * rows * dim_v), max(slots * rows), sum(slots * rows) {}

  void store(int64_t slot, const RowState<acc_t>& state, int64_t rows, int64_t dim_v) {
    std::copy_n(state.acc, rows * dim_v, acc.begin() + slot * rows * dim_v);
    std::copy_n(state.max, rows, max.begin() + slot * rows);
    std::copy_n(state.sum, rows, sum.begin() + slot * rows);
  }
};

// Combines the partial states of one head's slots into its output.
template <typename T, typename acc_t>
void merge_slots(const Shape& s, const std::vector<int64_t>& slots, const SlotStates<acc_t>& parts, T* out,
                 float* lse) {
  const int64_t n = s.queries, dv = s.dim_v;
  std::vector<acc_t> acc(n * dv, acc_t(0)), max(n, neg_inf<acc_t>), sum(n, acc_t(0));
  for (int64_t i = 0; i < n; ++i) {
    // A slot's NaN max (a NaN score) must reach the row: std::max would drop it.
    for (int64_t slot : slots) {
      const acc_t m = parts.max[slot * n + i];
      max[i] = std::isnan(m) ? m : std::max(max[i], m);
    }
    if (max[i] == neg_inf<acc_t>) continue;
    for (int64_t slot : slots) {
      const acc_t m = parts.max[slot * n + i];
      if (m == neg_inf<acc_t>) continue;
      const acc_t w = std::exp2(m - max[i]);
      sum[i] += w * parts.sum[slot * n + i];
      const acc_t* part = parts.acc.data() + (slot * n + i) * dv;
      for (int64_t d = 0; d < dv; ++d) acc[i * dv + d] += w * part[d];
    }
  }
  write_output(s, RowState<acc_t>{acc.data(), max.data(), sum.data()}, out, lse);
}

// ---------------------------------------------------------------------------------------------
// Backward
//
// Per tile and row block (S, P, dP, dS are rows x tile_keys):
//   S = Q K^T, dP = dO V^T, P = exp2(S*scale_log2 - lse2), dS = P (dP - delta) scale
//   dV^T += dO^T P,  dK^T += Q^T dS,  dQ += dS K
// dK and dV are accumulated transposed so that every GEMM's B operand is a row-major block that
// is already in memory (P and dS rows).

// One head's query-side operands (of the kernels' input type T, loaded once per segment as GEMM
// operands of type P), and its dq accumulator.
template <typename T, typename P = T>
struct HeadRows {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<P>;
  int64_t n, dqk, dv, dqk_p, dv_p, n_p;
  std::vector<P> q_rows, do_rows, q_t, do_t;  // n x dqk_p, n x dv_p, dqk x n_p, dv x n_p
  std::vector<acc_t> lse2, delta, dq;         // n, n, n x dqk

  // Transposed Q and dO are A operands whose depth runs over query rows: n_p pads them so that a
  // padded row block never reads past the end.
  HeadRows(const Shape& s)
      : n(s.queries), dqk(s.dim_qk), dv(s.dim_v), dqk_p(Gemm::padded_k(dqk)), dv_p(Gemm::padded_k(dv)), n_p(n + 2),
        q_rows(n * dqk_p, P()), do_rows(n * dv_p, P()), q_t(dqk * n_p, P()), do_t(dv * n_p, P()), lse2(n),
        delta(n), dq(n * dqk) {}

  // out_head: the forward's output of the head (n x dv contiguous); lse_head its lse.
  void load(const Strided<const T>& q, const Strided<const T>& dout, int64_t b, int64_t h, const T* out_head,
            const float* lse_head) {
    for (int64_t i = 0; i < n; ++i) {
      const T* q_row = q.row(b, h, i);
      const T* do_row = dout.row(b, h, i);
      std::copy_n(q_row, dqk, q_rows.data() + i * dqk_p);
      std::copy_n(do_row, dv, do_rows.data() + i * dv_p);
      for (int64_t d = 0; d < dqk; ++d) q_t[d * n_p + i] = q_row[d];
      acc_t dot = 0;
      for (int64_t d = 0; d < dv; ++d) {
        do_t[d * n_p + i] = do_row[d];
        dot += static_cast<acc_t>(do_row[d]) * static_cast<acc_t>(out_head[i * dv + d]);
      }
      delta[i] = dot;
      lse2[i] = static_cast<acc_t>(lse_head[i]) * acc_t(M_LOG2E);
    }
    std::fill(dq.begin(), dq.end(), acc_t(0));
  }
};

template <typename T>
struct BackwardScratch {
  using acc_t = acc_type<T>;
  // float32/64: P and dS are used as GEMM operands where they are; bfloat16 and split pack copies.
  static constexpr bool operands_in_place = std::is_same_v<T, acc_t>;
  std::vector<acc_t> scores, dprobs;
  std::vector<T> p_packed, ds_packed, ds_rows;
  std::vector<uint64_t> keep;  // one row's dropout keep bits

  explicit BackwardScratch(const LoopSizes& loop) : keep(keep_words(loop.key_tile)) {
    using Gemm = TileGemm<T>;
    const int64_t kt = loop.key_tile, rb = loop.row_block;
    scores.resize(rb * kt);
    dprobs.resize(rb * kt);
    if (!operands_in_place) {
      p_packed.resize(Gemm::padded_k(rb) * kt);
      ds_packed.resize(Gemm::padded_k(rb) * kt);
      ds_rows.resize(rb * Gemm::padded_k(kt));
    }
  }
};

// Gradients of one tile for one head: writes dK^T (dim_qk x tile.count) to dk_t and dV^T to dv_t
// (rows ld_t apart), and adds the tile's share of dQ to rows.dq. k_packed_t / v_packed_t: packed
// K^T and V^T of the tile; k_packed: packed K rows; head: the flattened b * H + h whose dropout mask
// applies.
template <typename In, typename T>
void backward_tile(const Shape& s, bool causal, const LoopSizes& loop, const KeyTile<acc_type<T>>& tile,
                   HeadRows<In, T>& rows, const T* k_packed_t, const T* v_packed_t, const T* k_packed, double scale,
                   acc_type<T>* dk_t, acc_type<T>* dv_t, int64_t ld_t, const Dropout& dropout, int64_t head,
                   BackwardScratch<T>& scratch) {
  using acc_t = acc_type<T>;
  using Gemm = TileGemm<T>;
  const int64_t n = s.queries, dqk = s.dim_qk, dv = s.dim_v, rb = loop.row_block;
  const int64_t tj = tile.count, tjk = Gemm::padded_k(tj);
  const acc_t scale_a = static_cast<acc_t>(scale), scale_log2 = static_cast<acc_t>(scale * M_LOG2E);
  const TileDropout<acc_t> dropped{dropout, head, scratch.keep};
  bool first_block = true;
  for (int64_t r0 = first_row_seeing(s, causal, tile.start); r0 < n; r0 += rb) {
    const int64_t count = std::min(rb, n - r0), count_k = Gemm::padded_k(count);
    acc_t* scores = scratch.scores.data();
    acc_t* dprobs = scratch.dprobs.data();
    {
      PhaseScope timed(Phase::gemm);
      Gemm::multiply(count, tj, rows.dqk_p, rows.q_rows.data() + r0 * rows.dqk_p, rows.dqk_p, k_packed_t, scores,
                     tj, false);
      Gemm::multiply(count, tj, rows.dv_p, rows.do_rows.data() + r0 * rows.dv_p, rows.dv_p, v_packed_t, dprobs, tj,
                     false);
    }
    {
      PhaseScope timed(Phase::softmax);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t row = r0 + i, seen = keys_seen(s, causal, row, tile.start, tj);
        softmax_backward_step(scores + i * tj, dprobs + i * tj, seen, tj, scale_log2, tile.bias, rows.lse2[row],
                              rows.delta[row], scale_a, dropped.row(row, tile.start, seen));
      }
    }
    const T *p_operand, *ds_operand, *ds_a;
    if constexpr (BackwardScratch<T>::operands_in_place) {
      p_operand = scores;
      ds_operand = ds_a = dprobs;
    } else {
      PhaseScope timed(Phase::convert);
      Gemm::pack_rows(scores, tj, count, tj, scratch.p_packed.data());
      Gemm::pack_rows(dprobs, tj, count, tj, scratch.ds_packed.data());
      for (int64_t i = 0; i < count; ++i) {
        T* dst = scratch.ds_rows.data() + i * tjk;
        convert_row(dprobs + i * tj, tj, dst);
        std::fill(dst + tj, dst + tjk, T(0));
      }
      p_operand = scratch.p_packed.data();
      ds_operand = scratch.ds_packed.data();
      ds_a = scratch.ds_rows.data();
    }
    PhaseScope timed(Phase::gemm);
    Gemm::multiply(dv, tj, count_k, rows.do_t.data() + r0, rows.n_p, p_operand, dv_t, ld_t, !first_block);
    Gemm::multiply(dqk, tj, count_k, rows.q_t.data() + r0, rows.n_p, ds_operand, dk_t, ld_t, !first_block);
    Gemm::multiply(count, dqk, tjk, ds_a, tjk, k_packed, rows.dq.data() + r0 * dqk, dqk, true);
    first_block = false;
  }
  if (first_block) {  // no row sees the tile
    for (int64_t d = 0; d < dv; ++d) std::fill_n(dv_t + d * ld_t, tj, acc_t(0));
    for (int64_t d = 0; d < dqk; ++d) std::fill_n(dk_t + d * ld_t, tj, acc_t(0));
  }
}

// Sums the dq of a split head's slots (slot s at s * n * dim_qk) into dq_head.
template <typename T, typename acc_t>
void sum_dq_slots(const std::vector<int64_t>& slots, const std::vector<acc_t>& slot_dq, int64_t size, T* dq_head) {
  std::vector<acc_t> total(size, acc_t(0));
  for (int64_t slot : slots) {
    const acc_t* part = slot_dq.data() + slot * size;
    for (int64_t x = 0; x < size; ++x) total[x] += part[x];
  }
  for (int64_t x = 0; x < size; ++x) dq_head[x] = static_cast<T>(total[x]);
}

}  // namespace perceiver_fast::cpu
