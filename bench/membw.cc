#include "bench/membw.h"

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>

#include "base/aligned_buffer.h"
#include "base/clock.h"
#include "base/thread_pool.h"

namespace strata::bench {
namespace {

// The decode kernels read weights with 64-byte AVX-512 loads; the probe reads the same way, with
// eight independent accumulators to keep enough loads in flight (out of line so the compiler
// cannot drop the reads). Narrower loads measure the load ports, not memory.
[[gnu::noinline, gnu::target("avx512f")]] float SumRangeAvx512(const float* p, size_t n) {
  __m512 acc[8];
  for (__m512& a : acc) a = _mm512_setzero_ps();
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_load_ps(p + i + 16 * j));
  }
  float s = 0;
  for (; i < n; ++i) s += p[i];
  // Horizontal sums through memory: GCC 12's _mm512_reduce_add_ps trips -Wuninitialized on its
  // own header (GCC bug 105593).
  alignas(64) float lanes[16];
  for (__m512 a : acc) {
    _mm512_store_ps(lanes, a);
    for (float l : lanes) s += l;
  }
  return s;
}

// Portable fallback: sixteen accumulators the compiler may vectorize.
[[gnu::noinline]] float SumRangeGeneric(const float* p, size_t n) {
  float acc[16] = {};
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
  }
  float s = 0;
  for (; i < n; ++i) s += p[i];
  for (float a : acc) s += a;
  return s;
}

float SumRange(const float* p, size_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 ? SumRangeAvx512(p, n) : SumRangeGeneric(p, n);
}

}  // namespace

MembwProbe::MembwProbe(size_t bytes, ThreadPool* pool)
    : pool_(pool), n_(std::max<size_t>(bytes, 4096) / sizeof(float)),
      buf_(n_ * sizeof(float), 2u << 20) {
  (void)::madvise(buf_.data(), buf_.capacity(), MADV_HUGEPAGE);  // a hint; EINVAL without THP
  float* p = buf_.as<float>();
  // Touch every page from the threads that will read it (first-touch placement).
  pool_->ParallelFor(n_, [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) p[i] = static_cast<float>(i & 7);
  }, 1 << 16);
}

double MembwProbe::PassGbps() {
  const float* p = buf_.as<float>();
  const auto threads = static_cast<size_t>(pool_->size());
  partial_.assign(threads, 0.0f);
  const uint64_t t0 = NowNs();
  pool_->ParallelFor(threads, [&](size_t b, size_t e) {
    for (size_t t = b; t < e; ++t) {
      const size_t lo = n_ * t / threads, hi = n_ * (t + 1) / threads;
      partial_[t] = SumRange(p + lo, hi - lo);
    }
  });
  const uint64_t t1 = NowNs();
  for (float x : partial_) sink_ = sink_ + x;
  return static_cast<double>(n_ * sizeof(float)) / static_cast<double>(t1 - t0);
}

StatusOr<MembwResult> RunMembw(const MembwOptions& o, comm::Communicator* comm) {
  if (o.threads < 1 || o.reps < 1 || o.bytes < 4096) {
    return Status::InvalidArgument("membw: threads and reps must be >= 1, bytes >= 4096");
  }
  ThreadPool pool(o.threads);
  MembwProbe probe(o.bytes, &pool);
  std::vector<double> gbps;
  for (int r = 0; r < o.reps + 1; ++r) {  // the first pass warms up and is not counted
    if (comm != nullptr) STRATA_RETURN_IF_ERROR(comm->Barrier());
    const double g = probe.PassGbps();
    if (r > 0) gbps.push_back(g);
  }
  MembwResult res;
  std::vector<double> sorted = gbps;
  std::sort(sorted.begin(), sorted.end());
  res.rank_gbps = sorted.back();
  res.rank_gbps_median = sorted[sorted.size() / 2];
  if (comm != nullptr && comm->size() > 1) {
    std::vector<double> all(static_cast<size_t>(comm->size()));
    STRATA_RETURN_IF_ERROR(comm->Allgather(&res.rank_gbps, all.data(), sizeof(double)));
    res.all_gbps = all;
    STRATA_RETURN_IF_ERROR(comm->Allgather(&res.rank_gbps_median, all.data(), sizeof(double)));
    res.all_gbps_median = all;
  } else {
    res.all_gbps = {res.rank_gbps};
    res.all_gbps_median = {res.rank_gbps_median};
  }
  for (double g : res.all_gbps) res.total_gbps += g;
  return res;
}

}  // namespace strata::bench
