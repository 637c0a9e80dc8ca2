// A fork-join pool for data-parallel CPU loops (kernels, checksums, conversions). The caller is
// one of the threads: ParallelFor hands chunks to the workers, runs chunks itself, and returns
// when every chunk is done.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace strata {

class ThreadPool {
 public:
  // `num_threads` counts the caller, so it starts num_threads - 1 workers; 1 runs everything
  // inline. Must be >= 1.
  explicit ThreadPool(int num_threads);
  // Joins the workers. No ParallelFor may be running.
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Splits [0, n) into at most size() contiguous chunks of at least min_chunk items (one chunk,
  // run inline, when n < 2 * min_chunk), runs fn(begin, end) for each on the workers and the
  // caller, and returns when all are done. Chunk sizes differ by at most one.
  //
  // Safe to call from one thread at a time; calling it from inside `fn` (nesting) or from two
  // threads at once fails a check rather than deadlocking. If `fn` throws, the remaining chunks
  // still run and the first exception is rethrown in the caller.
  void ParallelFor(size_t n, const std::function<void(size_t begin, size_t end)>& fn,
                   size_t min_chunk = 1);

  // The process-wide pool, created on first use with STRATA_NUM_THREADS threads (0, the default,
  // means every CPU in this process's affinity mask). Never destroyed, so it is usable during
  // exit.
  static ThreadPool& Default();

 private:
  struct Job;

  void WorkerLoop();
  static void RunChunks(Job& job);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;  // workers: a new job or stop
  std::condition_variable done_cv_;  // caller: the last chunk finished
  // Shared with the workers, so a worker that wakes late for a finished job still holds valid
  // counters (and finds no chunk left) instead of touching the next job's.
  std::shared_ptr<Job> job_;  // guarded by mu_
  uint64_t generation_ = 0;   // guarded by mu_; bumped per job
  bool stop_ = false;         // guarded by mu_
  // Mirrors of generation_ / stop_ that idle workers poll for up to spin_ns_ before they block
  // on work_cv_: a decode step runs hundreds of short ParallelFors, and a futex wake-up costs
  // tens of microseconds each. The mutex-guarded values stay the source of truth.
  std::atomic<uint64_t> published_{0};
  std::atomic<bool> stopping_{false};
  int64_t spin_ns_ = 0;
  std::atomic<bool> busy_{false};
};

}  // namespace strata
