// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// Ranks as threads for the sharded tests (test_cpu_shard*.cpp, tests/cuda/test_cuda_shard.cpp):
// an in-process all-reduce over a group of threads, a runner, and a rank's share of a batch
// (its vocabulary columns, its context slice of every sequence).
#pragma once

#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dpo/cpu/shard.hpp"
#include "oracle.hpp"

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

/// W x C ranks as threads: rank = c * W + t holds vocabulary shard t of context slice c. The
/// vocabulary groups (one per context slice) and context groups (one per shard), and each
/// rank's collectives over them (no context collective when C = 1).
class grid {
 public:
  grid(int W, int C) : W_(W), C_(C) {
    for (int c = 0; c < C; ++c) vocab_.emplace_back(W);
    for (int t = 0; t < W; ++t) context_.emplace_back(C);
  }

  /// Runs fn(rank, t, c, comm(rank)) on every rank's thread; returns each rank's dpo::error
  /// message (empty: none).
  template <class Fn>
  std::vector<std::string> run(Fn fn) {
    std::vector<std::string> errors(static_cast<std::size_t>(W_ * C_));
    run_ranks(W_ * C_, [&](int rank) {
      try {
        fn(rank, rank % W_, rank / W_, comm(rank));
      } catch (const dpo::error& e) {
        errors[static_cast<std::size_t>(rank)] = e.what();
      }
    });
    return errors;
  }

  dpo::cpu::collectives comm(int rank) {
    const int t = rank % W_, c = rank / W_;
    dpo::cpu::collectives m;
    m.vocab_max = [this, t, c](double* d, std::int64_t n) { vocab_[c].reduce(t, d, n, true); };
    m.vocab_sum = [this, t, c](double* d, std::int64_t n) { vocab_[c].reduce(t, d, n, false); };
    if (C_ > 1) m.context_sum = [this, t, c](double* d, std::int64_t n) { context_[t].reduce(c, d, n, false); };
    return m;
  }

 private:
  int W_, C_;
  std::deque<group> vocab_, context_;  // not movable: a deque never moves them
};

/// Boundaries of `world` uneven shards of V: each shard at least one column.
inline std::vector<std::int64_t> uneven(std::int64_t V, int world) {
  std::vector<std::int64_t> c{0};
  for (int t = 1; t < world; ++t) c.push_back(V * t * t / (world * world) + t);
  c.push_back(V);
  return c;
}

/// Row slice [k0, k1) of each sequence on context rank c of C: floor(n c / C).
inline std::int64_t cut(std::int64_t n, int c, int C) { return n * c / C; }

/// Shard sh's columns of a pair view: its logits start at column sh.start.
template <class T, class L>
dpo::pair_view<T, L> shard_of(dpo::pair_view<T, L> p, const dpo::vocab_shard& sh) {
  p.chosen.logits += sh.start;
  p.rejected.logits += sh.start;
  p.chosen.vocab = p.rejected.vocab = sh.width();
  return p;
}

/// Shard sh's columns of a gradient view.
template <class T>
dpo::pair_grad_view<T> shard_of(dpo::pair_grad_view<T> g, const dpo::vocab_shard& sh) {
  g.chosen += sh.start;
  g.rejected += sh.start;
  return g;
}

/// Context rank c's rows of every sequence of b (of C ranks: rows [cut(n, c, C), cut(n, c + 1, C))).
inline oracle::batch slice(const oracle::batch& b, int c, int C) {
  oracle::batch out;
  for (int side = 0; side < 2; ++side)
    for (const oracle::sequence& q : side == 0 ? b.chosen : b.rejected) {
      oracle::sequence s;
      for (std::int64_t t = cut(q.rows(), c, C); t < cut(q.rows(), c + 1, C); ++t) {
        s.z.push_back(q.z[t]);
        s.y.push_back(q.y[t]);
      }
      (side == 0 ? out.chosen : out.rejected).push_back(s);
    }
  return out;
}

/// The vocabulary of the sharded tests: prime, so no split is even.
inline constexpr std::int64_t kVocab = 37;

}  // namespace shard_ranks
