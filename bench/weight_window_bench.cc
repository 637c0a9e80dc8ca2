// Streams a 256 MiB shard-like file that sits in the page cache through WeightWindow in each
// mode, acquiring every block in compute order, summing it (as compute would read it) and
// releasing it: bytes/s of blocks served. The question it answers is the one kAuto decides at
// Open: when the file is cached, is copying each block into a slot (kCopy) or mapping it (kMap)
// cheaper, and how far are both from keeping everything resident?
//
//   weight_window_bench [--benchmark_filter=...]   (file in $TMPDIR or /tmp, removed at exit)
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "memory/weight_window.h"

namespace strata::memory {
namespace {

constexpr uint64_t kFileBytes = 256ull << 20;
constexpr uint64_t kBlockBytes = 8ull << 20;  // 32 blocks: a small model's half-layers per rank

std::string g_path;
std::vector<BlockExtent> g_blocks;

bool WriteFile() {
  g_path =
      (std::filesystem::temp_directory_path() / ("strata_ww_bench_" + std::to_string(::getpid())))
          .string();
  std::string tmp = g_path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return false;
  std::vector<uint8_t> chunk(kBlockBytes);
  for (uint64_t off = 0; off < kFileBytes; off += kBlockBytes) {
    for (uint64_t k = 0; k < kBlockBytes; ++k) chunk[k] = static_cast<uint8_t>((off + k) * 7);
    if (::pwrite(fd, chunk.data(), chunk.size(), static_cast<off_t>(off)) !=
        static_cast<ssize_t>(chunk.size())) {
      return false;
    }
    g_blocks.push_back({off, kBlockBytes});
  }
  bool ok = ::fsync(fd) == 0;
  ::close(fd);
  return ok && ::rename(tmp.c_str(), g_path.c_str()) == 0;
}

// What compute does with a block, reduced to reading every byte once.
uint64_t Sum(const uint8_t* p, uint64_t n) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (uint64_t i = 0; i + 4 <= n / 8; i += 4) {
    s0 += w[i];
    s1 += w[i + 1];
    s2 += w[i + 2];
    s3 += w[i + 3];
  }
  return s0 + s1 + s2 + s3;
}

// range(0): WindowMode; range(1): W; range(2): direct_io.
void BM_Stream(benchmark::State& state) {
  WindowOptions o;
  o.mode = static_cast<WindowMode>(state.range(0));
  o.window = static_cast<int>(state.range(1));
  o.direct_io = state.range(2) != 0;
  auto win = WeightWindow::Open(g_path, g_blocks, o);
  if (!win.ok()) {
    state.SkipWithError(win.status().ToString().c_str());
    return;
  }
  const int B = static_cast<int>(g_blocks.size());
  uint64_t sum = 0;
  for (auto _ : state) {  // one token: every block once
    for (int i = 0; i < B; ++i) {
      auto p = (*win)->Acquire(i);
      if (!p.ok()) {
        state.SkipWithError(p.status().ToString().c_str());
        return;
      }
      sum += Sum(*p, g_blocks[i].bytes);
      (*win)->Release(i);
    }
  }
  benchmark::DoNotOptimize(sum);
  WindowStats s = (*win)->stats();
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(kFileBytes));
  state.counters["wait_ms_per_token"] = benchmark::Counter(static_cast<double>(s.wait_ns) / 1e6 /
                                                           static_cast<double>(state.iterations()));
  state.counters["resident_MiB"] = static_cast<double>((*win)->resident_bytes()) / (1 << 20);
  state.SetLabel(std::string(WindowModeName(s.mode)) + (s.direct_io ? "+direct" : ""));
}

BENCHMARK(BM_Stream)
    ->ArgNames({"mode", "W", "direct"})
    ->Args({static_cast<int>(WindowMode::kResident), 0, 0})
    ->Args({static_cast<int>(WindowMode::kCopy), 2, 0})
    ->Args({static_cast<int>(WindowMode::kCopy), 4, 0})
    ->Args({static_cast<int>(WindowMode::kMap), 2, 0})
    ->Args({static_cast<int>(WindowMode::kMap), 4, 0})
    ->Args({static_cast<int>(WindowMode::kAuto), 2, 0})
    ->Args({static_cast<int>(WindowMode::kCopy), 2, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace strata::memory

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!strata::memory::WriteFile()) {
    std::fprintf(stderr, "weight_window_bench: cannot write %s\n", strata::memory::g_path.c_str());
    return 1;
  }
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  ::unlink(strata::memory::g_path.c_str());
  return 0;
}
