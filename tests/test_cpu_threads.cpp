// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU thread pool (dpo/cpu/parallel.hpp): the thread-count rule, static slices, bitwise
// identical results for 1 to 256 threads, exceptions from slices, concurrent and nested
// calls, and workers that fail to start (issues 16 and 17).
#include <Eigen/Core>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "checks.hpp"
#include "fixtures.hpp"

// After the library's headers, which say whether fork handling is compiled in.
#if DPO_DETAIL_HAS_ATFORK
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <iostream>
#endif

using dpo::cpu::detail::parallel_for;
using dpo::cpu::detail::thread_pool;
using fixture::config_named;
using fixture::layout;

namespace {

// More threads than this machine has cores, through the documented override, so that 64 and
// 256 threads really run as 64 and 256. Set before main (the library reads it once), unless
// the environment sets it: DPO_THREAD_LIMIT=16 runs these tests where 256 threads cannot start.
const bool limit_preset = std::getenv("DPO_THREAD_LIMIT") != nullptr;
const bool limit_set = test_support::preset_thread_limit("300");

int limit() { return dpo::cpu::detail::thread_limit(); }

/// Everything one run of forward, backward and sequence_logps writes.
template <class T>
using outputs = fixture::run_outputs<T>;

/// One run on `threads` threads, row stride + 1.
template <class T>
outputs<T> run_all(const fixture::named_config& nc, const oracle::batch& b, const fixture::reference& ref,
                   layout k, int threads) {
  return fixture::run_all<T>(nc, b, ref, k, 1, threads);
}

bool same_bytes(const void* a, const void* b, std::size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }

template <class T>
bool same(const outputs<T>& a, const outputs<T>& b) {
  const auto vec = [](const Eigen::VectorXd& x, const Eigen::VectorXd& y) {
    return x.size() == y.size() && same_bytes(x.data(), y.data(), sizeof(double) * x.size());
  };
  const auto sv = [](const auto& x, const auto& y) {
    return x.size() == y.size() && same_bytes(x.data(), y.data(), sizeof(x[0]) * x.size());
  };
  return same_bytes(&a.r.loss, &b.r.loss, sizeof(double)) &&
         same_bytes(&a.r.metrics, &b.r.metrics, sizeof(a.r.metrics)) && vec(a.r.losses, b.r.losses) &&
         vec(a.r.chosen_logps, b.r.chosen_logps) && vec(a.r.rejected_logps, b.r.rejected_logps) &&
         vec(a.r.grad_chosen, b.r.grad_chosen) && vec(a.r.grad_rejected, b.r.grad_rejected) &&
         vec(a.r.weights, b.r.weights) && sv(a.grad, b.grad) && sv(a.grad_r, b.grad_r) && sv(a.sums, b.sums) &&
         sv(a.tok, b.tok);
}

/// A batch with more than 256 rows per side, so that 256 threads get 256 slices.
template <class T>
oracle::batch big_batch(std::uint64_t seed) {
  fixture::batch_spec sp = fixture::spec(4, 70, 131, seed);
  oracle::batch b = fixture::random_batch(sp);
  fixture::round_batch<T>(b);
  return b;
}

/// Makes every worker start fail from the (ok+1)-th on, as std::thread does when the system
/// is out of threads or memory; restores the hook when it goes out of scope.
struct failing_starts {
  static std::atomic<int>& left() {
    static std::atomic<int> n{0};
    return n;
  }
  static void hook() {
    if (left().fetch_sub(1) <= 0) throw std::system_error(std::make_error_code(std::errc::resource_unavailable_try_again));
  }
  explicit failing_starts(int ok) {
    left() = ok;
    dpo::cpu::detail::before_thread_start = &hook;
  }
  ~failing_starts() { dpo::cpu::detail::before_thread_start = nullptr; }
};

}  // namespace

