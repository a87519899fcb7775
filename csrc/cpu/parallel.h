// The kernels' one parallel loop: at::parallel_for, except where this extension is compiled without
// OpenMP against a torch that uses it (Apple clang without libomp): ATen's OpenMP loop then runs
// serially, so the range is split over std::threads here, as many as torch's intra-op threads.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace perceiver_fast::cpu {

template <class F>
void parallel_for(int64_t begin, int64_t end, const F& f) {
#if defined(_OPENMP) || !AT_PARALLEL_OPENMP
  at::parallel_for(begin, end, 1, f);
#else
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), end - begin);
  if (workers <= 1) {
    if (begin < end) f(begin, end);
    return;
  }
  const int64_t chunk = (end - begin + workers - 1) / workers;
  std::exception_ptr error;
  std::mutex error_lock;
  std::vector<std::thread> threads;
  for (int64_t first = begin; first < end; first += chunk) {
    threads.emplace_back([&, first] {
      try {
        f(first, std::min(end, first + chunk));
      } catch (...) {
        std::lock_guard<std::mutex> guard(error_lock);
        if (!error) error = std::current_exception();
      }
    });
  }
  for (auto& thread : threads) thread.join();
  if (error) std::rethrow_exception(error);
#endif
}

}  // namespace perceiver_fast::cpu
