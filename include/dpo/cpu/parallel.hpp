// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace dpo {
namespace cpu {
namespace detail {

/// The thread count to use: `requested` if > 0, else the hardware's (at least 1).
inline int resolve_threads(int requested) {
  if (requested > 0) return requested;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

/// Calls fn(begin, end) on static, contiguous slices of [0, n), one per thread. Every index
/// is handled by exactly one call and each call's work depends only on its indices, so
/// results do not depend on the thread count. Exceptions from workers are rethrown.
template <class Fn>
void parallel_for(std::int64_t n, int threads, Fn&& fn) {
  if (n <= 0) return;
  const std::int64_t t = std::max<std::int64_t>(1, std::min<std::int64_t>(resolve_threads(threads), n));
  if (t == 1) {
    fn(std::int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(t));
  pool.reserve(static_cast<std::size_t>(t - 1));
  auto run = [&](std::int64_t k) {
    try {
      fn(n * k / t, n * (k + 1) / t);
    } catch (...) {
      errors[static_cast<std::size_t>(k)] = std::current_exception();
    }
  };
  for (std::int64_t k = 1; k < t; ++k) pool.emplace_back(run, k);
  run(0);
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace detail
}  // namespace cpu
}  // namespace dpo
