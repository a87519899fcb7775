#include "vector_paths.h"

#include <atomic>

#include "softmax_rows_avx512.h"

namespace perceiver_fast::cpu {
namespace {

const bool has_avx512 = avx512::supported();
std::atomic<bool> force_portable{false};

}  // namespace

bool use_avx512_rows() { return has_avx512 && !force_portable.load(std::memory_order_relaxed); }
void set_portable_rows(bool portable) { force_portable.store(portable); }
bool portable_rows_forced() { return force_portable.load(); }

}  // namespace perceiver_fast::cpu
