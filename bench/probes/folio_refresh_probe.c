// Probe behind docs/DECISIONS.md ("Shard blocks aligned to 2 MiB", update of 2026-12-02): maps a
// shard file as memory/weight_window.cc does (2 MiB-aligned, MADV_HUGEPAGE), prefaults it and
// prints how much of it the page tables map 2 MiB at a time (FilePmdMapped / Rss in smaps).
// With "collapse" it then tries MADV_COLLAPSE (EINVAL for regular files on the kernel here);
// with "drop" it first drops the file's page cache (POSIX_FADV_DONTNEED, as strata shard now
// does after writing) so the prefault reads it back through the hinted mapping.
//   gcc -O2 -o /tmp/folio_refresh_probe bench/probes/folio_refresh_probe.c
//   /tmp/folio_refresh_probe rank-0.shard              # state as found
//   /tmp/folio_refresh_probe rank-0.shard collapse     # MADV_COLLAPSE: EINVAL, share unchanged
//   /tmp/folio_refresh_probe rank-0.shard drop         # 1.5 s for 4.2 GiB, then 100%
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}

static void report(const char* tag, const char* base, size_t n) {
  FILE* f = fopen("/proc/self/smaps", "r");
  char line[512];
  int in = 0;
  long rss = 0, pmd = 0;
  while (fgets(line, sizeof line, f)) {
    unsigned long a, b;
    char dash;
    if (sscanf(line, "%lx%c%lx ", &a, &dash, &b) == 3 && dash == '-') {
      in = a >= (unsigned long)base && b <= (unsigned long)base + ((n + 4095) & ~4095ul);
    } else if (in && !strncmp(line, "Rss:", 4)) {
      rss += atol(line + 4);
    } else if (in && !strncmp(line, "FilePmdMapped:", 14)) {
      pmd += atol(line + 14);
    }
  }
  fclose(f);
  printf("%s: resident %ld MiB, mapped 2 MiB at a time %ld MiB (%.0f%%)\n", tag, rss / 1024,
         pmd / 1024, rss ? 100.0 * pmd / rss : 0.0);
}

int main(int argc, char** argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s FILE [collapse|drop]\n", argv[0]);
    return 2;
  }
  const char* what = argc > 2 ? argv[2] : "";
  int fd = open(argv[1], O_RDONLY);
  struct stat st;
  if (fd < 0 || fstat(fd, &st) != 0) {
    perror(argv[1]);
    return 1;
  }
  size_t n = st.st_size, al = 2u << 20;
  if (!strcmp(what, "drop")) printf("fadvise(DONTNEED): %d\n", posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED));
  char* r = mmap(0, n + al, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  char* a = (char*)(((unsigned long)r + al - 1) & ~(al - 1));
  char* p = mmap(a, n, PROT_READ, MAP_SHARED | MAP_FIXED, fd, 0);
  printf("MADV_HUGEPAGE: %d\n", madvise(p, n, MADV_HUGEPAGE));
  double t = now();
  madvise(p, n, 22 /* MADV_POPULATE_READ */);
  printf("prefault: %.3f s\n", now() - t);
  report("after prefault", p, n);
  if (!strcmp(what, "collapse")) {
    int rc = madvise(p, n, 25 /* MADV_COLLAPSE */);
    printf("MADV_COLLAPSE: %d (%s)\n", rc, rc ? strerror(errno) : "ok");
    madvise(p, n, MADV_DONTNEED);
    madvise(p, n, 22);
    report("after collapse", p, n);
  }
  return 0;
}
