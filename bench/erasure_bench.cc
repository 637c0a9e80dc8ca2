// Erasure coding of snapshots (checkpoint/erasure.h) against raw ISA-L on the SAME buffers.
//
// For each code (k, m) one set of buffers is allocated once and shared by every benchmark of
// that code: n = k + m node snapshots of kNodeBytes each (the group's data; the first k of them
// are also the data fragments of the single-codeword benchmarks), m parity fragments of
// kNodeBytes, and n group parity buffers of m * ceil(kNodeBytes / k).
//
//   BM_RawIsalEncode   ec_encode_data over the k whole data buffers in one call (the baseline)
//   BM_Encode          ReedSolomon::Encode, same buffers, 1 thread (chunked calls)
//   BM_EncodeChunk     ReedSolomon::Encode, 1 thread, for several Options::chunk_bytes
//   BM_EncodePool      ReedSolomon::Encode on a ThreadPool of `threads` (wall time)
//   BM_RawIsalGroup    ec_encode_data once per stripe of the group over whole pieces (baseline)
//   BM_EncodeGroup     EncodeGroup over the n node snapshots (rotating stripes), 1 thread
//   BM_RawIsalDecode   ec_encode_data with the decode rows for data fragments 0..m-1 lost, one
//                      call (the baseline for reconstruction)
//   BM_Reconstruct     ReedSolomon::Reconstruct of data fragments 0..m-1, 1 thread
//   BM_RebuildGroup    RebuildGroup of nodes 0..m-1 from the survivors, 1 thread
//
// bytes_per_second counts data bytes encoded (k * kNodeBytes per codeword, n * kNodeBytes per
// group); per_core divides by the threads used. Single-thread runs use CPU time, pool runs wall
// time.
#include <benchmark/benchmark.h>
#include <isa-l/erasure_code.h>

#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/thread_pool.h"
#include "checkpoint/erasure.h"

namespace {

using strata::AlignedBuffer;
using strata::ThreadPool;
using strata::checkpoint::ReedSolomon;
using strata::checkpoint::StripeLayout;

constexpr size_t kNodeBytes = size_t{64} << 20;

struct Buffers {
  int k = 0, m = 0;
  std::vector<AlignedBuffer> nodes;         // n node snapshots
  std::vector<AlignedBuffer> parity;        // m codeword parity fragments
  std::vector<AlignedBuffer> group_parity;  // n group parity buffers
  std::vector<uint8_t*> node_ptrs, parity_ptrs, group_parity_ptrs;
};

void FillRandom(AlignedBuffer& b, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto* p = b.as<uint64_t>();
  for (size_t i = 0; i < b.size() / 8; ++i) p[i] = rng();
}

Buffers& GetBuffers(int k, int m) {
  static std::map<std::pair<int, int>, std::unique_ptr<Buffers>> cache;
  auto& slot = cache[{k, m}];
  if (!slot) {
    slot = std::make_unique<Buffers>();
    Buffers& b = *slot;
    b.k = k;
    b.m = m;
    const int n = k + m;
    const size_t group_parity_bytes = static_cast<size_t>(m) * ((kNodeBytes + k - 1) / k);
    for (int i = 0; i < n; ++i) {
      b.nodes.emplace_back(kNodeBytes);
      FillRandom(b.nodes.back(), 1000 + i);
      b.group_parity.emplace_back(group_parity_bytes);
      b.group_parity.back().Zero();
    }
    for (int p = 0; p < m; ++p) {
      b.parity.emplace_back(kNodeBytes);
      b.parity.back().Zero();
    }
    for (auto& x : b.nodes) b.node_ptrs.push_back(x.as<uint8_t>());
    for (auto& x : b.parity) b.parity_ptrs.push_back(x.as<uint8_t>());
    for (auto& x : b.group_parity) b.group_parity_ptrs.push_back(x.as<uint8_t>());
  }
  return *slot;
}

void SetRate(benchmark::State& state, size_t bytes_per_iter, int threads) {
  const double iters = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) *
                          static_cast<int64_t>(bytes_per_iter));
  state.counters["per_core"] =
      benchmark::Counter(iters * static_cast<double>(bytes_per_iter) / threads,
                         benchmark::Counter::kIsRate, benchmark::Counter::kIs1024);
}

ReedSolomon MakeRs(int k, int m) { return std::move(ReedSolomon::Create(k, m)).value(); }

void BM_RawIsalEncode(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  std::vector<uint8_t> matrix(static_cast<size_t>((k + m) * k)), tables(32 * k * m);
  gf_gen_cauchy1_matrix(matrix.data(), k + m, k);
  ec_init_tables(k, m, matrix.data() + k * k, tables.data());
  for (auto _ : state) {
    ec_encode_data(static_cast<int>(kNodeBytes), k, m, tables.data(), b.node_ptrs.data(),
                   b.parity_ptrs.data());
    benchmark::ClobberMemory();
  }
  SetRate(state, k * kNodeBytes, 1);
}

