// Throwaway-sized probe behind docs/BENCHMARKS.md §11 ("the memory restore runs at this
// machine's copy bandwidth"): THREADS threads each copy 1.12 GiB from a shared-memory mapping
// into prefaulted private memory in 256 KiB chunks, checksumming each chunk from cache right
// after copying it (what checkpoint::CopyAndChecksum does), twice; then the copy alone.
//   g++ -O2 -o /tmp/copy_checksum_probe bench/probes/copy_checksum_probe.cc -lisal -lpthread
//   /tmp/copy_checksum_probe [THREADS=2]
#include <isa-l/crc.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {
double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
}  // namespace

int main(int argc, char** argv) {
  const size_t bytes = size_t{1150} << 20;
  const int threads = argc > 1 ? std::atoi(argv[1]) : 2;
  std::vector<uint8_t*> src(threads), dst(threads);
  for (int t = 0; t < threads; ++t) {
    src[t] = static_cast<uint8_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                        MAP_SHARED | MAP_ANONYMOUS | MAP_POPULATE, -1, 0));
    dst[t] = static_cast<uint8_t*>(mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0));
    if (src[t] == MAP_FAILED || dst[t] == MAP_FAILED) return 1;
    std::memset(src[t], t + 1, bytes);
  }
  constexpr size_t kChunk = 256 << 10;
  for (int checksum = 1; checksum >= 0; --checksum) {
    for (int rep = 0; rep < 2; ++rep) {
      const double t0 = Now();
      std::vector<std::thread> pool;
      std::vector<uint32_t> crc(threads, 0);
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&, t] {
          for (size_t o = 0; o < bytes; o += kChunk) {
            const size_t n = std::min(kChunk, bytes - o);
            std::memcpy(dst[t] + o, src[t] + o, n);
            if (checksum) crc[t] = crc32_iscsi(dst[t] + o, static_cast<int>(n), crc[t]);
          }
        });
      }
      for (std::thread& th : pool) th.join();
      std::printf("%d thread(s), %d x %.2f GiB, %s: %.3f s\n", threads, threads,
                  bytes / double(1 << 30), checksum ? "copy + CRC-32C" : "copy only",
                  Now() - t0);
    }
  }
  return 0;
}