TEST_CASE("thread count: 0 is the hardware's, capped at the limit (hardware unless DPO_THREAD_LIMIT)", "[threads]") {
  using dpo::cpu::detail::resolve_threads;
  CHECK(resolve_threads(0, 8, 8) == 8);
  CHECK(resolve_threads(-3, 8, 8) == 8);
  CHECK(resolve_threads(3, 8, 8) == 3);
  CHECK(resolve_threads(256, 2, 2) == 2);     // no override: capped at the hardware threads
  CHECK(resolve_threads(256, 2, 300) == 256);  // DPO_THREAD_LIMIT=300 allows more
  CHECK(resolve_threads(0, 2, 300) == 2);      // 0 stays the hardware's
  CHECK(resolve_threads(0, 64, 4) == 4);       // and a lower limit caps it
  REQUIRE(limit_set);
  if (!limit_preset) CHECK(limit() == 300);
  CHECK(dpo::cpu::detail::resolve_threads(100000) == limit());
}

TEST_CASE("slices are [n*k/t, n*(k+1)/t), each index exactly once", "[threads]") {
  for (std::int64_t n : {0, 1, 5, 255, 256, 1000}) {
    for (int threads : {1, 2, 3, 7, 64, 256}) {
      INFO("n = " << n << ", threads = " << threads);
      std::mutex m;
      std::vector<std::pair<std::int64_t, std::int64_t>> got;
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      parallel_for(n, threads, [&](std::int64_t b, std::int64_t e) {
        for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)]++;
        std::lock_guard<std::mutex> lock(m);
        got.emplace_back(b, e);
      });
      std::sort(got.begin(), got.end());
      const std::int64_t t = std::min<std::int64_t>(std::min(threads, limit()), n);
      std::vector<std::pair<std::int64_t, std::int64_t>> want;
      for (std::int64_t k = 0; k < t; ++k) want.emplace_back(n * k / t, n * (k + 1) / t);
      CHECK(got == want);
      CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; }));
    }
  }
}

TEST_CASE("parallel_blocks: blocks of the grain, each index once; all run, the lowest block's exception wins",
          "[threads]") {
  using dpo::cpu::detail::parallel_blocks;
  for (std::int64_t n : {0, 1, 5, 255, 1000}) {
    for (int threads : {1, 2, 7, 64}) {
      for (std::int64_t grain : {0, 1, 3, 64}) {
        INFO("n = " << n << ", threads = " << threads << ", grain = " << grain);
        std::mutex m;
        std::vector<std::pair<std::int64_t, std::int64_t>> got;
        std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
        parallel_blocks(
            n, threads,
            [&](std::int64_t b, std::int64_t e) {
              for (std::int64_t i = b; i < e; ++i) hits[static_cast<std::size_t>(i)]++;
              std::lock_guard<std::mutex> lock(m);
              got.emplace_back(b, e);
            },
            grain);
        std::sort(got.begin(), got.end());
        const std::int64_t g =
            grain > 0 ? grain : std::max<std::int64_t>(1, n / (16 * std::min(threads, limit())));
        std::vector<std::pair<std::int64_t, std::int64_t>> want;
        for (std::int64_t b = 0; b < n; b += g) want.emplace_back(b, std::min(n, b + g));
        CHECK(got == want);
        CHECK(std::all_of(hits.begin(), hits.end(), [](const std::atomic<int>& h) { return h == 1; }));
      }
    }
  }
  for (int threads : {1, 2, 7}) {
    INFO("threads " << threads);
    std::atomic<std::int64_t> visited{0};
    try {
      parallel_blocks(
          100, threads,
          [&](std::int64_t b, std::int64_t e) {
            visited += e - b;
            if (b == 30) throw dpo::error("block 3");
            if (b > 30) throw std::runtime_error("later");
          },
          10);
      FAIL("no error");
    } catch (const dpo::error& e) {
      CHECK(std::string(e.what()) == "block 3");
    }
    CHECK(visited == 100);
  }
}

TEST_CASE("results are bitwise identical for 1, 2, 3, 7, 64 and 256 threads", "[threads]") {
  const auto check = [](const char* name, auto tag, layout k) {
    using T = decltype(tag);
    INFO(name << " " << fixture::name_of(k));
    const auto& nc = config_named(name);
    const oracle::batch b = big_batch<T>(80);
    const fixture::reference ref = fixture::make_reference(nc.cfg, b, 8);
    const outputs<T> first = run_all<T>(nc, b, ref, k, 1);
    for (int threads : {2, 3, 7, 64, 256}) {
      INFO("threads " << threads);
      CHECK(same(run_all<T>(nc, b, ref, k, threads), first));
    }
  };
  check("sigmoid", float{}, layout::padded);
  check("mpo+wpo", Eigen::bfloat16{}, layout::packed);
  check("sigmoid", double{}, layout::separate);
}

