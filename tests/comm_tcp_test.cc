// The tcp transport and the collectives over it, with ranks as forked processes: correctness
// against closed forms, bitwise rank-order reduction, emulated delay, and failures (a killed
// rank, a stopped rank, mismatched calls) that must end in an error within the timeout.
#include <gtest/gtest.h>

#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/clock.h"
#include "base/dtype.h"
#include "comm/communicator.h"
#include "tests/multiproc.h"

namespace strata {
namespace {

using comm::Algorithm;
using comm::CollectiveOptions;
using comm::Communicator;
using testing::ChildReport;
using testing::ChildResult;
using testing::ProcessGroup;

comm::CommConfig Config(int timeout_ms) {
  comm::CommConfig c;
  c.timeout = std::chrono::milliseconds(timeout_ms);
  return c;
}

comm::tcp::TcpOptions Loopback(int64_t delay_us = 0) {
  comm::tcp::TcpOptions o;
  o.ifname = "lo";
  o.link_delay_us = delay_us;
  o.connect_timeout = std::chrono::milliseconds(30000);
  return o;
}

ChildResult Ok() { return {Status::OK(), NowNs()}; }
ChildResult Fail(Status st) { return {std::move(st), NowNs()}; }

void ExpectAllOk(const std::vector<ChildReport>& reports) {
  for (size_t r = 0; r < reports.size(); ++r) {
    EXPECT_EQ(reports[r].exit_code, 0) << "rank " << r << " (signal " << reports[r].term_signal
                                       << "): " << reports[r].message;
  }
}

// Element i of rank r: (r + 1) * ((i % 7) - 3), small integers exact in every dtype.
float Value(int r, size_t i) { return static_cast<float>((r + 1) * (static_cast<int>(i % 7) - 3)); }

ChildResult CheckAllreduce(Communicator& c, Algorithm algo, DType dt, comm::ReduceOp op,
                           size_t count, bool in_place) {
  const int n = c.size();
  std::vector<float> mine(count), want(count), got(count);
  for (size_t i = 0; i < count; ++i) {
    mine[i] = Value(c.rank(), i);
    float acc = Value(0, i);
    for (int r = 1; r < n; ++r) {
      acc = op == comm::ReduceOp::kSum ? acc + Value(r, i) : std::max(acc, Value(r, i));
    }
    want[i] = acc;
  }
  AlignedBuffer in(count * DTypeSize(dt)), out(count * DTypeSize(dt));
  ConvertBuffer(mine.data(), DType::kF32, in.data(), dt, count);
  CollectiveOptions opts;
  opts.algorithm = algo;
  opts.op = op;
  opts.segment_bytes = 1000;  // many segments even for small buffers
  void* dst = in_place ? in.data() : out.data();
  Status st = c.Allreduce(in.data(), dst, count, dt, opts);
  if (!st.ok()) return Fail(st);
  ConvertBuffer(dst, dt, got.data(), DType::kF32, count);
  for (size_t i = 0; i < count; ++i) {
    if (got[i] != want[i]) {
      return Fail(Status::Internal(fmt::format("{} {} {} count {}: element {} is {}, want {}",
                                               comm::AlgorithmName(algo), DTypeName(dt),
                                               kernels::ReduceOpName(op), count, i, got[i],
                                               want[i])));
    }
  }
  return Ok();
}

TEST(TcpCollectives, AllreduceMatchesClosedFormForEveryAlgorithm) {
  for (int n : {2, 3}) {
    ProcessGroup group(n, Loopback(), Config(20000), [](Communicator& c) -> ChildResult {
      for (Algorithm algo : {Algorithm::kStar, Algorithm::kRing, Algorithm::kTree,
                             Algorithm::kAuto}) {
        for (DType dt : {DType::kF32, DType::kBF16, DType::kF16, DType::kI32, DType::kI64}) {
          for (auto op : {comm::ReduceOp::kSum, comm::ReduceOp::kMax}) {
            for (size_t count : {size_t{0}, size_t{1}, size_t{7}, size_t{4096}, size_t{100003}}) {
              for (bool in_place : {false, true}) {
                ChildResult r = CheckAllreduce(c, algo, dt, op, count, in_place);
                if (!r.status.ok()) return r;
              }
            }
          }
        }
      }
      // Native collectives need MPI: a tcp group without MPI says so instead of guessing.
      float x = 1;
      CollectiveOptions native;
      native.algorithm = Algorithm::kNative;
      Status st = c.Allreduce(&x, &x, 1, DType::kF32, native);
      if (st.code() != StatusCode::kUnimplemented) {
        return Fail(Status::Internal("native without MPI gave " + st.ToString()));
      }
      return Ok();
    });
    ExpectAllOk(group.Wait());
  }
}

TEST(TcpCollectives, OtherCollectivesMatchClosedForm) {
  const int n = 3;
  ProcessGroup group(n, Loopback(), Config(20000), [n](Communicator& c) -> ChildResult {
    const int me = c.rank();
    for (Algorithm algo : {Algorithm::kStar, Algorithm::kTree, Algorithm::kAuto}) {
      CollectiveOptions o;
      o.algorithm = algo;
      if (Status st = c.Barrier(o); !st.ok()) return Fail(st);
      for (int root = 0; root < n; ++root) {
        std::vector<int64_t> buf(1001, me == root ? 1000 + root : -1);
        if (Status st = c.Broadcast(buf.data(), buf.size() * 8, root, o); !st.ok()) return Fail(st);
        for (int64_t v : buf) {
          if (v != 1000 + root) return Fail(Status::Internal("broadcast wrong value"));
        }
      }
    }
    for (Algorithm algo : {Algorithm::kStar, Algorithm::kRing}) {
      CollectiveOptions o;
      o.algorithm = algo;
      const size_t per = 333;
      std::vector<int32_t> mine(per), all(per * n);
      for (size_t i = 0; i < per; ++i) mine[i] = me * 10000 + static_cast<int32_t>(i);
      if (Status st = c.Allgather(mine.data(), all.data(), per * 4, o); !st.ok()) return Fail(st);
      for (int r = 0; r < n; ++r) {
        for (size_t i = 0; i < per; ++i) {
          if (all[r * per + i] != r * 10000 + static_cast<int32_t>(i)) {
            return Fail(Status::Internal("allgather wrong"));
          }
        }
      }
      // Reduce-scatter: block b of rank r holds r + b; rank me gets sum_r (r + me).
      std::vector<float> in(per * n), out(per);
      for (int b = 0; b < n; ++b) {
        for (size_t i = 0; i < per; ++i) in[b * per + i] = static_cast<float>(me + b);
      }
      if (Status st = c.ReduceScatter(in.data(), out.data(), per, DType::kF32, o); !st.ok()) {
        return Fail(st);
      }
      const float want = static_cast<float>(n * (n - 1) / 2 + n * me);
      for (float v : out) {
        if (v != want) return Fail(Status::Internal(fmt::format("reduce-scatter {} != {}", v, want)));
      }
    }
    return Ok();
  });
  ExpectAllOk(group.Wait());
}

// Random floats make the association order visible: the star must fold ranks 0, 1, ..., N-1
// in that order whichever hub is used and however segments arrive.
TEST(TcpCollectives, StarReducesInFixedRankOrderBitwise) {
  const int n = 4;
  ProcessGroup group(n, Loopback(), Config(20000), [n](Communicator& c) -> ChildResult {
    const size_t count = 5000;
    auto data_of = [&](int r) {
      std::mt19937 rng(1234 + r);
      std::uniform_real_distribution<float> d(-1.0f, 1.0f);
      std::vector<float> v(count);
      for (float& x : v) x = d(rng) * std::pow(10.0f, static_cast<float>(r % 3));
      return v;
    };
    std::vector<float> want = data_of(0);
    for (int r = 1; r < n; ++r) {
      std::vector<float> v = data_of(r);
      for (size_t i = 0; i < count; ++i) want[i] += v[i];
    }
    for (int hub = 0; hub < n; ++hub) {
      for (size_t seg : {size_t{64}, size_t{4096}, size_t{1} << 20}) {
        std::vector<float> buf = data_of(c.rank());
        CollectiveOptions o;
        o.algorithm = Algorithm::kStar;
        o.hub = hub;
        o.segment_bytes = seg;
        if (Status st = c.Allreduce(buf.data(), buf.data(), count, DType::kF32, o); !st.ok()) {
          return Fail(st);
        }
        if (std::memcmp(buf.data(), want.data(), count * sizeof(float)) != 0) {
          return Fail(Status::Internal(fmt::format("hub {} seg {}: not bitwise rank order", hub, seg)));
        }
      }
    }
    return Ok();
  });
  ExpectAllOk(group.Wait());
}

// The emulated delay must really be paid per hop: star 2 hops, ring 2(N-1), whatever the speed
// of the machine (these are lower bounds, not performance thresholds). Every rank's result
// depends on a chain of that many messages, the first sent no earlier than the earliest start,
// so the bound holds from the earliest start of any rank (ranks share CLOCK_MONOTONIC here).
TEST(TcpCollectives, EmulatedDelayIsPaidPerHop) {
  const int n = 3;
  const int64_t delay_us = 20000;
  ProcessGroup group(n, Loopback(delay_us), Config(20000), [&](Communicator& c) -> ChildResult {
    if (c.emulated_delay_us() != delay_us) return Fail(Status::Internal("delay not reported"));
    float x[16] = {};
    for (Algorithm algo : {Algorithm::kStar, Algorithm::kRing, Algorithm::kTree}) {
      CollectiveOptions o;
      o.algorithm = algo;
      int64_t t0 = NowNs();
      if (Status st = c.Allreduce(x, x, 16, DType::kF32, o); !st.ok()) return Fail(st);
      const int64_t t1 = NowNs();
      std::vector<int64_t> starts(n);
      if (Status st = c.Allgather(&t0, starts.data(), sizeof(t0)); !st.ok()) return Fail(st);
      const int64_t us = (t1 - *std::min_element(starts.begin(), starts.end())) / 1000;
      // Star and tree over 3 ranks: one hop up to rank 0 and one back down (rank 0 only waits
      // for the way up); ring: 2(N-1) steps for everyone.
      const int64_t hops = algo == Algorithm::kRing ? 2 * (n - 1) : (c.rank() == 0 ? 1 : 2);
      if (us < hops * delay_us) {
        return Fail(Status::Internal(fmt::format("{} took {} us < {} hops x {} us",
                                                 comm::AlgorithmName(algo), us, hops, delay_us)));
      }
    }
    return Ok();
  });
  ExpectAllOk(group.Wait());
}

// Loops allreduces until one fails; reports when it failed.
ChildResult LoopUntilError(Communicator& c, Algorithm algo) {
  std::vector<float> buf(16384, 1.0f);
  CollectiveOptions o;
  o.algorithm = algo;
  const Deadline give_up = Deadline::After(std::chrono::seconds(60));
  while (!give_up.expired()) {
    Status st = c.Allreduce(buf.data(), buf.data(), buf.size(), DType::kF32, o);
    if (!st.ok()) return Fail(st);
    std::fill(buf.begin(), buf.end(), 1.0f);
  }
  return {Status::OK(), NowNs()};  // never failed: the test below treats this as a failure
}

class TcpFailure : public ::testing::TestWithParam<Algorithm> {};

TEST_P(TcpFailure, KilledRankMidAllreduceGivesSurvivorsAnErrorWithinTheTimeout) {
  const int n = 4, victim = 2, timeout_ms = 3000;
  const Algorithm algo = GetParam();
  ProcessGroup group(n, Loopback(), Config(timeout_ms),
                     [algo](Communicator& c) { return LoopUntilError(c, algo); });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));  // well inside the loop
  const int64_t killed_at = NowNs();
  group.Signal(victim, SIGKILL);
  const std::vector<ChildReport> reports = group.Wait(60);
  EXPECT_EQ(reports[victim].term_signal, SIGKILL);
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    EXPECT_NE(reports[r].status_code, 0) << "rank " << r << " never saw the failure";
    const double after_ms = static_cast<double>(reports[r].event_ns - killed_at) / 1e6;
    EXPECT_LE(after_ms, timeout_ms) << "rank " << r << ": " << reports[r].message;
    EXPECT_GE(after_ms, 0) << "rank " << r << " failed before the kill: " << reports[r].message;
  }
}

