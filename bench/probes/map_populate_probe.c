// Throwaway-sized probe behind docs/DECISIONS.md ("Shard blocks aligned to 2 MiB"): maps a file
// the way memory/weight_window.cc does (2 MiB-aligned, MADV_HUGEPAGE) and times, three times,
// prefaulting it (MADV_POPULATE_READ), touching a byte per page, and dropping it (MADV_DONTNEED);
// prints how much of it the kernel mapped with 2 MiB entries (FilePmdMapped in smaps).
//   gcc -O2 -o /tmp/map_populate_probe bench/probes/map_populate_probe.c
//   /tmp/map_populate_probe SHARD_FILE
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s FILE\n", argv[0]);
    return 2;
  }
  int fd = open(argv[1], O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) {
    perror(argv[1]);
    return 1;
  }
  const size_t n = (size_t)st.st_size, huge = 2u << 20;
  unsigned char* r = mmap(0, n + huge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  unsigned char* base = (unsigned char*)(((unsigned long)r + huge - 1) & ~(huge - 1));
  munmap(r, n + huge);
  unsigned char* p = mmap(base, n, PROT_READ, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
  if (p == MAP_FAILED) {
    perror("mmap");
    return 1;
  }
  madvise(p, n, MADV_HUGEPAGE);
  for (int it = 0; it < 3; it++) {
    const double t0 = now();
    madvise(p, n, 22 /* MADV_POPULATE_READ */);
    const double t1 = now();
    volatile unsigned long sum = 0;
    for (size_t i = 0; i < n; i += 4096) sum += p[i];
    const double t2 = now();
    char cmd[256];
    snprintf(cmd, sizeof cmd, "grep -A22 '^%lx' /proc/%d/smaps | grep FilePmdMapped",
             (unsigned long)p, getpid());
    if (system(cmd) != 0) fprintf(stderr, "(no FilePmdMapped line)\n");
    madvise(p, n, MADV_DONTNEED);
    const double t3 = now();
    printf("populate %.1f ms  touch %.1f ms  dontneed %.1f ms  (%.2f GB)\n", (t1 - t0) * 1e3,
           (t2 - t1) * 1e3, (t3 - t2) * 1e3, n / 1e9);
  }
  return 0;
}
