#include "vector_paths.h"

#include <atomic>
#include <stdexcept>

namespace perceiver_fast::cpu {
namespace {

struct Features {
  Isa isa = Isa::portable;
  bool bmi2 = false;
};

// Asked on first use, not by a namespace-scope initializer: those of other files (which read these
// answers) may run first, and __builtin_cpu_supports needs __builtin_cpu_init before main.
const Features& features() {
  static const Features found = [] {
    Features f;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f.isa = Isa::simd;
    if (f.isa == Isa::simd && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      f.isa = Isa::avx512;
      if (__builtin_cpu_supports("avx512bf16")) f.isa = Isa::avx512_bf16;
    }
    f.bmi2 = __builtin_cpu_supports("bmi2");
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
    f.isa = Isa::simd;  // NEON is part of the aarch64 baseline
#endif
    return f;
  }();
  return found;
}

constexpr int kNoCap = 1 << 30;
std::atomic<int> cap{kNoCap};

}  // namespace

const std::vector<std::string>& isa_names() {
#if defined(__aarch64__)
  static const std::vector<std::string> names = {"portable", "neon"};
#else
  static const std::vector<std::string> names = {"portable", "avx2", "avx512", "avx512_bf16"};
#endif
  return names;
}

Isa detected_isa() { return features().isa; }

Isa active_isa() {
  const int level = static_cast<int>(features().isa), limit = cap.load(std::memory_order_relaxed);
  return static_cast<Isa>(level < limit ? level : limit);
}

void set_isa_cap(const std::string& name) {
  const auto& names = isa_names();
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == name) {
      cap.store(static_cast<int>(i));
      return;
    }
  }
  if (name == "none") {
    cap.store(kNoCap);
    return;
  }
  std::string choices;
  for (const auto& n : names) choices += n + ", ";
  throw std::invalid_argument("unknown instruction set '" + name + "' for this build's CPU architecture; expected one of " +
                              choices + "or none");
}

std::string isa_cap() {
  const int limit = cap.load();
  return limit == kNoCap ? "none" : isa_names()[limit];
}

bool use_avx512_philox() { return use_avx512_rows() && features().bmi2; }

}  // namespace perceiver_fast::cpu
