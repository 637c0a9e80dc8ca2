// Pieces of comm/ that need no peers: the auto table, name parsing, topology from host names.
#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>

#include "comm/auto_table.h"
#include "comm/communicator.h"
#include "comm/topology.h"

namespace strata::comm {
namespace {

std::string WriteTemp(const std::string& text) {
  char name[] = "/tmp/strata-table-XXXXXX";
  const int fd = mkstemp(name);
  EXPECT_GE(fd, 0);
  close(fd);
  std::ofstream(name) << text;
  return name;
}

TEST(AutoTable, PicksTheFastestMeasuredAlgorithmAtTheNearestPoint) {
  const std::string path = WriteTemp(R"({"results": [
    {"algorithm": "star", "transport": "tcp", "ranks": 4, "bytes": 4096, "latency_us_median": 50},
    {"algorithm": "ring", "transport": "tcp", "ranks": 4, "bytes": 4096, "latency_us_median": 90},
    {"algorithm": "star", "transport": "tcp", "ranks": 4, "bytes": 1048576, "latency_us_median": 900},
    {"algorithm": "ring", "transport": "tcp", "ranks": 4, "bytes": 1048576, "latency_us_median": 600},
    {"algorithm": "native", "transport": "tcp", "ranks": 4, "bytes": 4096, "latency_us_median": 10},
    {"algorithm": "tree", "transport": "mpi", "ranks": 8, "bytes": 4096, "latency_us_median": 1}
  ]})");
  StatusOr<AutoTable> t = AutoTable::FromBenchJson(path);
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->Pick("tcp", 4, 4096, /*native_available=*/false), Algorithm::kStar);
  EXPECT_EQ(t->Pick("tcp", 4, 4096, /*native_available=*/true), Algorithm::kNative);
  EXPECT_EQ(t->Pick("tcp", 4, 800 << 10, false), Algorithm::kRing);   // nearest on a log scale
  EXPECT_EQ(t->Pick("tcp", 5, 6000, false), Algorithm::kStar);        // nearest rank count
  EXPECT_EQ(t->Pick("mpi", 2, 4096, false), Algorithm::kTree);        // only mpi entry
  // Nothing measured for this transport: star for small, ring for large.
  EXPECT_EQ(t->Pick("ucx", 4, 64, false), Algorithm::kStar);
  EXPECT_EQ(t->Pick("ucx", 4, 64 << 20, false), Algorithm::kRing);
  std::remove(path.c_str());
}

TEST(AutoTable, BadFilesAreClearErrors) {
  EXPECT_EQ(AutoTable::FromBenchJson("/nonexistent/t.json").status().code(), StatusCode::kNotFound);
  const std::string not_json = WriteTemp("{results: oops");
  EXPECT_EQ(AutoTable::FromBenchJson(not_json).status().code(), StatusCode::kInvalidArgument);
  const std::string no_results = WriteTemp(R"({"benchmark": "allreduce"})");
  StatusOr<AutoTable> t = AutoTable::FromBenchJson(no_results);
  EXPECT_EQ(t.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("results"), std::string::npos);
  const std::string bad_algo = WriteTemp(R"({"results": [{"algorithm": "hypercube",
    "transport": "tcp", "ranks": 4, "bytes": 8, "latency_us_median": 1}]})");
  EXPECT_EQ(AutoTable::FromBenchJson(bad_algo).status().code(), StatusCode::kInvalidArgument);
  for (const auto& p : {not_json, no_results, bad_algo}) std::remove(p.c_str());
}

TEST(AutoTable, BuiltInTableIsMeasuredAndCoversBothTransports) {
  const AutoTable t = AutoTable::BuiltIn();
  bool mpi = false, tcp = false;
  for (const AutoEntry& e : t.entries()) {
    mpi |= e.transport == "mpi";
    tcp |= e.transport == "tcp";
    EXPECT_GT(e.latency_us, 0);
  }
  EXPECT_TRUE(mpi);
  EXPECT_TRUE(tcp);
}

TEST(Names, ParseRoundTripsAndRejectsUnknown) {
  for (Algorithm a : {Algorithm::kAuto, Algorithm::kStar, Algorithm::kRing, Algorithm::kTree,
                      Algorithm::kNative}) {
    EXPECT_EQ(*ParseAlgorithm(AlgorithmName(a)), a);
  }
  EXPECT_EQ(ParseAlgorithm("butterfly").status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(*ParseTransportKind("tcp"), TransportKind::kTcp);
  EXPECT_EQ(ParseTransportKind("carrier-pigeon").status().code(), StatusCode::kInvalidArgument);
}

TEST(Topology, NodesNumberedByLowestRankAndLocalRanksCounted) {
  const std::vector<std::string> hosts = {"b", "a", "b", "c", "a", "b"};
  const Topology t = TopologyFromNames(5, hosts);
  EXPECT_EQ(t.num_nodes, 3);
  EXPECT_EQ(t.node_of_rank, (std::vector<int>{0, 1, 0, 2, 1, 0}));
  EXPECT_EQ(t.node, 0);
  EXPECT_EQ(t.local_rank, 2);  // ranks 0, 2 come before 5 on host b
  EXPECT_EQ(t.local_size, 3);
  EXPECT_FALSE(t.single_node());
}

}  // namespace
}  // namespace strata::comm
