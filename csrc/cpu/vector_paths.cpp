#include "vector_paths.h"

#include <atomic>

namespace perceiver_fast::cpu {
namespace {

struct Features {
  bool avx512 = false, bf16 = false, bmi2 = false;
};

// Asked on first use, not by a namespace-scope initializer: those of other files (which read these
// answers) may run first, and __builtin_cpu_supports needs __builtin_cpu_init before main.
const Features& features() {
  static const Features found = [] {
    Features f;
#if defined(__GNUC__) && defined(__x86_64__)
    __builtin_cpu_init();
    f.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    f.bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
    f.bmi2 = f.avx512 && __builtin_cpu_supports("bmi2");
#endif
    return f;
  }();
  return found;
}

std::atomic<bool> force_portable{false}, force_no_bf16{false};

}  // namespace

bool avx512_rows_supported() { return features().avx512; }
bool avx512_bf16_supported() { return features().bf16; }
bool avx512_bmi2_supported() { return features().bmi2; }

bool use_avx512_rows() { return features().avx512 && !force_portable.load(std::memory_order_relaxed); }
bool use_avx512_bf16_rows() {
  return features().bf16 && !force_portable.load(std::memory_order_relaxed) && !force_no_bf16.load(std::memory_order_relaxed);
}
void set_portable_rows(bool portable) { force_portable.store(portable); }
bool portable_rows_forced() { return force_portable.load(); }
void set_without_avx512_bf16(bool without) { force_no_bf16.store(without); }
bool without_avx512_bf16_forced() { return force_no_bf16.load(); }

}  // namespace perceiver_fast::cpu
