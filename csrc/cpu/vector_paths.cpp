#include "vector_paths.h"

#include <atomic>

namespace perceiver_fast::cpu {
namespace {

#if defined(__GNUC__) && defined(__x86_64__)
const bool has_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
const bool has_bf16 = has_avx512 && __builtin_cpu_supports("avx512bf16");
const bool has_bmi2 = has_avx512 && __builtin_cpu_supports("bmi2");
#else
const bool has_avx512 = false, has_bf16 = false, has_bmi2 = false;
#endif
std::atomic<bool> force_portable{false}, force_no_bf16{false};

}  // namespace

bool avx512_rows_supported() { return has_avx512; }
bool avx512_bf16_supported() { return has_bf16; }
bool avx512_bmi2_supported() { return has_bmi2; }

bool use_avx512_rows() { return has_avx512 && !force_portable.load(std::memory_order_relaxed); }
bool use_avx512_bf16_rows() {
  return has_bf16 && !force_portable.load(std::memory_order_relaxed) && !force_no_bf16.load(std::memory_order_relaxed);
}
void set_portable_rows(bool portable) { force_portable.store(portable); }
bool portable_rows_forced() { return force_portable.load(); }
void set_without_avx512_bf16(bool without) { force_no_bf16.store(without); }
bool without_avx512_bf16_forced() { return force_no_bf16.load(); }

}  // namespace perceiver_fast::cpu