void BM_Encode(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  ReedSolomon rs = MakeRs(k, m);
  for (auto _ : state) {
    if (!rs.Encode(b.node_ptrs.data(), b.parity_ptrs.data(), kNodeBytes).ok()) {
      state.SkipWithError("Encode failed");
    }
    benchmark::ClobberMemory();
  }
  SetRate(state, k * kNodeBytes, 1);
}

// ReedSolomon::Encode with Options::chunk_bytes = chunk_kib KiB, 1 thread: picks the default.
void BM_EncodeChunk(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  ReedSolomon::Options opt;
  opt.chunk_bytes = static_cast<size_t>(state.range(2)) << 10;
  ReedSolomon rs = std::move(ReedSolomon::Create(k, m, opt)).value();
  for (auto _ : state) {
    if (!rs.Encode(b.node_ptrs.data(), b.parity_ptrs.data(), kNodeBytes).ok()) {
      state.SkipWithError("Encode failed");
    }
    benchmark::ClobberMemory();
  }
  SetRate(state, k * kNodeBytes, 1);
}

void BM_EncodePool(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  const int threads = static_cast<int>(state.range(2));
  Buffers& b = GetBuffers(k, m);
  ReedSolomon rs = MakeRs(k, m);
  ThreadPool pool(threads);
  for (auto _ : state) {
    if (!rs.Encode(b.node_ptrs.data(), b.parity_ptrs.data(), kNodeBytes, &pool).ok()) {
      state.SkipWithError("Encode failed");
    }
    benchmark::ClobberMemory();
  }
  SetRate(state, k * kNodeBytes, threads);
}

void BM_EncodeGroup(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  ReedSolomon rs = MakeRs(k, m);
  StripeLayout layout = std::move(StripeLayout::Create(k, m, kNodeBytes)).value();
  for (auto _ : state) {
    if (!EncodeGroup(rs, layout, b.node_ptrs.data(), b.group_parity_ptrs.data()).ok()) {
      state.SkipWithError("EncodeGroup failed");
    }
    benchmark::ClobberMemory();
  }
  SetRate(state, (k + m) * kNodeBytes, 1);
}

// The group's stripes coded by raw ISA-L, one ec_encode_data call per stripe over whole pieces
// (kNodeBytes is a multiple of k, so no piece is short): the baseline for BM_EncodeGroup.
void BM_RawIsalGroup(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  const int n = k + m;
  Buffers& b = GetBuffers(k, m);
  StripeLayout layout = std::move(StripeLayout::Create(k, m, kNodeBytes)).value();
  if (layout.full_bytes() != layout.piece_bytes()) state.SkipWithError("short pieces");
  std::vector<uint8_t> matrix(static_cast<size_t>((k + m) * k)), tables(32 * k * m);
  gf_gen_cauchy1_matrix(matrix.data(), k + m, k);
  ec_init_tables(k, m, matrix.data() + k * k, tables.data());
  std::vector<std::vector<uint8_t*>> src(n), dst(n);
  for (int s = 0; s < n; ++s) {
    for (int d = 0; d < k; ++d) {
      src[s].push_back(b.node_ptrs[layout.DataNode(s, d)] + layout.DataOffset(d));
    }
    for (int p = 0; p < m; ++p) {
      dst[s].push_back(b.group_parity_ptrs[layout.ParityNode(s, p)] + layout.ParityOffset(p));
    }
  }
  for (auto _ : state) {
    for (int s = 0; s < n; ++s) {
      ec_encode_data(static_cast<int>(layout.piece_bytes()), k, m, tables.data(), src[s].data(),
                     dst[s].data());
    }
    benchmark::ClobberMemory();
  }
  SetRate(state, n * kNodeBytes, 1);
}

void BM_RawIsalDecode(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  // Data fragments 0..m-1 lost: survivors are data m..k-1 then parity 0..m-1.
  std::vector<uint8_t> matrix(static_cast<size_t>((k + m) * k));
  gf_gen_cauchy1_matrix(matrix.data(), k + m, k);
  std::vector<uint8_t> sub(k * k), inv(k * k), tables(32 * k * m);
  std::vector<uint8_t*> src, dst;
  for (int r = 0; r < k; ++r) {
    const int row = r + m;  // generator rows m..k+m-1
    std::memcpy(&sub[r * k], &matrix[row * k], k);
    src.push_back(row < k ? b.node_ptrs[row] : b.parity_ptrs[row - k]);
  }
  if (gf_invert_matrix(sub.data(), inv.data(), k) != 0) state.SkipWithError("singular");
  // Rows of the inverse for the lost data fragments 0..m-1; decoded into scratch copies so the
  // shared buffers stay intact.
  std::vector<AlignedBuffer> out;
  for (int t = 0; t < m; ++t) {
    out.emplace_back(kNodeBytes);
    out.back().Zero();
    dst.push_back(out.back().as<uint8_t>());
  }
  ec_init_tables(k, m, inv.data(), tables.data());
  for (auto _ : state) {
    ec_encode_data(static_cast<int>(kNodeBytes), k, m, tables.data(), src.data(), dst.data());
    benchmark::ClobberMemory();
  }
  SetRate(state, k * kNodeBytes, 1);
}