TEST_CASE("the workers persist: repeated calls start no new threads", "[threads]") {
  std::atomic<std::int64_t> sum{0};
  parallel_for(64, 8, [&](std::int64_t b, std::int64_t e) { sum += e - b; });
  const std::size_t started = thread_pool::instance().size();
  CHECK(started >= static_cast<std::size_t>(std::min(7, limit() - 1)));
  for (int i = 0; i < 50; ++i) parallel_for(64, 8, [&](std::int64_t b, std::int64_t e) { sum += e - b; });
  CHECK(sum == 51 * 64);
  CHECK(thread_pool::instance().size() == started);
  CHECK(started <= static_cast<std::size_t>(limit() - 1));
}

TEST_CASE("an exception in a slice reaches the caller, the lowest slice's first; the pool works after", "[threads]") {
  for (int threads : {2, 7, 64}) {
    INFO("threads " << threads);
    std::atomic<std::int64_t> visited{0};
    // Every slice but the first throws (the first too when it is the only one): the lowest
    // one's exception is rethrown, whichever thread finished first.
    const std::int64_t n = 4 * threads, t = std::min(threads, limit());
    const std::int64_t first = std::min<std::int64_t>(1, t - 1);
    bool caught = false;
    try {
      parallel_for(n, threads, [&](std::int64_t b, std::int64_t e) {
        visited += e - b;
        if (b == n * first / t) throw dpo::error("first");
        if (b > n * first / t) throw std::runtime_error("later");
      });
    } catch (const dpo::error& e) {
      caught = true;
      CHECK(std::string(e.what()) == "first");
    }
    CHECK(caught);
    CHECK(visited == n);  // the other slices still ran
    std::atomic<std::int64_t> sum{0};
    parallel_for(1000, threads, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) sum += i;
    });
    CHECK(sum == 999 * 1000 / 2);
  }
  // Through the library: a forward pass after a failed parallel call is still exact.
  const auto& nc = config_named("sigmoid");
  const oracle::batch b = big_batch<float>(81);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 9);
  CHECK(same(run_all<float>(nc, b, ref, layout::padded, 7), run_all<float>(nc, b, ref, layout::padded, 1)));
}

TEST_CASE("concurrent calls from 4 threads give each its own exact results", "[threads]") {
  const auto& nc = config_named("mpo+wpo");
  std::vector<oracle::batch> batches;
  std::vector<fixture::reference> refs;
  std::vector<outputs<float>> want;
  for (std::uint64_t i = 0; i < 4; ++i) {
    batches.push_back(big_batch<float>(90 + i));
    refs.push_back(fixture::make_reference(nc.cfg, batches.back(), 20 + i));
    want.push_back(run_all<float>(nc, batches.back(), refs.back(), layout::padded, 1));
  }
  std::atomic<int> wrong{0}, thrown{0};
  std::vector<std::thread> callers;
  for (std::size_t i = 0; i < 4; ++i) {
    callers.emplace_back([&, i] {
      try {
        for (int rep = 0; rep < 5; ++rep) {
          const int threads = rep % 2 == 0 ? 3 : 64;
          if (!same(run_all<float>(nc, batches[i], refs[i], layout::padded, threads), want[i])) ++wrong;
        }
      } catch (...) {
        ++thrown;
      }
    });
  }
  for (std::thread& c : callers) c.join();
  CHECK(wrong == 0);
  CHECK(thrown == 0);
}

