// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Ranks as threads for the sharded tests (test_cpu_shard*.cpp): an in-process all-reduce
// over a group of threads, and a runner.
#pragma once

#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace shard_ranks {

/// An in-process process group: reduce() is an all-reduce over the group's threads, each
/// rank adding the buffers in rank order, so every rank gets bitwise the same result.
class group {
 public:
  explicit group(int size) : size_(size), bufs_(static_cast<std::size_t>(size), nullptr) {}

  void reduce(int rank, double* data, std::int64_t n, bool max) {
    bufs_[static_cast<std::size_t>(rank)] = data;
    barrier();
    std::vector<double> out(static_cast<std::size_t>(n), max ? -INFINITY : 0.0);
    for (int k = 0; k < size_; ++k)
      for (std::int64_t i = 0; i < n; ++i) {
        const double x = bufs_[static_cast<std::size_t>(k)][i];
        out[i] = max ? (x > out[i] ? x : out[i]) : out[i] + x;
      }
    barrier();  // every rank has read every buffer
    std::copy(out.begin(), out.end(), data);
  }

 private:
  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

  int size_;
  std::vector<double*> bufs_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  long generation_ = 0;
};

/// Runs fn(rank) on `n` threads and joins them.
template <class Fn>
void run_ranks(int n, Fn fn) {
  std::vector<std::thread> ts;
  for (int k = 0; k < n; ++k) ts.emplace_back([&, k] { fn(k); });
  for (auto& t : ts) t.join();
}

}  // namespace shard_ranks
