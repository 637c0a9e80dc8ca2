// Reduce kernels (dst += src) against memcpy of the same buffer size.
//
// Counters: "bytes_per_second" is the buffer size per second (what a collective moves per
// element), "traffic" counts every byte read or written: memcpy touches 2x the buffer, a reduce
// 3x (two reads, one write), so at memory-bound sizes the traffic figure is the fair comparison.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/dtype.h"
#include "kernels/reduce.h"

namespace {

using strata::AlignedBuffer;
using strata::DType;

void Fill(AlignedBuffer& b) { std::memset(b.data(), 0x3c, b.size()); }

void SetCounters(benchmark::State& state, size_t bytes, int touches) {
  const auto iters = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * static_cast<int64_t>(bytes));
  state.counters["traffic"] = benchmark::Counter(iters * static_cast<double>(bytes) * touches,
                                                 benchmark::Counter::kIsRate,
                                                 benchmark::Counter::kIs1024);
}

void BM_Memcpy(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  AlignedBuffer src(bytes), dst(bytes);
  Fill(src);
  Fill(dst);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), bytes);
    benchmark::ClobberMemory();
  }
  SetCounters(state, bytes, 2);
}

template <DType kType>
void BM_ReduceSum(benchmark::State& state) {
  const size_t bytes = static_cast<size_t>(state.range(0));
  const size_t count = bytes / strata::DTypeSize(kType);
  AlignedBuffer src(bytes), dst(bytes);
  // 0x3c3c... is a small positive number in f32 (~0.0115) and bf16/f16: sums stay finite.
  Fill(src);
  Fill(dst);
  for (auto _ : state) {
    strata::kernels::ReduceInto(dst.data(), src.data(), count, kType,
                                strata::kernels::ReduceOp::kSum);
    benchmark::ClobberMemory();
  }
  SetCounters(state, bytes, 3);
  state.SetLabel(strata::kernels::ReduceIsa());
}

constexpr int64_t kMin = 4 << 10;
constexpr int64_t kMax = 64 << 20;

BENCHMARK(BM_Memcpy)->RangeMultiplier(4)->Range(kMin, kMax);
BENCHMARK(BM_ReduceSum<DType::kF32>)->Name("BM_ReduceSum_f32")->RangeMultiplier(4)->Range(kMin, kMax);
BENCHMARK(BM_ReduceSum<DType::kBF16>)->Name("BM_ReduceSum_bf16")->RangeMultiplier(4)->Range(kMin, kMax);
BENCHMARK(BM_ReduceSum<DType::kF16>)->Name("BM_ReduceSum_f16")->RangeMultiplier(4)->Range(kMin, kMax);

}  // namespace

BENCHMARK_MAIN();