TEST_CASE("a parallel_for inside a slice runs inline and does not deadlock", "[threads]") {
  const std::int64_t outer = 16, inner = 1000;
  std::vector<std::int64_t> sums(outer, 0), inner_calls(outer, 0);
  parallel_for(outer, 8, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      parallel_for(inner, 8, [&](std::int64_t ib, std::int64_t ie) {
        ++inner_calls[static_cast<std::size_t>(i)];
        for (std::int64_t j = ib; j < ie; ++j) sums[static_cast<std::size_t>(i)] += j;
      });
    }
  });
  for (std::int64_t i = 0; i < outer; ++i) {
    CHECK(sums[static_cast<std::size_t>(i)] == inner * (inner - 1) / 2);
    CHECK(inner_calls[static_cast<std::size_t>(i)] == 1);  // one inline call, on the slice's thread
  }
  // The library called from inside slices: each gives the serial result.
  const auto& nc = config_named("sigmoid");
  const oracle::batch b = big_batch<float>(82);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 10);
  const outputs<float> want = run_all<float>(nc, b, ref, layout::padded, 1);
  std::atomic<int> wrong{0};
  parallel_for(4, 4, [&](std::int64_t lo, std::int64_t hi) {
    for (std::int64_t i = lo; i < hi; ++i)
      if (!same(run_all<float>(nc, b, ref, layout::padded, 7), want)) ++wrong;
  });
  CHECK(wrong == 0);
}

// No other test asks for more than 256 threads, so this one can grow the pool further.
TEST_CASE("workers that fail to start: fewer threads, same results, nothing thrown", "[threads][start_failure]") {
  const auto& nc = config_named("mpo+wpo");
  const oracle::batch b = big_batch<float>(83);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 11);
  const outputs<float> want = run_all<float>(nc, b, ref, layout::padded, 1);
  std::size_t before = thread_pool::instance().size();
  if (before + 20 >= static_cast<std::size_t>(limit())) {
    WARN("not run: DPO_THREAD_LIMIT leaves no room to grow the pool");
    return;
  }
  {
    // No worker can start: the calling thread runs every slice.
    failing_starts fail(0);
    outputs<float> got;
    CHECK_NOTHROW(got = run_all<float>(nc, b, ref, layout::padded, limit()));
    CHECK(same(got, want));
    CHECK(thread_pool::instance().size() == before);
  }
  {
    // Three start, the fourth fails: the call goes on with the workers it has.
    failing_starts fail(3);
    outputs<float> got;
    CHECK_NOTHROW(got = run_all<float>(nc, b, ref, layout::padded, static_cast<int>(before) + 20));
    CHECK(same(got, want));
    CHECK(thread_pool::instance().size() == before + 3);
    std::atomic<std::int64_t> sum{0};
    CHECK_NOTHROW(parallel_for(10000, limit(), [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) sum += i;
    }));
    CHECK(sum == std::int64_t{9999} * 10000 / 2);
  }
  // Once threads can start again, the pool grows on the next call that needs more.
  before = thread_pool::instance().size();
  std::atomic<std::int64_t> sum{0};
  parallel_for(1000, static_cast<int>(before) + 5, [&](std::int64_t lo, std::int64_t hi) { sum += hi - lo; });
  CHECK(sum == 1000);
  CHECK(thread_pool::instance().size() == before + 4);
}

#if DPO_DETAIL_HAS_ATFORK
TEST_CASE("a child forked after the workers started computes serially and exits", "[threads][fork]") {
  const auto& nc = config_named("sigmoid");
  const oracle::batch b = big_batch<float>(84);
  const fixture::reference ref = fixture::make_reference(nc.cfg, b, 12);
  const outputs<float> want = run_all<float>(nc, b, ref, layout::padded, 8);
  CHECK(thread_pool::instance().size() >= static_cast<std::size_t>(std::min(7, limit() - 1)));
  std::cout.flush();
  std::fflush(nullptr);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // exit(), not _exit(): static destructors run, the pool's among them, which must not
    // wait for workers that exist only in the parent.
    const bool ok = same(run_all<float>(nc, b, ref, layout::padded, 8), want);
    std::exit(ok ? 0 : 1);
  }
  int status = 0;
  pid_t done = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while ((done = waitpid(pid, &status, WNOHANG)) == 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  if (done == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL("the forked child did not exit within 60 s");
  }
  REQUIRE(done == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  // The parent's pool is untouched.
  CHECK(same(run_all<float>(nc, b, ref, layout::padded, 8), want));
}
#endif
