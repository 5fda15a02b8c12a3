// Copyright 2026 The dpo Authors. SPDX-License-Identifier: Apache-2.0
//
// The CPU backend's threads: one process-wide pool of workers, started lazily and grown on
// demand, that run static slices of [0, n) for parallel_for. Starting threads on every call
// cost more than the work for small batches (issue 17); a thread that cannot be started
// (issue 16) leaves the pool smaller, never terminates the process, and changes no result,
// because the calling thread can run every slice itself.
#pragma once

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define DPO_DETAIL_HAS_ATFORK 1
#else
#define DPO_DETAIL_HAS_ATFORK 0
#endif

namespace dpo {
namespace cpu {
namespace detail {

/// std::thread::hardware_concurrency(), or 1 when it is unknown.
inline int hardware_threads() {
  static const int hw = [] {
    const unsigned h = std::thread::hardware_concurrency();
    return h == 0 ? 1 : static_cast<int>(std::min<unsigned>(h, INT_MAX));
  }();
  return hw;
}

/// The most threads one call uses: the environment variable DPO_THREAD_LIMIT when it holds a
/// positive integer, else the hardware's. Read once, at the first parallel call.
inline int thread_limit() {
  static const int limit = [] {
    const char* s = std::getenv("DPO_THREAD_LIMIT");
    if (s != nullptr && *s != '\0') {
      char* end = nullptr;
      errno = 0;
      const long v = std::strtol(s, &end, 10);
      if (errno == 0 && *end == '\0' && v > 0 && v <= INT_MAX) return static_cast<int>(v);
    }
    return hardware_threads();
  }();
  return limit;
}

/// The thread count of a call asking for `requested` (options::num_threads): the hardware's
/// when requested <= 0, and never more than `limit`. More threads than cores only add
/// switching; slices, and so results, do not depend on the count.
inline int resolve_threads(int requested, int hardware, int limit) {
  const int t = requested > 0 ? requested : hardware;
  return std::max(1, std::min(t, limit));
}

inline int resolve_threads(int requested) {
  return resolve_threads(requested, hardware_threads(), thread_limit());
}

/// Test hook: called before each worker thread is started; a throw (say std::system_error,
/// as std::thread throws when the system is out of threads or memory) counts as a failed
/// start. Null in normal use.
inline std::atomic<void (*)()> before_thread_start{nullptr};

/// True on pool workers, and on a calling thread while it runs slices: a parallel_for there
/// runs inline, so nested calls neither wait on busy workers nor multiply the threads.
inline bool& in_parallel_region() {
  static thread_local bool inside = false;
  return inside;
}

/// One parallel_for call: slices k < t of [0, n), claimed one at a time by the caller and
/// the workers that join it. Lives on the caller's stack until every joined worker has left.
class parallel_job {
 public:
  parallel_job(std::int64_t n, std::int64_t t, void (*invoke)(void*, std::int64_t, std::int64_t),
               void* fn)
      : n_(n), t_(t), invoke_(invoke), fn_(fn) {}

  /// Runs unclaimed slices until none is left. A slice's exception is kept (the one of the
  /// lowest slice wins, so which one is rethrown does not depend on timing) and the other
  /// slices still run.
  void work() {
    for (;;) {
      const std::int64_t k = next_.fetch_add(1, std::memory_order_relaxed);
      if (k >= t_) return;
      try {
        invoke_(fn_, n_ * k / t_, n_ * (k + 1) / t_);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (k < error_slice_) {
          error_slice_ = k;
          error_ = std::current_exception();
        }
      }
    }
  }

  void rethrow_if_failed() const {
    if (error_) std::rethrow_exception(error_);
  }

  std::int64_t threads() const { return t_; }

 private:
  friend class thread_pool;

  const std::int64_t n_, t_;
  void (*const invoke_)(void*, std::int64_t, std::int64_t);
  void* const fn_;
  std::atomic<std::int64_t> next_{0};
  std::mutex error_mutex_;
  std::int64_t error_slice_ = INT64_MAX;
  std::exception_ptr error_;
  // Guarded by the pool's mutex.
  std::int64_t wanted_ = 0;  // workers still to join; > 0 while the job is queued
  std::int64_t joined_ = 0;  // workers inside work()
  std::condition_variable left_;
};

/// The process-wide workers. They wait on a condition variable while idle (no spinning) and
/// take queued jobs in order; the caller of a job always works on it too, so a job finishes
/// even when every worker is busy with other callers' jobs, or none could be started.
class thread_pool {
 public:
  /// The pool, created at the first call. It is never freed: a call from a static
  /// destructor that runs after the workers were joined still finds it, and runs serially.
  static thread_pool& instance() {
    static thread_pool* const pool = create();
    static const joiner join_at_exit{pool};
    return *pool;
  }

  /// Runs every slice of `job`, on the calling thread and up to threads() - 1 workers, and
  /// returns when all are done. Starts missing workers first; those that fail to start are
  /// done without.
  void run(parallel_job& job) {
    std::int64_t helpers = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!stopping_) {
        grow(job.threads() - 1);
        helpers = std::min<std::int64_t>(job.threads() - 1,
                                         static_cast<std::int64_t>(workers_.size()));
        if (helpers > 0) {
          try {
            queue_.push_back(&job);
            job.wanted_ = helpers;
          } catch (...) {  // out of memory for the queue: no helpers
            helpers = 0;
          }
        }
      }
    }
    for (std::int64_t i = 0; i < helpers; ++i) work_ready_.notify_one();
    {
      bool& inside = in_parallel_region();
      inside = true;
      job.work();
      inside = false;
    }
    if (helpers == 0) return;
    std::unique_lock<std::mutex> lock(mutex_);
    if (job.wanted_ > 0) {
      queue_.erase(std::find(queue_.begin(), queue_.end(), &job));
      job.wanted_ = 0;
    }
    job.left_.wait(lock, [&] { return job.joined_ == 0; });
  }

