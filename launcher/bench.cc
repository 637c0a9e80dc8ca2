// `strata bench ...`: multi-rank benchmarks launched by mpirun/srun.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <sstream>

#include "base/cpus.h"
#include "bench/allreduce_driver.h"
#include "bench/membw.h"
#include "comm/communicator.h"
#include "comm/transport/mpi/mpi_transport.h"
#include "launcher/commands.h"

namespace strata::launcher {
namespace {

std::vector<std::string> SplitCommas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

struct AllreduceArgs {
  std::string algorithms = "star,ring,tree,native";
  std::string transports = "mpi";
  std::string sizes = "8,4096,65536,1048576";
  std::string dtype = "f32";
  int iters = 200;
  int warmup = 20;
  int hub = -1;
  bool json = false;
  std::string out;
};

int RunAllreduce(const AllreduceArgs& a) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "strata bench allreduce: %s\n", st.ToString().c_str());
    return 1;
  };
  bench::AllreduceBenchOptions o;
  for (const std::string& s : SplitCommas(a.algorithms)) {
    StatusOr<comm::Algorithm> algo = comm::ParseAlgorithm(s);
    if (!algo.ok()) return fail(algo.status());
    o.algorithms.push_back(*algo);
  }
  for (const std::string& s : SplitCommas(a.transports)) {
    StatusOr<comm::TransportKind> t = comm::ParseTransportKind(s);
    if (!t.ok()) return fail(t.status());
    o.transports.push_back(*t);
  }
  for (const std::string& s : SplitCommas(a.sizes)) {
    char* end = nullptr;
    const unsigned long long v = std::strtoull(s.c_str(), &end, 10);
    if (end == s.c_str() || *end != '\0') {
      return fail(Status::InvalidArgument("--sizes: '" + s + "' is not a byte count"));
    }
    o.sizes_bytes.push_back(static_cast<size_t>(v));
  }
  StatusOr<DType> dt = ParseDType(a.dtype);
  if (!dt.ok()) return fail(dt.status());
  o.dtype = *dt;
  o.iters = a.iters;
  o.warmup = a.warmup;
  o.hub = a.hub;

  Status st = comm::mpi::EnsureInitialized(nullptr, nullptr);
  if (!st.ok()) return fail(st);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  StatusOr<std::vector<bench::AllreduceResult>> results = bench::RunAllreduceBench(o);
  if (!results.ok()) {
    std::fprintf(stderr, "strata bench allreduce (rank %d): %s\n", rank,
                 results.status().ToString().c_str());
    MPI_Abort(MPI_COMM_WORLD, 1);  // the other ranks may be blocked in MPI: end the job
    return 1;
  }
  if (rank != 0) return 0;
  const std::string table = bench::AllreduceResultsToTable(*results);
  const std::string json = bench::AllreduceResultsToJson(*results, o);
  std::fputs(table.c_str(), a.json ? stderr : stdout);
  if (!a.out.empty()) {
    std::string err;
    if (!WriteFileAtomically(a.out, json + "\n", &err)) {
      std::fprintf(stderr, "strata bench allreduce: cannot write %s: %s\n", a.out.c_str(),
                   err.c_str());
      return 1;
    }
    std::fprintf(stderr, "wrote %s\n", a.out.c_str());
  }
  if (a.json) std::printf("%s\n", json.c_str());
  return 0;
}

struct MembwArgs {
  double mib = 1024;
  int threads = 0;
  int reps = 5;
  bool json = false;
};

