#include "vector_paths.h"

#include <atomic>

#include "softmax_rows_avx512.h"

namespace perceiver_fast::cpu {
namespace {

bool cpu_has_avx512() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const bool has_avx512 = cpu_has_avx512();
const bool has_avx512_bf16 = avx512::supported();
std::atomic<bool> force_portable{false};

}  // namespace

bool avx512_rows_supported() { return has_avx512; }
bool use_avx512_rows() { return has_avx512 && !force_portable.load(std::memory_order_relaxed); }
bool use_avx512_bf16_rows() { return has_avx512_bf16 && !force_portable.load(std::memory_order_relaxed); }
void set_portable_rows(bool portable) { force_portable.store(portable); }
bool portable_rows_forced() { return force_portable.load(); }

}  // namespace perceiver_fast::cpu
