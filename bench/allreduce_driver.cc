#include "bench/allreduce_driver.h"

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/aligned_buffer.h"
#include "base/clock.h"
#include "comm/topology.h"
#include "kernels/reduce.h"

namespace strata::bench {
namespace {

double Percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  if (p <= 0) return v.front();
  const size_t idx = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size()))) - 1;
  return v[std::min(idx, v.size() - 1)];
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

Status CheckResult(const AlignedBuffer& out, size_t count, DType dtype, int n) {
  std::vector<float> got(count);
  ConvertBuffer(out.data(), dtype, got.data(), DType::kF32, count);
  const float want = static_cast<float>(n) * static_cast<float>(n + 1) / 2.0f;
  for (size_t i = 0; i < count; ++i) {
    if (got[i] != want) {
      return Status::Internal(fmt::format("allreduce result wrong at element {}: {} instead of {}",
                                          i, got[i], want));
    }
  }
  return Status::OK();
}

}  // namespace

StatusOr<std::vector<AllreduceResult>> RunAllreduceBench(const AllreduceBenchOptions& o) {
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  const size_t es = DTypeSize(o.dtype);
  for (size_t b : o.sizes_bytes) {
    if (b == 0 || b % es != 0) {
      return Status::InvalidArgument(fmt::format("size {} B is not a positive multiple of the "
                                                 "{}-byte {} element", b, es, DTypeName(o.dtype)));
    }
  }
  if (o.iters < 1 || o.warmup < 0) return Status::InvalidArgument("--iters must be >= 1");
  std::vector<AllreduceResult> results;
  const bool mpi_listed = std::find(o.transports.begin(), o.transports.end(),
                                    comm::TransportKind::kMpi) != o.transports.end();
  for (comm::TransportKind tk : o.transports) {
    STRATA_ASSIGN_OR_RETURN(std::unique_ptr<comm::Communicator> c,
                            comm::CreateFromMpi(MPI_COMM_WORLD, tk));
    std::vector<comm::Algorithm> algos;
    for (comm::Algorithm algo : o.algorithms) {
      if (algo == comm::Algorithm::kNative && !c->has_native()) continue;
      // kNative is MPI_Allreduce whichever transport strata's own algorithms use: measure it once.
      if (algo == comm::Algorithm::kNative && tk == comm::TransportKind::kTcp && mpi_listed) {
        continue;
      }
      algos.push_back(algo);
    }
    for (size_t bytes : o.sizes_bytes) {
      const size_t count = bytes / es;
      AlignedBuffer in(bytes), out(bytes);
      std::vector<float> fill(count, static_cast<float>(rank + 1));
      ConvertBuffer(fill.data(), DType::kF32, in.data(), o.dtype, count);
      if (rank == 0 && o.progress) {
        std::fprintf(stderr, "  bench allreduce: %-4s %8zu B, %zu algorithms x %d iters ...\n",
                     c->transport_name(), bytes, algos.size(), o.iters);
      }
      // Algorithms take turns within each iteration, so a noisy moment of a shared machine hits
      // them all alike instead of whichever happened to be measured then.
      std::vector<std::vector<double>> lat(algos.size(), std::vector<double>(o.iters));
      for (int it = -o.warmup; it < o.iters; ++it) {
        for (size_t a = 0; a < algos.size(); ++a) {
          comm::CollectiveOptions opts;
          opts.algorithm = algos[a];
          opts.hub = o.hub;
          // Start every call together so a late rank's wait is not billed to the algorithm.
          MPI_Barrier(MPI_COMM_WORLD);
          const int64_t t0 = NowNs();
          Status st = c->Allreduce(in.data(), out.data(), count, o.dtype, opts);
          const int64_t t1 = NowNs();
          if (!st.ok()) return st;
          if (it >= 0) lat[a][static_cast<size_t>(it)] = static_cast<double>(t1 - t0) / 1000.0;
          if (it == o.iters - 1) {
            STRATA_RETURN_IF_ERROR(CheckResult(out, count, o.dtype, size)
                                       .WithContext(fmt::format("{} over {}",
                                                                comm::AlgorithmName(algos[a]),
                                                                c->transport_name())));
          }
        }
      }
      for (size_t a = 0; a < algos.size(); ++a) {
        // An iteration lasts as long as its slowest rank.
        std::vector<double> worst(lat[a].size());
        MPI_Reduce(lat[a].data(), worst.data(), static_cast<int>(worst.size()), MPI_DOUBLE,
                   MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank != 0) continue;
        AllreduceResult r;
        r.algorithm = comm::AlgorithmName(algos[a]);
        r.transport = c->transport_name();
        r.ranks = size;
        r.nodes = c->topology().num_nodes;
        r.bytes = bytes;
        r.latency_us_median = Median(worst);
        r.latency_us_p99 = Percentile(worst, 0.99);
        r.latency_us_min = Percentile(worst, 0);
        r.emulated_link_delay_us = c->emulated_delay_us();
        results.push_back(r);
      }
    }
  }
  return results;
}