TEST_P(TcpFailure, StoppedRankMakesSurvivorsTimeOut) {
  const int n = 4, victim = 1, timeout_ms = 1500;
  const Algorithm algo = GetParam();
  ProcessGroup group(n, Loopback(), Config(timeout_ms),
                     [algo](Communicator& c) { return LoopUntilError(c, algo); });
  std::this_thread::sleep_for(std::chrono::milliseconds(700));
  const int64_t stopped_at = NowNs();
  group.Signal(victim, SIGSTOP);
  std::this_thread::sleep_for(std::chrono::milliseconds(timeout_ms + 2500));
  group.Signal(victim, SIGKILL);
  const std::vector<ChildReport> reports = group.Wait(60);
  bool someone_timed_out = false;
  for (int r = 0; r < n; ++r) {
    if (r == victim) continue;
    EXPECT_NE(reports[r].status_code, 0) << "rank " << r << " never saw the stall";
    someone_timed_out |= reports[r].status_code == static_cast<int>(StatusCode::kDeadlineExceeded);
    const double after_ms = static_cast<double>(reports[r].event_ns - stopped_at) / 1e6;
    // One timeout after the last message that got through, plus scheduling slack.
    EXPECT_LE(after_ms, timeout_ms + 1000) << "rank " << r << ": " << reports[r].message;
  }
  EXPECT_TRUE(someone_timed_out);
}

