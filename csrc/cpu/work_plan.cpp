#include "work_plan.h"

#include <algorithm>

namespace perceiver_fast::cpu {

WorkPlan plan_work(int64_t heads, const std::vector<int64_t>& tile_cost, int64_t workers) {
  const int64_t tiles = static_cast<int64_t>(tile_cost.size());
  int64_t head_cost = 0;
  for (int64_t c : tile_cost) head_cost += std::max<int64_t>(c, 1);
  const int64_t total = head_cost * heads;
  workers = std::max<int64_t>(1, std::min(workers, heads * tiles));

  WorkPlan plan;
  plan.segments_of_worker.resize(workers);
  plan.slots_of_head.resize(heads);
  // Walk all units in order; a worker takes units until its share of the cost is reached.
  int64_t worker = 0, spent = 0;
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t t = 0; t < tiles; ++t) {
      auto& segments = plan.segments_of_worker[worker];
      if (segments.empty() || segments.back().head != h) {
        segments.push_back({h, t, t + 1, -1});
      } else {
        segments.back().tile_end = t + 1;
      }
      spent += std::max<int64_t>(tile_cost[t], 1);
      // Worker w owns cost up to total * (w + 1) / workers.
      if (worker + 1 < workers && spent * workers >= total * (worker + 1)) ++worker;
    }
  }
  for (auto& segments : plan.segments_of_worker) {
    for (auto& s : segments) {
      if (s.tile_begin == 0 && s.tile_end == tiles) continue;
      s.slot = plan.num_slots++;
      plan.slots_of_head[s.head].push_back(s.slot);
    }
  }
  return plan;
}

}  // namespace perceiver_fast::cpu