std::string AllreduceResultsToJson(const std::vector<AllreduceResult>& results,
                                   const AllreduceBenchOptions& o) {
  nlohmann::json j;
  j["benchmark"] = "allreduce";
  j["dtype"] = DTypeName(o.dtype);
  j["iters"] = o.iters;
  j["warmup"] = o.warmup;
  j["hostname_rank0"] = comm::LocalHostname();
  j["reduce_isa"] = kernels::ReduceIsa();
  j["results"] = nlohmann::json::array();
  for (const AllreduceResult& r : results) {
    j["results"].push_back({{"algorithm", r.algorithm},
                            {"transport", r.transport},
                            {"ranks", r.ranks},
                            {"nodes", r.nodes},
                            {"bytes", r.bytes},
                            {"latency_us_median", r.latency_us_median},
                            {"latency_us_p99", r.latency_us_p99},
                            {"latency_us_min", r.latency_us_min},
                            {"emulated_link_delay_us", r.emulated_link_delay_us},
                            {"implementation", r.algorithm == "native" ? "MPI_Allreduce (MPI library)"
                                                                      : "strata"}});
  }
  return j.dump(2);
}

std::string AllreduceResultsToTable(const std::vector<AllreduceResult>& results) {
  std::string out;
  std::vector<std::string> transports;
  for (const auto& r : results) {
    if (std::find(transports.begin(), transports.end(), r.transport) == transports.end()) {
      transports.push_back(r.transport);
    }
  }
  for (const std::string& t : transports) {
    std::vector<std::string> algos;
    std::set<size_t> sizes;
    std::map<std::pair<size_t, std::string>, const AllreduceResult*> cell;
    int ranks = 0, nodes = 0;
    int64_t delay = 0;
    for (const auto& r : results) {
      if (r.transport != t) continue;
      if (std::find(algos.begin(), algos.end(), r.algorithm) == algos.end()) {
        algos.push_back(r.algorithm);
      }
      sizes.insert(r.bytes);
      cell[{r.bytes, r.algorithm}] = &r;
      ranks = r.ranks;
      nodes = r.nodes;
      delay = r.emulated_link_delay_us;
    }
    out += fmt::format("allreduce latency, transport {}, {} ranks on {} node(s){}; "
                       "median / p99 in microseconds\n",
                       t, ranks, nodes,
                       delay > 0 && t == "tcp"
                           ? fmt::format(", EMULATED link delay {} us per message", delay)
                           : "");
    out += fmt::format("{:>10}", "bytes");
    for (const auto& a : algos) {
      out += fmt::format(" | {:>22}", a == "native" ? "native (MPI_Allreduce)" : a);
    }
    out += "\n";
    for (size_t b : sizes) {
      out += fmt::format("{:>10}", b);
      for (const auto& a : algos) {
        auto it = cell.find({b, a});
        out += it == cell.end() ? fmt::format(" | {:>22}", "-")
                                : fmt::format(" | {:>9.1f} / {:>10.1f}", it->second->latency_us_median,
                                              it->second->latency_us_p99);
      }
      out += "\n";
    }
    out += "\n";
  }
  return out;
}

}  // namespace strata::bench
