// Linear (kernels/ops.h) on TinyLlama's projection shapes, for each weight type, at decode (M = 1)
// and prefill (M = 128) on a 2-thread pool. bytes_per_second counts the weight bytes streamed per
// call, so decode figures compare directly with the machine's memory bandwidth.
//
//   linear_bench --benchmark_filter='M:1/'    # decode only
// (wt: 0 f32, 1 bf16, 2 q8_0; threads: size of the pool, the caller included)
#include <benchmark/benchmark.h>
#include <sys/mman.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/clock.h"
#include "base/thread_pool.h"
#include "bench/membw.h"
#include "kernels/ops.h"
#include "kernels/quant.h"

namespace strata::kernels {
namespace {

ThreadPool& Pool(int threads = 2) {
  static ThreadPool* one = new ThreadPool(1);
  static ThreadPool* two = new ThreadPool(2);
  return threads == 1 ? *one : *two;
}

void BM_Linear(benchmark::State& state) {
  const auto wt = static_cast<WeightType>(state.range(0));
  const int64_t M = state.range(1), N = state.range(2), K = state.range(3);
  ThreadPool& pool = Pool(static_cast<int>(state.range(4)));
  const size_t bytes = WeightBytes(wt, N, K);
  AlignedBuffer w(bytes);
  {
    std::mt19937 rng(1);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t n = 0; n < N; ++n) {
      for (auto& f : row) f = dist(rng);
      uint8_t* dst = w.as<uint8_t>() + bytes / static_cast<size_t>(N) * static_cast<size_t>(n);
      if (wt == WeightType::kF32) {
        std::copy(row.begin(), row.end(), reinterpret_cast<float*>(dst));
      } else if (wt == WeightType::kBF16) {
        auto* p = reinterpret_cast<uint16_t*>(dst);
        for (int64_t k = 0; k < K; ++k) p[k] = static_cast<uint16_t>(
            (std::bit_cast<uint32_t>(row[static_cast<size_t>(k)]) + 0x8000u) >> 16);
      } else {
        QuantizeRowsQ8_0(row.data(), dst, 1, K);
      }
    }
  }
  std::vector<float> x(static_cast<size_t>(M * K), 0.5f), y(static_cast<size_t>(M * N));
  for (auto _ : state) {
    Linear(y.data(), x.data(), w.data(), wt, M, N, K, &pool);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
  state.SetItemsProcessed(static_cast<int64_t>(state.iterations()) * 2 * M * N * K);  // flops
  state.SetLabel(std::string(WeightTypeName(wt)) + " " + OpsIsa());
}

void Shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"wt", "M", "N", "K", "threads"});
  for (int wt = 0; wt < 3; ++wt) {
    for (int64_t m : {1, 128}) {
      // TinyLlama-1.1B: q/o proj, gate/up, down, lm_head.
      for (auto [n, k] : {std::pair<int64_t, int64_t>{2048, 2048}, {5632, 2048}, {2048, 5632},
                          {32000, 2048}}) {
        b->Args({wt, m, n, k, 2});
        if (m == 1) b->Args({wt, m, n, k, 1});  // per-thread speed, immune to a busy machine
      }
    }
  }
  // A matrix that fits one core's L2 (0.5 MiB in q8_0): the kernel's compute ceiling, which decode
  // out of cache can only reach if it is above the core's memory bandwidth.
  for (int wt = 0; wt < 3; ++wt) b->Args({wt, 1, wt == 0 ? 64 : 256, 2048, 1});
  // Short prompts in q8_0, where packing weights for the int8 GEMM competes with one matvec per
  // token (kernels/cpu/ops.cc kQ8GemmMinRows).
  for (int64_t m : {2, 3, 4, 6, 8, 16}) b->Args({2, m, 5632, 2048, 2});
}

// The yardstick for decode: read-only memory bandwidth of the same 2-thread pool over a buffer
// larger than the caches. glibc's memchr reads zeroed memory with its widest vector loads and
// never finds the byte, so it streams the whole buffer.
void BM_ReadBandwidth(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0)) << 20;
  AlignedBuffer buf(bytes);
  std::memset(buf.data(), 0, bytes);
  for (auto _ : state) {
    Pool().ParallelFor(2, [&](size_t b, size_t e) {
      for (size_t i = b; i < e; ++i) {
        benchmark::DoNotOptimize(std::memchr(buf.as<char>() + i * bytes / 2, 1, bytes / 2));
      }
    });
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * bytes));
}
BENCHMARK(BM_ReadBandwidth)->Arg(256)->Unit(benchmark::kMicrosecond)->UseRealTime();

// Decode's matrices for 8 TinyLlama layers (fused q/k/v, o, fused gate/up, down), in sweep order.
constexpr int64_t kSweepH = 2048, kSweepF = 5632;
constexpr std::pair<int64_t, int64_t> kSweepShapes[] = {
    {kSweepH + 2 * 256, kSweepH}, {kSweepH, kSweepH}, {2 * kSweepF, kSweepH}, {kSweepH, kSweepF}};
