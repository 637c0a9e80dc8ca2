// Placement discovery from the variables Open MPI, PMIx and Slurm export, and atomic file writes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "launcher/commands.h"
#include "launcher/discovery.h"

namespace strata::launcher {
namespace {

const char* kVars[] = {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                       "OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_NODE_RANK", "PMIX_RANK",
                       "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODEID",
                       "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE", "OMPI_MCA_orte_ess_jobid"};

class DiscoveryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const char* v : kVars) unsetenv(v);
  }
  void TearDown() override { SetUp(); }
};

TEST_F(DiscoveryTest, NoLauncherMeansOneRank) {
  const Placement p = DiscoverFromEnv();
  EXPECT_EQ(p.source, "none");
  EXPECT_EQ(p.rank, 0);
  EXPECT_EQ(p.size, 1);
  EXPECT_FALSE(p.hostname.empty());
}

TEST_F(DiscoveryTest, OpenMpiVariablesWin) {
  setenv("OMPI_COMM_WORLD_RANK", "5", 1);
  setenv("OMPI_COMM_WORLD_SIZE", "8", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "2", 1);
  setenv("SLURM_PROCID", "3", 1);  // mpirun inside an allocation: Open MPI's view is the job's
  setenv("SLURM_JOB_NAME", "train-7b", 1);
  const Placement p = DiscoverFromEnv();
  EXPECT_EQ(p.source, "openmpi");
  EXPECT_EQ(p.rank, 5);
  EXPECT_EQ(p.size, 8);
  EXPECT_EQ(p.local_rank, 1);
  EXPECT_EQ(p.local_size, 2);
  EXPECT_EQ(p.job, "train-7b");
}

TEST_F(DiscoveryTest, PmixRankWithSlurmLayout) {
  setenv("PMIX_RANK", "4", 1);
  setenv("SLURM_NTASKS", "6", 1);
  setenv("SLURM_LOCALID", "0", 1);
  setenv("SLURM_NODEID", "2", 1);
  const Placement p = DiscoverFromEnv();
  EXPECT_EQ(p.source, "pmix");
  EXPECT_EQ(p.rank, 4);
  EXPECT_EQ(p.size, 6);
  EXPECT_EQ(p.node, 2);
}

TEST_F(DiscoveryTest, PlainSlurm) {
  setenv("SLURM_PROCID", "2", 1);
  setenv("SLURM_NTASKS", "3", 1);
  setenv("SLURM_LOCALID", "1", 1);
  setenv("SLURM_NODEID", "1", 1);
  const Placement p = DiscoverFromEnv();
  EXPECT_EQ(p.source, "slurm");
  EXPECT_EQ(p.rank, 2);
  EXPECT_EQ(p.size, 3);
  EXPECT_EQ(p.local_rank, 1);
  EXPECT_EQ(p.node, 1);
}

TEST_F(DiscoveryTest, GarbageIsIgnoredNotMisread) {
  setenv("SLURM_PROCID", "two", 1);
  EXPECT_EQ(DiscoverFromEnv().source, "none");
}

TEST(WriteFileAtomically, WritesWholeFileAndReportsErrors) {
  const std::string path = ::testing::TempDir() + "/strata-atomic.json";
  std::string err;
  ASSERT_TRUE(WriteFileAtomically(path, "{\"a\": 1}\n", &err)) << err;
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), "{\"a\": 1}\n");
  EXPECT_FALSE(WriteFileAtomically("/nonexistent-dir/x.json", "x", &err));
  EXPECT_NE(err.find("nonexistent-dir"), std::string::npos);
  std::remove(path.c_str());
}

}  // namespace
}  // namespace strata::launcher

#include "launcher/sampling.h"

namespace strata::launcher {
namespace {

TEST(Sampler, GreedyTakesTheArgmax) {
  const float logits[5] = {0.1f, 3.0f, -1.0f, 2.9f, 0.0f};
  Sampler s({/*greedy=*/true, 1.0f, 1.0f, 7});
  for (int i = 0; i < 10; ++i) EXPECT_EQ(s.Sample(logits, 5), 1);
}

TEST(Sampler, TinyTopPIsGreedyAndSeedsReproduce) {
  const float logits[5] = {0.1f, 3.0f, -1.0f, 2.9f, 0.0f};
  Sampler nucleus({false, 1.0f, 0.01f, 7});
  for (int i = 0; i < 10; ++i) EXPECT_EQ(nucleus.Sample(logits, 5), 1);
  Sampler a({false, 1.0f, 1.0f, 42}), b({false, 1.0f, 1.0f, 42});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(a.Sample(logits, 5), b.Sample(logits, 5));
}

TEST(Sampler, FrequenciesFollowTheSoftmax) {
  // Two tokens with logits 0 and ln 3 at temperature 1: probabilities 1/4 and 3/4.
  const float logits[2] = {0.0f, std::log(3.0f)};
  Sampler s({false, 1.0f, 1.0f, 123});
  int ones = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ones += s.Sample(logits, 2) == 1;
  EXPECT_NEAR(static_cast<double>(ones) / n, 0.75, 0.02);
}

}  // namespace
}  // namespace strata::launcher
