#include "phase_timer.h"

#include <atomic>

namespace perceiver_fast::cpu {
namespace {

std::atomic<bool> timing{false};
std::array<std::atomic<int64_t>, static_cast<int>(Phase::count)> totals{};

}  // namespace

void set_phase_timing(bool on) { timing.store(on); }
bool phase_timing() { return timing.load(std::memory_order_relaxed); }

void add_phase_nanoseconds(Phase phase, int64_t nanoseconds) {
  totals[static_cast<int>(phase)].fetch_add(nanoseconds, std::memory_order_relaxed);
}

std::array<int64_t, static_cast<int>(Phase::count)> take_phase_nanoseconds() {
  std::array<int64_t, static_cast<int>(Phase::count)> taken{};
  for (size_t p = 0; p < taken.size(); ++p) taken[p] = totals[p].exchange(0);
  return taken;
}

}  // namespace perceiver_fast::cpu