void BM_Reconstruct(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  Buffers& b = GetBuffers(k, m);
  ReedSolomon rs = MakeRs(k, m);
  if (!rs.Encode(b.node_ptrs.data(), b.parity_ptrs.data(), kNodeBytes).ok()) {
    state.SkipWithError("Encode failed");
  }
  // Lost data fragments 0..m-1 are rebuilt into scratch buffers, survivors are the shared ones.
  std::vector<AlignedBuffer> lost;
  std::vector<uint8_t*> frags;
  std::vector<bool> present(k + m, true);
  for (int i = 0; i < k + m; ++i) {
    if (i < m) {
      lost.emplace_back(kNodeBytes);
      lost.back().Zero();
      frags.push_back(lost.back().as<uint8_t>());
      present[i] = false;
    } else {
      frags.push_back(i < k ? b.node_ptrs[i] : b.parity_ptrs[i - k]);
    }
  }
  for (auto _ : state) {
    if (!rs.Reconstruct(frags.data(), present, kNodeBytes).ok()) {
      state.SkipWithError("Reconstruct failed");
    }
    benchmark::ClobberMemory();
  }
  if (m > 0 && std::memcmp(frags[0], b.node_ptrs[0], kNodeBytes) != 0) {
    state.SkipWithError("reconstructed fragment differs");
  }
  SetRate(state, k * kNodeBytes, 1);
}

void BM_RebuildGroup(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0)), m = static_cast<int>(state.range(1));
  const int n = k + m;
  Buffers& b = GetBuffers(k, m);
  ReedSolomon rs = MakeRs(k, m);
  StripeLayout layout = std::move(StripeLayout::Create(k, m, kNodeBytes)).value();
  if (!EncodeGroup(rs, layout, b.node_ptrs.data(), b.group_parity_ptrs.data()).ok()) {
    state.SkipWithError("EncodeGroup failed");
  }
  // Nodes 0..m-1 lost: their data and parity are rebuilt into scratch buffers.
  std::vector<AlignedBuffer> scratch;
  std::vector<uint8_t*> data = b.node_ptrs, parity = b.group_parity_ptrs;
  std::vector<bool> present(n, true);
  for (int i = 0; i < m; ++i) {
    present[i] = false;
    scratch.emplace_back(kNodeBytes);
    scratch.back().Zero();
    data[i] = scratch.back().as<uint8_t>();
    scratch.emplace_back(layout.parity_bytes());
    scratch.back().Zero();
    parity[i] = scratch.back().as<uint8_t>();
  }
  for (auto _ : state) {
    if (!RebuildGroup(rs, layout, data.data(), parity.data(), present).ok()) {
      state.SkipWithError("RebuildGroup failed");
    }
    benchmark::ClobberMemory();
  }
  if (m > 0 && std::memcmp(data[0], b.node_ptrs[0], kNodeBytes) != 0) {
    state.SkipWithError("rebuilt node differs");
  }
  SetRate(state, n * kNodeBytes, 1);
}

void Codes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"k", "m"})->Args({4, 2})->Args({2, 1})->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_RawIsalEncode)->Apply(Codes);
BENCHMARK(BM_Encode)->Apply(Codes);
BENCHMARK(BM_RawIsalGroup)->Apply(Codes);
BENCHMARK(BM_EncodeGroup)->Apply(Codes);
BENCHMARK(BM_EncodeChunk)
    ->ArgNames({"k", "m", "chunk_kib"})
    ->ArgsProduct({{4}, {2}, {16, 64, 256, 1024, 4096}})
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_EncodePool)
    ->ArgNames({"k", "m", "threads"})
    ->Args({4, 2, 2})
    ->Args({2, 1, 2})
    ->UseRealTime()
    ->Unit(benchmark::kMillisecond);
BENCHMARK(BM_RawIsalDecode)->Apply(Codes);
BENCHMARK(BM_Reconstruct)->Apply(Codes);
BENCHMARK(BM_RebuildGroup)->Apply(Codes);

}  // namespace

BENCHMARK_MAIN();
