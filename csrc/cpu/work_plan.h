// Split of the key axis across workers: every (batch*head, key tile) pair is one unit of work,
// units are laid out head after head and cut into `workers` contiguous ranges of equal cost.
// A worker's range becomes segments (one head, a run of its tiles). A segment holding every tile
// of its head writes its result directly; the others leave a partial result in a numbered slot,
// and a merge pass combines the slots of each head.
#pragma once

#include <cstdint>
#include <vector>

namespace perceiver_fast::cpu {

struct Segment {
  int64_t head;  // flattened batch * heads index
  int64_t tile_begin, tile_end;
  int64_t slot;  // -1: the segment covers the whole head
};

struct WorkPlan {
  std::vector<std::vector<Segment>> segments_of_worker;
  std::vector<std::vector<int64_t>> slots_of_head;  // empty for heads done in one segment
  int64_t num_slots = 0;
};

// tile_cost[t]: relative cost of tile t of any head (rows that see it under causal masking).
WorkPlan plan_work(int64_t heads, const std::vector<int64_t>& tile_cost, int64_t workers);

// For a plan over batch items whose units carry all `heads` heads (the fused input kernels),
// where slot s holds head h's partial state at s * heads + h: those of flattened head `head`.
inline std::vector<int64_t> slots_of_head_in_batch_plan(const WorkPlan& plan, int64_t head, int64_t heads) {
  std::vector<int64_t> slots;
  for (int64_t slot : plan.slots_of_head[head / heads]) slots.push_back(slot * heads + head % heads);
  return slots;
}

}  // namespace perceiver_fast::cpu