INSTANTIATE_TEST_SUITE_P(Algorithms, TcpFailure,
                         ::testing::Values(Algorithm::kStar, Algorithm::kRing, Algorithm::kTree),
                         [](const auto& p) { return std::string(comm::AlgorithmName(p.param)); });

TEST(TcpCollectives, MismatchedCallsAreAnErrorNotAHang) {
  ProcessGroup group(3, Loopback(), Config(5000), [](Communicator& c) -> ChildResult {
    std::vector<float> buf(64, 1.0f);
    const size_t count = c.rank() == 0 ? 10 : 12;  // rank 0 disagrees about the size
    CollectiveOptions o;
    o.algorithm = Algorithm::kStar;
    Status st = c.Allreduce(buf.data(), buf.data(), count, DType::kF32, o);
    if (st.ok()) return Fail(Status::Internal("mismatched allreduce succeeded"));
    // The group is broken now: later calls fail fast rather than read a desynchronized stream.
    Status again = c.Allreduce(buf.data(), buf.data(), 12, DType::kF32, o);
    if (again.ok()) return Fail(Status::Internal("broken group accepted another collective"));
    return Ok();
  });
  ExpectAllOk(group.Wait());
}

TEST(TcpTransport, BadInterfaceNameIsAClearError) {
  StatusOr<std::string> a = comm::tcp::ResolveInterfaceAddress("no-such-if0", false);
  ASSERT_FALSE(a.ok());
  EXPECT_EQ(a.status().code(), StatusCode::kNotFound);
  EXPECT_NE(a.status().message().find("no-such-if0"), std::string::npos);
  EXPECT_EQ(*comm::tcp::ResolveInterfaceAddress("lo", false), "127.0.0.1");
}

}  // namespace
}  // namespace strata