  /// Started workers (for tests).
  std::size_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return workers_.size();
  }

 private:
  /// Stops and joins the workers at exit (static destruction), before the pool's users are
  /// gone. A worker that is itself exiting the process (exit() from a slice) is detached,
  /// not joined.
  struct joiner {
    thread_pool* pool;
    ~joiner() {
      std::vector<std::thread> workers;
      {
        std::lock_guard<std::mutex> lock(pool->mutex_);
        pool->stopping_ = true;
        // A forked child has none of the parent's workers: joining one would wait forever,
        // so they stay, unjoined, in the pool that is never freed.
        if (pool->forked_) return;
        workers.swap(pool->workers_);
      }
      pool->work_ready_.notify_all();
      for (std::thread& w : workers) {
        if (w.get_id() == std::this_thread::get_id()) {
          w.detach();
        } else {
          w.join();
        }
      }
    }
  };

  thread_pool() = default;

  static thread_pool* create() {
    thread_pool* pool = new thread_pool;
#if DPO_DETAIL_HAS_ATFORK
    // fork() copies the pool but not its workers. Holding the mutex across fork gives the
    // child a consistent pool, which then runs every call on the calling thread.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] {
                     thread_pool& p = instance();
                     p.stopping_ = true;
                     p.forked_ = true;
                     p.mutex_.unlock();
                   });
#endif
    return pool;
  }

  /// Starts workers until there are `target`, or one fails to start. Holds mutex_.
  void grow(std::int64_t target) {
    try {
      while (static_cast<std::int64_t>(workers_.size()) < target) {
        if (void (*hook)() = before_thread_start.load()) hook();
        workers_.emplace_back([this] { worker(); });
      }
    } catch (...) {  // std::system_error from std::thread, bad_alloc, or the test hook
    }
  }

  void worker() {
    in_parallel_region() = true;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_ready_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      parallel_job* job = queue_.front();
      if (--job->wanted_ == 0) queue_.pop_front();
      ++job->joined_;
      lock.unlock();
      job->work();
      lock.lock();
      // Notified under the mutex: once the caller sees joined_ == 0 it may destroy the job.
      if (--job->joined_ == 0) job->left_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::deque<parallel_job*> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;  // at exit, or in a forked child: no workers, calls run serially
  bool forked_ = false;
};

/// Calls fn(begin, end) on static, contiguous slices of [0, n): slice k of t is
/// [n*k/t, n*(k+1)/t), with t = min(resolve_threads(threads), n). Every index is handled by
/// exactly one call and each call's work depends only on its indices, so results do not
/// depend on t, nor on which thread runs a slice. The slices run on the calling thread and
/// the pool's workers; fewer threads run them when workers cannot be started. A call from
/// inside a slice (nested) runs fn(0, n) on its thread. Safe to call from several threads
/// at once. If slices throw, every slice still runs and the exception of the lowest slice is
/// rethrown; the pool stays usable.
template <class Fn>
void parallel_for(std::int64_t n, int threads, Fn&& fn) {
  if (n <= 0) return;
  const std::int64_t t = std::min<std::int64_t>(resolve_threads(threads), n);
  if (t == 1 || in_parallel_region()) {
    fn(std::int64_t{0}, n);
    return;
  }
  using F = std::remove_reference_t<Fn>;
  parallel_job job(n, t,
                   [](void* f, std::int64_t b, std::int64_t e) { (*static_cast<F*>(f))(b, e); },
                   const_cast<void*>(static_cast<const void*>(std::addressof(fn))));
  thread_pool::instance().run(job);
  job.rethrow_if_failed();
}

/// parallel_for for work that the machine's other load makes uneven: [0, n) in consecutive
/// blocks of `grain` indices (0: about 16 blocks per thread), claimed one at a time by up to
/// resolve_threads(threads) threads, so a thread that is slowed down takes fewer blocks
/// instead of holding up the call at its end. As for parallel_for, fn(b, e)'s work must
/// depend on its indices only: which thread runs a block, and how [0, n) is blocked, then
/// change no result. Every block runs even when some throw; the lowest block's exception is
/// rethrown. A nested call runs every block on its thread.
template <class Fn>
void parallel_blocks(std::int64_t n, int threads, Fn&& fn, std::int64_t grain = 0) {
  if (n <= 0) return;
  const std::int64_t t = resolve_threads(threads);
  if (grain <= 0) grain = std::max<std::int64_t>(1, n / (16 * t));
  const std::int64_t blocks = (n + grain - 1) / grain;
  std::atomic<std::int64_t> next{0};
  std::mutex error_mutex;
  std::int64_t error_block = INT64_MAX;
  std::exception_ptr error;
  parallel_for(std::min(blocks, t), threads, [&](std::int64_t, std::int64_t) {
    for (std::int64_t k = next.fetch_add(1); k < blocks; k = next.fetch_add(1)) {
      try {
        fn(k * grain, std::min(n, (k + 1) * grain));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (k < error_block) {
          error_block = k;
          error = std::current_exception();
        }
      }
    }
  });
  if (error) std::rethrow_exception(error);
}

}  // namespace detail
}  // namespace cpu
}  // namespace dpo
