// Where the attention kernels' time goes, by phase, when a caller asks for it (the benchmark
// engine's breakdown): each scope adds its steady-clock nanoseconds to its phase's counter, summed
// over threads. Off by default, when a scope costs one relaxed atomic load. Scopes sit around
// per-tile steps (microseconds each), never around per-element work.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>

namespace perceiver_fast::cpu {

enum class Phase : int {
  load,      // a head's query-side rows in (forward queries; backward q, dO, their transposes, delta)
  pack,      // K and V tiles packed for the GEMMs
  gemm,      // the GEMMs
  softmax,   // the online-softmax / backward row steps (bfloat16: P converted in the same pass)
  convert,   // backward, bfloat16: P and dS packed as GEMM operands
  store,     // results out: out and lse, dk and dv of a tile, dq of a head
  merge,     // the partial states of split heads combined (forward), their dq summed (backward)
  key_rows,  // the few-query forward's in-place scores and sums (csrc/cpu/key_rows.h)
  count
};

inline constexpr std::array<const char*, static_cast<int>(Phase::count)> kPhaseNames = {
    "load", "pack", "gemm", "softmax", "convert", "store", "merge", "key_rows"};

void set_phase_timing(bool on);
bool phase_timing();
void add_phase_nanoseconds(Phase phase, int64_t nanoseconds);
// Nanoseconds per phase, summed over threads, since the last call; resets them.
std::array<int64_t, static_cast<int>(Phase::count)> take_phase_nanoseconds();

class PhaseScope {
 public:
  explicit PhaseScope(Phase phase) : phase_(phase), on_(phase_timing()), start_(on_ ? now() : 0) {}
  ~PhaseScope() {
    if (on_) add_phase_nanoseconds(phase_, now() - start_);
  }
  PhaseScope(const PhaseScope&) = delete;
  PhaseScope& operator=(const PhaseScope&) = delete;

 private:
  static int64_t now() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }
  Phase phase_;
  bool on_;
  int64_t start_;
};

}  // namespace perceiver_fast::cpu