struct SweepWeights {
  std::vector<AlignedBuffer> w;
  size_t total = 0;
  // random_q8: q8_0 matrices hold quantized random values (real scales) instead of 0x01 bytes.
  SweepWeights(WeightType wt, bool random_q8) {
    std::mt19937 rng(3);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (int64_t l = 0; l < 8; ++l) {
      for (auto [n, k] : kSweepShapes) {
        // 2 MiB-aligned and hinted for huge pages before first touch, as the probe's buffer and
        // decode's resident mapping are (infer's JSON shows huge_mapped_fraction ~1). On 4 KiB
        // pages the one-thread sweep read 0.69-0.73 of the probe for q8_0 and 0.86 for f32,
        // against 0.88-0.91 and 0.99 hinted (BENCHMARKS.md section 15).
        w.emplace_back(WeightBytes(wt, n, k), size_t{2} << 20);
        (void)::madvise(w.back().data(), w.back().capacity(), MADV_HUGEPAGE);  // EINVAL: no THP
        if (random_q8 && wt == WeightType::kQ8_0) {
          std::vector<float> m(static_cast<size_t>(n * k));
          for (float& f : m) f = dist(rng);
          QuantizeRowsQ8_0(m.data(), w.back().data(), n, k);
        } else {
          std::memset(w.back().data(), 1, w.back().size());  // q8_0: tiny f16 scales, int8 ones
        }
        total += w.back().size();
      }
    }
  }
  void Run(float* y, const float* x, WeightType wt, ThreadPool* pool) const {
    for (size_t i = 0; i < w.size(); ++i) {
      auto [n, k] = kSweepShapes[i % 4];
      Linear(y, x, w[i].data(), wt, 1, n, k, pool);
    }
  }
};

// Decode's sequence of matvecs over distinct matrices: 8 TinyLlama layers (fused q/k/v, o, fused
// gate/up, down; 1.45 GB in f32, 0.38 GB in q8_0), each read once per pass as a token reads
// them. Against BM_ReadBandwidth it shows what the per-call split, wake-up and stream restart
// cost decode, apart from everything else a decode step does.
void BM_LayerSweep(benchmark::State& state) {
  const auto wt = static_cast<WeightType>(state.range(0));
  ThreadPool& pool = Pool(static_cast<int>(state.range(1)));
  const SweepWeights sw(wt, false);
  std::vector<float> x(static_cast<size_t>(kSweepF), 0.5f), y(static_cast<size_t>(2 * kSweepF));
  for (auto _ : state) {
    sw.Run(y.data(), x.data(), wt, &pool);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * sw.total));
  state.SetLabel(std::string(WeightTypeName(wt)) + " " + OpsIsa());
}
BENCHMARK(BM_LayerSweep)
    ->ArgNames({"wt", "threads"})
    ->ArgsProduct({{0, 2}, {1, 2}})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

// BM_LayerSweep alternated with one pass of `strata infer --probe-bandwidth`'s probe over as many
// bytes, pass by pass: this machine's bandwidth moves 2x within seconds, so the sweep is only
// comparable with a read pass taken at the same moment. sweep_over_probe is the median of the
// per-iteration ratios (decode's matvecs can reach at most about this share of the floor);
// probe_GBps the median probe pass (1e9 bytes/s).
void BM_LayerSweepVsProbe(benchmark::State& state) {
  const auto wt = static_cast<WeightType>(state.range(0));
  ThreadPool& pool = Pool(static_cast<int>(state.range(1)));
  const SweepWeights sw(wt, true);
  const size_t total = sw.total;
  bench::MembwProbe probe(total, &pool);
  std::vector<float> x(static_cast<size_t>(kSweepF), 0.5f), y(static_cast<size_t>(2 * kSweepF));
  std::vector<double> ratio, gbps;
  for (auto _ : state) {
    const double g = probe.PassGbps();
    const uint64_t t0 = NowNs();
    sw.Run(y.data(), x.data(), wt, &pool);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
    const double sweep = static_cast<double>(total) / static_cast<double>(NowNs() - t0);
    ratio.push_back(sweep / g);
    gbps.push_back(g);
  }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.empty() ? 0.0 : v[v.size() / 2];
  };
  state.counters["sweep_over_probe"] = median(ratio);
  state.counters["probe_GBps"] = median(gbps);
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations() * 2 * total));
  state.SetLabel(std::string(WeightTypeName(wt)) + " " + OpsIsa());
}
BENCHMARK(BM_LayerSweepVsProbe)
    ->ArgNames({"wt", "threads"})
    ->ArgsProduct({{0, 2}, {1, 2}})
    ->Iterations(60)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_Linear)->Apply(Shapes)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace strata::kernels

BENCHMARK_MAIN();
