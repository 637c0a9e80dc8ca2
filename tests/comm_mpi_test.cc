// Run by CTest under `mpirun -np N --oversubscribe` (N = 2, 3, 4, 8): every collective over every
// algorithm x transport x dtype x size, checked on every rank against closed-form values. Each
// rank runs the same GoogleTest cases; the exit code is the worst over all ranks.
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/dtype.h"
#include "comm/communicator.h"
#include "comm/transport/mpi/mpi_transport.h"

namespace strata {
extern const char* g_preset_eager;  // the eager-limit variable as the test was started with
namespace {

using comm::Algorithm;
using comm::CollectiveOptions;
using comm::Communicator;
using comm::TransportKind;

// Element i of rank r: (r + 1) * ((i % 7) - 3): small integers, exact in bf16/f16 for N <= 8.
float Value(int r, size_t i) { return static_cast<float>((r + 1) * (static_cast<int>(i % 7) - 3)); }

float Expected(int n, size_t i, comm::ReduceOp op) {
  // Closed forms: sum_r (r+1) * k = k * n(n+1)/2; max_r (r+1) * k = k * (k > 0 ? n : 1).
  const float k = static_cast<float>(static_cast<int>(i % 7) - 3);
  if (op == comm::ReduceOp::kSum) return k * static_cast<float>(n * (n + 1) / 2);
  return k > 0 ? k * static_cast<float>(n) : k;
}

class MpiCollectives : public ::testing::TestWithParam<TransportKind> {
 protected:
  void SetUp() override {
    auto c = comm::CreateFromMpi(MPI_COMM_WORLD, GetParam());
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    comm_ = std::move(*c);
  }
  std::unique_ptr<Communicator> comm_;
};

TEST_P(MpiCollectives, AllreduceEveryAlgorithmDtypeSizeAndOp) {
  Communicator& c = *comm_;
  const int n = c.size();
  const std::vector<size_t> counts = {0, 1, 7, 4096, (size_t{1} << 20) + 3};
  for (Algorithm algo : {Algorithm::kStar, Algorithm::kRing, Algorithm::kTree, Algorithm::kNative,
                         Algorithm::kAuto}) {
    for (DType dt : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64}) {
      for (auto op : {comm::ReduceOp::kSum, comm::ReduceOp::kMax}) {
        for (size_t count : counts) {
          std::vector<float> mine(count), got(count);
          for (size_t i = 0; i < count; ++i) mine[i] = Value(c.rank(), i);
          AlignedBuffer in(count * DTypeSize(dt)), out(count * DTypeSize(dt));
          ConvertBuffer(mine.data(), DType::kF32, in.data(), dt, count);
          CollectiveOptions o;
          o.algorithm = algo;
          o.op = op;
          Status st = c.Allreduce(in.data(), out.data(), count, dt, o);
          ASSERT_TRUE(st.ok()) << st.ToString();
          ConvertBuffer(out.data(), dt, got.data(), DType::kF32, count);
          size_t bad = 0;
          for (size_t i = 0; i < count; ++i) bad += got[i] != Expected(n, i, op);
          ASSERT_EQ(bad, 0u) << comm::AlgorithmName(algo) << " " << DTypeName(dt) << " "
                             << kernels::ReduceOpName(op) << " count " << count << " over "
                             << c.transport_name() << ", e.g. element 1 = " << (count > 1 ? got[1] : 0)
                             << " want " << Expected(n, 1, op);
        }
      }
    }
  }
}

TEST_P(MpiCollectives, StarWithLastRankAsHubAndTinySegmentsInPlace) {
  Communicator& c = *comm_;
  const size_t count = 10007;
  std::vector<int64_t> buf(count);
  for (size_t i = 0; i < count; ++i) buf[i] = static_cast<int64_t>(Value(c.rank(), i));
  CollectiveOptions o;
  o.algorithm = Algorithm::kStar;
  o.hub = c.size() - 1;
  o.segment_bytes = 512;
  ASSERT_TRUE(c.Allreduce(buf.data(), buf.data(), count, DType::kI64, o).ok());
  for (size_t i = 0; i < count; ++i) {
    ASSERT_EQ(buf[i], static_cast<int64_t>(Expected(c.size(), i, comm::ReduceOp::kSum))) << i;
  }
}

TEST_P(MpiCollectives, BroadcastAllgatherReduceScatterBarrier) {
  Communicator& c = *comm_;
  const int n = c.size(), me = c.rank();
  for (Algorithm algo : {Algorithm::kStar, Algorithm::kTree, Algorithm::kNative, Algorithm::kAuto}) {
    CollectiveOptions o;
    o.algorithm = algo;
    ASSERT_TRUE(c.Barrier(o).ok()) << comm::AlgorithmName(algo);
    for (int root = 0; root < n; ++root) {
      std::vector<int32_t> buf(4099, me == root ? 7 * root + 1 : -1);
      ASSERT_TRUE(c.Broadcast(buf.data(), buf.size() * 4, root, o).ok());
      for (int32_t v : buf) ASSERT_EQ(v, 7 * root + 1) << comm::AlgorithmName(algo);
    }
  }
  for (Algorithm algo : {Algorithm::kStar, Algorithm::kRing, Algorithm::kNative, Algorithm::kAuto}) {
    CollectiveOptions o;
    o.algorithm = algo;
    const size_t per = 1025;
    std::vector<int64_t> mine(per), all(per * n);
    for (size_t i = 0; i < per; ++i) mine[i] = me * 100000 + static_cast<int64_t>(i);
    ASSERT_TRUE(c.Allgather(mine.data(), all.data(), per * 8, o).ok());
    for (int r = 0; r < n; ++r) {
      for (size_t i = 0; i < per; ++i) ASSERT_EQ(all[r * per + i], r * 100000 + static_cast<int64_t>(i));
    }
    std::vector<float> in(per * n), out(per);
    for (int b = 0; b < n; ++b) {
      for (size_t i = 0; i < per; ++i) in[b * per + i] = static_cast<float>(me + b);
    }
    ASSERT_TRUE(c.ReduceScatter(in.data(), out.data(), per, DType::kF32, o).ok());
    for (float v : out) ASSERT_EQ(v, static_cast<float>(n * (n - 1) / 2 + n * me));
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, MpiCollectives,
                         ::testing::Values(TransportKind::kMpi, TransportKind::kTcp),
                         [](const auto& p) { return std::string(comm::TransportKindName(p.param)); });

TEST(MpiTopology, MatchesTheLauncherVariables) {
  auto topo = comm::mpi::DiscoverTopology(MPI_COMM_WORLD);
  ASSERT_TRUE(topo.ok());
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(topo->rank, rank);
  EXPECT_EQ(topo->size, size);
  EXPECT_EQ(topo->num_nodes, 1);  // CTest runs every rank on this host
  EXPECT_EQ(topo->local_size, size);
  EXPECT_EQ(topo->local_rank, rank);
  if (const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK")) {
    EXPECT_EQ(topo->local_rank, std::atoi(lr));
  }
  ASSERT_EQ(topo->node_of_rank.size(), static_cast<size_t>(size));
}

// A rank that arrives too late makes the others return DEADLINE_EXCEEDED instead of hanging.
TEST(MpiTimeout, LateRankMakesOthersTimeOut) {
  auto made = comm::CreateFromMpi(MPI_COMM_WORLD, TransportKind::kMpi);
  ASSERT_TRUE(made.ok());
  Communicator& c = **made;
  const int late = c.size() - 1;
  float x[4] = {1, 2, 3, 4};
  CollectiveOptions o;
  o.algorithm = Algorithm::kStar;
  o.timeout = std::chrono::milliseconds(300);
  if (c.rank() == late) std::this_thread::sleep_for(std::chrono::milliseconds(1200));
  Status st = c.Allreduce(x, x, 4, DType::kF32, o);
  EXPECT_FALSE(st.ok());
  if (c.rank() != late) {
    EXPECT_EQ(st.code(), StatusCode::kDeadlineExceeded) << st.ToString();
  }
  MPI_Barrier(MPI_COMM_WORLD);
}

// Reads an Open MPI control variable through the MPI tool interface; -1 if it does not exist.
long long ReadCvar(const std::string& want) {
  int provided = 0, num = 0;
  if (MPI_T_init_thread(MPI_THREAD_SINGLE, &provided) != MPI_SUCCESS) return -1;
  MPI_T_cvar_get_num(&num);
  long long value = -1;
  for (int i = 0; i < num && value < 0; ++i) {
    char name[256], desc[1024];
    int name_len = sizeof(name), desc_len = sizeof(desc), verbosity = 0, bind = 0, scope = 0;
    MPI_Datatype type;
    MPI_T_enum enumtype;
    if (MPI_T_cvar_get_info(i, name, &name_len, &verbosity, &type, &enumtype, desc, &desc_len,
                            &bind, &scope) != MPI_SUCCESS || want != name) {
      continue;
    }
    MPI_T_cvar_handle handle;
    int count = 0;
    if (MPI_T_cvar_handle_alloc(i, nullptr, &handle, &count) != MPI_SUCCESS) break;
    unsigned long long buf[4] = {};
    if (MPI_T_cvar_read(handle, buf) == MPI_SUCCESS) {
      int size = 0;
      MPI_Type_size(type, &size);
      if (size == 4) {
        uint32_t v32;
        std::memcpy(&v32, buf, sizeof(v32));
        value = v32;
      } else {
        value = static_cast<long long>(buf[0]);
      }
    }
    MPI_T_cvar_handle_free(&handle);
  }
  MPI_T_finalize();
  return value;
}

// Decode's 8 KiB partial sums go eager over shared memory: the limit Open MPI took from the
// variable EnsureInitialized set is kSharedMemoryEagerLimit (or what the user preset).
TEST(MpiInit, RaisesSharedMemoryEagerLimit) {
  const char* var = comm::mpi::SharedMemoryEagerLimitVariable();
  if (var == nullptr) GTEST_SKIP() << "not Open MPI";
  const std::string cvar = std::string(var).substr(std::strlen("OMPI_MCA_"));
  const long long expected = g_preset_eager != nullptr ? std::atoll(g_preset_eager)
                                                        : comm::mpi::kSharedMemoryEagerLimit;
  EXPECT_EQ(ReadCvar(cvar), expected) << cvar;
}

}  // namespace

const char* g_preset_eager = nullptr;
}  // namespace strata

int main(int argc, char** argv) {
  // The launcher's way in (comm::mpi::EnsureInitialized), which tunes Open MPI before MPI_Init.
  const char* var = strata::comm::mpi::SharedMemoryEagerLimitVariable();
  if (var != nullptr && std::getenv(var) != nullptr) strata::g_preset_eager = std::getenv(var);
  if (strata::Status st = strata::comm::mpi::EnsureInitialized(&argc, &argv); !st.ok()) {
    std::fprintf(stderr, "comm_mpi_test: %s\n", st.ToString().c_str());
    return 1;
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) ::testing::GTEST_FLAG(brief) = true;  // failures only from the other ranks
  ::testing::InitGoogleTest(&argc, argv);
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0 && any_failed) std::fprintf(stderr, "comm_mpi_test: some rank failed\n");
  MPI_Finalize();
  return any_failed;
}
