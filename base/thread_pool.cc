#include "base/thread_pool.h"

#include <algorithm>
#include <exception>

#include <immintrin.h>
#include <sched.h>

#include "base/check.h"
#include "base/cpus.h"
#include "base/clock.h"
#include "base/env.h"
#include "base/logging.h"

namespace strata {

struct ThreadPool::Job {
  const std::function<void(size_t, size_t)>* fn;
  size_t n;
  size_t chunks;
  std::atomic<size_t> next_chunk{0};
  std::atomic<size_t> done_chunks{0};
  std::mutex error_mu;
  std::exception_ptr error;  // guarded by error_mu; the first exception thrown by fn
  ThreadPool* pool;
};

namespace {

int64_t PoolSpinNs() {
  static const int64_t ns = EnvIntInRange("STRATA_POOL_SPIN_US", 0, 1000000) * 1000;
  return ns;
}

// Polls `done` for up to `ns` nanoseconds; true if it became true. After the first few
// microseconds it yields the core between polls, so on an oversubscribed machine (more ranks
// and threads than cores, common on small clusters and in tests) the thread being waited for
// gets to run instead of losing its core to the poller.
template <class F>
bool SpinUntil(F done, int64_t ns) {
  if (ns <= 0) return done();
  const int64_t t0 = NowNs();
  for (int i = 0;; ++i) {
    if (done()) return true;
    if (i < 256) {
      _mm_pause();
      continue;
    }
    sched_yield();
    if ((i & 7) == 7 && NowNs() - t0 > ns) return done();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  STRATA_CHECK_GE(num_threads, 1);
  spin_ns_ = PoolSpinNs();
  workers_.reserve(static_cast<size_t>(num_threads - 1));
  for (int i = 1; i < num_threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

ThreadPool::~ThreadPool() {
  STRATA_CHECK_MSG(!busy_.load(), "ThreadPool destroyed during ParallelFor");
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    stopping_.store(true, std::memory_order_release);
  }
  work_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::RunChunks(Job& job) {
  // Balanced split without computing c * n (which could overflow): the first n % chunks chunks
  // get one extra item.
  const size_t base = job.n / job.chunks;
  const size_t extra = job.n % job.chunks;
  while (true) {
    size_t c = job.next_chunk.fetch_add(1, std::memory_order_relaxed);
    if (c >= job.chunks) return;
    size_t begin = c * base + std::min(c, extra);
    size_t end = begin + base + (c < extra ? 1 : 0);
    try {
      (*job.fn)(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job.error_mu);
      if (!job.error) job.error = std::current_exception();
    }
    if (job.done_chunks.fetch_add(1, std::memory_order_acq_rel) + 1 == job.chunks) {
      // Taking the pool mutex orders this notify after the caller's predicate check, so the
      // wake-up cannot be lost.
      std::lock_guard<std::mutex> lock(job.pool->mu_);
      job.pool->done_cv_.notify_one();
    }
  }
}

void ThreadPool::WorkerLoop() {
  uint64_t seen = 0;
  while (true) {
    std::shared_ptr<Job> job;
    SpinUntil([&] {
      return published_.load(std::memory_order_acquire) != seen ||
             stopping_.load(std::memory_order_acquire);
    }, spin_ns_);
    {
      std::unique_lock<std::mutex> lock(mu_);
      work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
      job = job_;
    }
    if (job) RunChunks(*job);
  }
}

void ThreadPool::ParallelFor(size_t n, const std::function<void(size_t, size_t)>& fn,
                             size_t min_chunk) {
  if (n == 0) return;
  min_chunk = std::max<size_t>(min_chunk, 1);
  const size_t chunks = std::clamp<size_t>(n / min_chunk, 1, static_cast<size_t>(size()));
  if (chunks == 1) {
    fn(0, n);
    return;
  }
  STRATA_CHECK_MSG(!busy_.exchange(true, std::memory_order_acquire),
                   "ThreadPool::ParallelFor called while another ParallelFor runs on this pool "
                   "(nested, or from two threads)");
  auto job = std::make_shared<Job>();
  job->fn = &fn;
  job->n = n;
  job->chunks = chunks;
  job->pool = this;
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = job;
    ++generation_;
    published_.store(generation_, std::memory_order_release);
  }
  work_cv_.notify_all();
  RunChunks(*job);
  SpinUntil([&] { return job->done_chunks.load(std::memory_order_acquire) == chunks; }, spin_ns_);
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return job->done_chunks.load(std::memory_order_acquire) == chunks; });
    job_.reset();
  }
  busy_.store(false, std::memory_order_release);
  // Every chunk has finished, so no other thread touches job->error any more.
  if (job->error) std::rethrow_exception(job->error);
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = [] {
    int64_t threads = EnvIntInRange("STRATA_NUM_THREADS", 0, 4096);
    // 0 (the default): every CPU this process may run on (a launcher's binding may leave fewer than the
    // machine has; more threads than that would only take turns on the same cores).
    if (threads == 0) threads = UsableCpuCount();
    return new ThreadPool(static_cast<int>(threads));
  }();
  return *pool;
}

}  // namespace strata