int RunMembwCommand(const MembwArgs& a) {
  auto fail = [](const Status& st) {
    std::fprintf(stderr, "strata bench membw: %s\n", st.ToString().c_str());
    return 1;
  };
  if (Status st = comm::mpi::EnsureInitialized(nullptr, nullptr); !st.ok()) return fail(st);
  auto c = comm::CreateFromMpi(MPI_COMM_WORLD, comm::TransportKind::kMpi);
  if (!c.ok()) return fail(c.status());
  comm::Communicator& comm = **c;
  bench::MembwOptions o;
  o.bytes = static_cast<size_t>(a.mib * 1024 * 1024);
  const int local = std::max(1, comm.topology().local_size);
  std::string note;
  o.threads = a.threads > 0 ? a.threads : DefaultRankThreads(local, &note);
  if (!note.empty()) {
    std::fprintf(stderr, "strata bench membw: rank %d: %s\n", comm.rank(), note.c_str());
  }
  o.reps = a.reps;
  auto r = bench::RunMembw(o, &comm);
  if (!r.ok()) return fail(r.status());
  if (comm.rank() == 0) {
    if (a.json) {
      std::string per_rank, medians;
      for (double g : r->all_gbps) per_rank += (per_rank.empty() ? "" : ", ") + std::to_string(g);
      for (double g : r->all_gbps_median) {
        medians += (medians.empty() ? "" : ", ") + std::to_string(g);
      }
      std::printf("{\"ranks\": %d, \"threads_per_rank\": %d, \"bytes_per_rank\": %zu, "
                  "\"rank_gbps\": [%s], \"rank_gbps_median\": [%s], \"total_gbps\": %.3f, "
                  "\"rank0_gbps_median\": %.3f}\n",
                  comm.size(), o.threads, o.bytes, per_rank.c_str(), medians.c_str(),
                  r->total_gbps, r->rank_gbps_median);
    } else {
      std::printf("streaming read: %d rank(s) x %d thread(s), %.0f MiB each\n", comm.size(),
                  o.threads, a.mib);
      for (size_t i = 0; i < r->all_gbps.size(); ++i) {
        std::printf("  rank %zu  %.2f GB/s (best of %d)\n", i, r->all_gbps[i], o.reps);
      }
      std::printf("  total   %.2f GB/s   (rank 0 median %.2f GB/s)\n", r->total_gbps,
                  r->rank_gbps_median);
    }
  }
  return 0;
}

}  // namespace

void AddBenchCommands(CLI::App& root, std::vector<Command>& commands) {
  CLI::App* bench = root.add_subcommand("bench", "Multi-rank benchmarks (launch with mpirun/srun)");
  bench->require_subcommand(1);

  auto a = std::make_shared<AllreduceArgs>();
  CLI::App* ar = bench->add_subcommand(
      "allreduce",
      "Allreduce latency (median and p99 over iterations; an iteration lasts as long as its "
      "slowest rank) per algorithm, transport and message size. Every result is checked against "
      "the closed form before it is reported.\n"
      "Example: mpirun -np 4 --oversubscribe strata bench allreduce --transport mpi,tcp\n"
      "STRATA_LINK_DELAY_US adds an EMULATED one-way delay to tcp messages (marked in the "
      "output).");
  ar->add_option("--algorithms", a->algorithms, "Comma list of star, ring, tree, native, auto")
      ->capture_default_str();
  ar->add_option("--transport,--transports", a->transports, "Comma list of mpi, tcp")
      ->capture_default_str();
  ar->add_option("--sizes", a->sizes, "Comma list of message sizes in bytes")
      ->capture_default_str();
  ar->add_option("--dtype", a->dtype, "Element type: f32, bf16, f16, i32, i64")
      ->capture_default_str();
  ar->add_option("--iters", a->iters, "Timed iterations per point")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  ar->add_option("--warmup", a->warmup, "Untimed iterations before timing")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  ar->add_option("--hub", a->hub, "Star hub rank (default STRATA_STAR_HUB, 0)");
  ar->add_flag("--json", a->json, "Print the results as JSON on stdout (the table goes to stderr)");
  ar->add_option("--out", a->out, "Also write the JSON to this file (temp + fsync + rename)");
  commands.push_back({ar, [a]() { return RunAllreduce(*a); }});

  auto m = std::make_shared<MembwArgs>();
  CLI::App* mb = bench->add_subcommand(
      "membw",
      "Streaming read bandwidth: every rank reads its own buffer with its threads, all ranks at "
      "once, as decoding ranks read their weights. The decode floor of a model is the bytes a "
      "rank reads per token divided by this bandwidth.\n"
      "Example: mpirun -np 2 strata bench membw --threads 1");
  mb->add_option("--mib", m->mib, "Buffer per rank in MiB (beyond the caches)")
      ->capture_default_str();
  mb->add_option("--threads", m->threads, "Threads per rank (0: cores / ranks on the node)")
      ->capture_default_str();
  mb->add_option("--reps", m->reps, "Timed passes (the best is reported, and rank 0's median)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  mb->add_flag("--json", m->json, "Print one JSON object");
  commands.push_back({mb, [m]() { return RunMembwCommand(*m); }});
}

}  // namespace strata::launcher
