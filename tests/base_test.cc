// Unit tests for base/: status, checks, env registry, logging, dtypes, buffers, thread pool, clock.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/check.h"
#include "base/clock.h"
#include "base/dtype.h"
#include "base/env.h"
#include "base/logging.h"
#include "base/status.h"
#include "base/thread_pool.h"

namespace strata {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;

// Sets (or, with nullptr, unsets) an environment variable for one scope.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value != nullptr) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
  }
  ~ScopedEnv() {
    if (old_) {
      setenv(name_, old_->c_str(), 1);
    } else {
      unsetenv(name_);
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

uint32_t Bits(float f) { return dtype_internal::FloatBits(f); }
float FromBits(uint32_t u) { return dtype_internal::BitsFloat(u); }

// ---------------------------------------------------------------------------------------------
// Status
// ---------------------------------------------------------------------------------------------

TEST(StatusTest, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.code(), StatusCode::kOk);
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s.ToString(), "OK");
  EXPECT_EQ(s, Status::OK());
}

TEST(StatusTest, OkCodeDropsMessage) {
  Status s(StatusCode::kOk, "ignored");
  EXPECT_TRUE(s.ok());
  EXPECT_EQ(s.message(), "");
  EXPECT_EQ(s, Status::OK());
}

TEST(StatusTest, FactoriesSetCodeAndName) {
  struct Case {
    Status status;
    StatusCode code;
    const char* name;
  };
  const Case cases[] = {
      {Status::InvalidArgument("m"), StatusCode::kInvalidArgument, "INVALID_ARGUMENT"},
      {Status::NotFound("m"), StatusCode::kNotFound, "NOT_FOUND"},
      {Status::AlreadyExists("m"), StatusCode::kAlreadyExists, "ALREADY_EXISTS"},
      {Status::OutOfRange("m"), StatusCode::kOutOfRange, "OUT_OF_RANGE"},
      {Status::DeadlineExceeded("m"), StatusCode::kDeadlineExceeded, "DEADLINE_EXCEEDED"},
      {Status::Unavailable("m"), StatusCode::kUnavailable, "UNAVAILABLE"},
      {Status::DataLoss("m"), StatusCode::kDataLoss, "DATA_LOSS"},
      {Status::Corruption("m"), StatusCode::kCorruption, "CORRUPTION"},
      {Status::ResourceExhausted("m"), StatusCode::kResourceExhausted, "RESOURCE_EXHAUSTED"},
      {Status::FailedPrecondition("m"), StatusCode::kFailedPrecondition, "FAILED_PRECONDITION"},
      {Status::Unimplemented("m"), StatusCode::kUnimplemented, "UNIMPLEMENTED"},
      {Status::Internal("m"), StatusCode::kInternal, "INTERNAL"},
      {Status::Aborted("m"), StatusCode::kAborted, "ABORTED"},
      {Status::IOError("m"), StatusCode::kIOError, "IO_ERROR"},
  };
  for (const Case& c : cases) {
    EXPECT_FALSE(c.status.ok()) << c.name;
    EXPECT_EQ(c.status.code(), c.code) << c.name;
    EXPECT_STREQ(StatusCodeName(c.code), c.name);
    EXPECT_EQ(c.status.message(), "m");
    EXPECT_EQ(c.status.ToString(), std::string(c.name) + ": m");
  }
  EXPECT_STREQ(StatusCodeName(StatusCode::kOk), "OK");
}

TEST(StatusTest, ToStringAndFormat) {
  Status s = Status::DeadlineExceeded("peer 2 did not answer");
  EXPECT_EQ(s.ToString(), "DEADLINE_EXCEEDED: peer 2 did not answer");
  EXPECT_EQ(fmt::format("{}", s), "DEADLINE_EXCEEDED: peer 2 did not answer");
  EXPECT_EQ(fmt::format("{}", StatusCode::kNotFound), "NOT_FOUND");
  EXPECT_EQ(Status(StatusCode::kNotFound, "").ToString(), "NOT_FOUND");
}

TEST(StatusTest, WithContextPrefixesAndKeepsCode) {
  Status s = Status::Unavailable("connection reset").WithContext("allreduce step 3");
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_EQ(s.message(), "allreduce step 3: connection reset");
  Status twice = s.WithContext("train");
  EXPECT_EQ(twice.message(), "train: allreduce step 3: connection reset");
  EXPECT_TRUE(Status::OK().WithContext("anything").ok());
  EXPECT_EQ(Status::OK().WithContext("anything").message(), "");
  EXPECT_EQ(Status(StatusCode::kAborted, "").WithContext("ctx").message(), "ctx");
}

TEST(StatusTest, EqualityComparesCodeAndMessage) {
  EXPECT_EQ(Status::NotFound("a"), Status::NotFound("a"));
  EXPECT_NE(Status::NotFound("a"), Status::NotFound("b"));
  EXPECT_NE(Status::NotFound("a"), Status::Internal("a"));
}

TEST(StatusTest, ErrnoStatusMapping) {
  struct Case {
    int err;
    StatusCode code;
  };
  const Case cases[] = {
      {ECONNRESET, StatusCode::kUnavailable},   {EPIPE, StatusCode::kUnavailable},
      {ECONNREFUSED, StatusCode::kUnavailable}, {EHOSTUNREACH, StatusCode::kUnavailable},
      {ENETUNREACH, StatusCode::kUnavailable},  {ETIMEDOUT, StatusCode::kDeadlineExceeded},
      {ENOSPC, StatusCode::kResourceExhausted}, {EDQUOT, StatusCode::kResourceExhausted},
      {ENOENT, StatusCode::kNotFound},          {EINVAL, StatusCode::kInvalidArgument},
      {EACCES, StatusCode::kIOError},           {EIO, StatusCode::kIOError},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(ErrnoStatus("op", c.err).code(), c.code) << "errno " << c.err;
  }
  Status s = ErrnoStatus("open /nope", ENOENT);
  EXPECT_EQ(s.message(), fmt::format("open /nope: {} (errno {})", std::strerror(ENOENT), ENOENT));
}

// ---------------------------------------------------------------------------------------------
// StatusOr and the macros
// ---------------------------------------------------------------------------------------------

struct Base {
  virtual ~Base() = default;
  virtual int Id() const { return 1; }
};
struct Derived : Base {
  int Id() const override { return 2; }
};

TEST(StatusOrTest, HoldsValue) {
  StatusOr<int> v = 42;
  ASSERT_TRUE(v.ok());
  EXPECT_TRUE(v.status().ok());
  EXPECT_EQ(v.value(), 42);
  EXPECT_EQ(*v, 42);
  *v = 7;
  EXPECT_EQ(v.value(), 7);
}

TEST(StatusOrTest, HoldsError) {
  StatusOr<int> v = Status::NotFound("no such key");
  EXPECT_FALSE(v.ok());
  EXPECT_EQ(v.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(v.status().message(), "no such key");
  EXPECT_EQ(v.value_or(-1), -1);
}

TEST(StatusOrTest, MoveOnlyValue) {
  StatusOr<std::unique_ptr<int>> v = std::make_unique<int>(5);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(**v, 5);
  StatusOr<std::unique_ptr<int>> moved = std::move(v);
  ASSERT_TRUE(moved.ok());
  std::unique_ptr<int> out = std::move(moved).value();
  ASSERT_NE(out, nullptr);
  EXPECT_EQ(*out, 5);
}

TEST(StatusOrTest, ConvertingConstruction) {
  StatusOr<std::string> s = "literal";
  EXPECT_EQ(*s, "literal");
  EXPECT_EQ(s->size(), 7u);
  StatusOr<std::unique_ptr<Base>> b = std::make_unique<Derived>();
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->Id(), 2);
}

TEST(StatusOrDeathTest, ValueOnErrorPrintsStatus) {
  StatusOr<int> v = Status::Unavailable("peer 3 is gone");
  EXPECT_DEATH((void)v.value(), "UNAVAILABLE: peer 3 is gone");
}

TEST(StatusOrDeathTest, ConstructFromOkStatusDies) {
  EXPECT_DEATH({ StatusOr<int> v = Status::OK(); }, "OK Status");
}

Status FailIf(bool fail, int* calls) {
  ++*calls;
  return fail ? Status::Aborted("asked to fail") : Status::OK();
}

Status RunTwo(bool fail_first, int* calls, bool* reached_end) {
  STRATA_RETURN_IF_ERROR(FailIf(fail_first, calls));
  STRATA_RETURN_IF_ERROR(FailIf(false, calls));
  *reached_end = true;
  return Status::OK();
}

TEST(MacroTest, ReturnIfErrorStopsAtFirstError) {
  int calls = 0;
  bool reached = false;
  Status s = RunTwo(true, &calls, &reached);
  EXPECT_EQ(s.code(), StatusCode::kAborted);
  EXPECT_EQ(calls, 1);  // evaluated once, and nothing after the error ran
  EXPECT_FALSE(reached);

  calls = 0;
  EXPECT_TRUE(RunTwo(false, &calls, &reached).ok());
  EXPECT_EQ(calls, 2);
  EXPECT_TRUE(reached);
}

StatusOr<int> Half(int x) {
  if (x % 2 != 0) return Status::InvalidArgument(fmt::format("{} is odd", x));
  return x / 2;
}

StatusOr<int> Quarter(int x, int* steps) {
  STRATA_ASSIGN_OR_RETURN(int h, Half(x));
  ++*steps;
  STRATA_ASSIGN_OR_RETURN(auto q, Half(h));
  ++*steps;
  return q;
}

TEST(MacroTest, AssignOrReturn) {
  int steps = 0;
  StatusOr<int> q = Quarter(12, &steps);
  ASSERT_TRUE(q.ok());
  EXPECT_EQ(*q, 3);
  EXPECT_EQ(steps, 2);

  steps = 0;
  StatusOr<int> odd = Quarter(6, &steps);  // 6 -> 3, then 3 is odd
  EXPECT_EQ(odd.status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(odd.status().message(), "3 is odd");
  EXPECT_EQ(steps, 1);

  steps = 0;
  EXPECT_FALSE(Quarter(5, &steps).ok());
  EXPECT_EQ(steps, 0);
}

StatusOr<std::unique_ptr<int>> MakeBox(int v) {
  if (v < 0) return Status::OutOfRange("negative");
  return std::make_unique<int>(v);
}

Status UseBoxes(int a, int b, int* sum) {
  std::unique_ptr<int> existing;
  STRATA_ASSIGN_OR_RETURN(existing, MakeBox(a));  // assigns to an existing variable
  STRATA_ASSIGN_OR_RETURN(std::unique_ptr<int> second, MakeBox(b));
  STRATA_RETURN_IF_ERROR(MakeBox(a + b));  // StatusOr works with RETURN_IF_ERROR too
  *sum = *existing + *second;
  return Status::OK();
}

TEST(MacroTest, AssignOrReturnMoveOnlyAndExisting) {
  int sum = 0;
  ASSERT_TRUE(UseBoxes(2, 3, &sum).ok());
  EXPECT_EQ(sum, 5);
  Status s = UseBoxes(2, -1, &sum);
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
  s = UseBoxes(2, -3, &sum);  // only a + b is negative
  EXPECT_EQ(s.code(), StatusCode::kOutOfRange);
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

TEST(CheckTest, PassingChecksEvaluateOperandsOnce) {
  int a = 0;
  int b = 0;
  STRATA_CHECK_EQ(++a, 1);
  STRATA_CHECK_LE(++a, ++b + 1);
  STRATA_CHECK(++a == 3);
  STRATA_CHECK_MSG(++a == 4, "a is {}", a);
  EXPECT_EQ(a, 4);
  EXPECT_EQ(b, 1);
}

TEST(CheckTest, MixedSignednessComparesByValue) {
  size_t big = 3;
  int negative = -1;
  STRATA_CHECK_LT(negative, big);  // a plain `<` would convert -1 to SIZE_MAX
  STRATA_CHECK_GT(big, negative);
  STRATA_CHECK_NE(big, negative);
  STRATA_CHECK_EQ(big, 3);
}

TEST(CheckDeathTest, OpsPrintExpressionAndBothOperands) {
  EXPECT_DEATH(STRATA_CHECK_EQ(1, 2), "Check failed: 1 == 2 \\(1 vs 2\\)");
  int x = 5;
  int y = 7;
  EXPECT_DEATH(STRATA_CHECK_NE(x, x), "x != x \\(5 vs 5\\)");
  EXPECT_DEATH(STRATA_CHECK_LT(y, x), "y < x \\(7 vs 5\\)");
  EXPECT_DEATH(STRATA_CHECK_LE(y, x), "y <= x \\(7 vs 5\\)");
  EXPECT_DEATH(STRATA_CHECK_GT(x, y), "x > y \\(5 vs 7\\)");
  EXPECT_DEATH(STRATA_CHECK_GE(x, y), "x >= y \\(5 vs 7\\)");
  std::string s = "abc";
  EXPECT_DEATH(STRATA_CHECK_EQ(s, std::string("abd")), "\\(abc vs abd\\)");
  EXPECT_DEATH(STRATA_CHECK_EQ(DType::kF32, DType::kBF16), "\\(f32 vs bf16\\)");
  EXPECT_DEATH(STRATA_CHECK_EQ(size_t{3}, -1), "\\(3 vs -1\\)");
}

TEST(CheckDeathTest, PlainAndMessage) {
  EXPECT_DEATH(STRATA_CHECK(1 + 1 == 3), "base_test.cc:[0-9]+: Check failed: 1 \\+ 1 == 3");
  int world = 3;
  EXPECT_DEATH(STRATA_CHECK_MSG(10 % world == 0, "{} items over {} ranks", 10, world),
               "10 % world == 0: 10 items over 3 ranks");
  int* p = nullptr;
  EXPECT_DEATH(STRATA_CHECK_NE(p, nullptr), "p != nullptr \\(0x0 vs 0x0\\)");
}

// ---------------------------------------------------------------------------------------------
// Environment registry
// ---------------------------------------------------------------------------------------------

TEST(EnvTest, RegistryIsSortedAndComplete) {
  std::span<const EnvVar> vars = AllEnvVars();
  for (size_t i = 1; i < vars.size(); ++i) {
    EXPECT_LT(std::string_view(vars[i - 1].name), std::string_view(vars[i].name));
  }
  struct Expected {
    const char* name;
    const char* default_value;
  };
  const Expected expected[] = {
      {"STRATA_LOG_LEVEL", "warn"},       {"STRATA_LOG_SUBSYS", "all"},
      {"STRATA_NUM_THREADS", "0"},        {"STRATA_COMM_TIMEOUT_MS", "30000"},
      {"STRATA_LINK_DELAY_US", "0"},      {"STRATA_TCP_IFNAME", "auto"},
      {"STRATA_SEGMENT_BYTES", "262144"}, {"STRATA_STAR_HUB", "0"},
      {"STRATA_ALLREDUCE_TABLE", ""},     {"STRATA_TCP_SPIN_US", "50"},
      {"STRATA_POOL_SPIN_US", "100"},     {"STRATA_COMM_SPIN_MS", "50"},
      {"STRATA_CUDA_PLUGIN", ""},         {"STRATA_SNAPSHOTD_RPC_TIMEOUT_S", "30"},
      {"STRATA_SNAPSHOTD_PEER_TIMEOUT_S", "30"},
  };
  EXPECT_EQ(vars.size(), std::size(expected));
  for (const Expected& e : expected) {
    const EnvVar* var = FindEnvVar(e.name);
    ASSERT_NE(var, nullptr) << e.name;
    EXPECT_STREQ(var->default_value, e.default_value) << e.name;
    EXPECT_GT(std::strlen(var->help), 10u) << e.name;
  }
  EXPECT_EQ(FindEnvVar("STRATA_NOT_A_VAR"), nullptr);
}

TEST(EnvTest, UnsetAndEmptyReadAsDefault) {
  {
    ScopedEnv env("STRATA_SEGMENT_BYTES", nullptr);
    EXPECT_FALSE(EnvIsSet("STRATA_SEGMENT_BYTES"));
    EXPECT_EQ(EnvString("STRATA_SEGMENT_BYTES"), "262144");
    EXPECT_EQ(EnvInt("STRATA_SEGMENT_BYTES").value(), 262144);
  }
  {
    ScopedEnv env("STRATA_SEGMENT_BYTES", "");
    EXPECT_FALSE(EnvIsSet("STRATA_SEGMENT_BYTES"));
    EXPECT_EQ(EnvInt("STRATA_SEGMENT_BYTES").value(), 262144);
  }
  ScopedEnv env("STRATA_TCP_IFNAME", nullptr);
  EXPECT_EQ(EnvString("STRATA_TCP_IFNAME"), "auto");
}

TEST(EnvTest, ParsesIntegers) {
  const std::pair<const char*, int64_t> good[] = {
      {"4096", 4096}, {" 42 ", 42}, {"+7", 7}, {"-3", -3}, {"9223372036854775807", INT64_MAX}};
  for (const auto& [text, value] : good) {
    ScopedEnv env("STRATA_SEGMENT_BYTES", text);
    EXPECT_TRUE(EnvIsSet("STRATA_SEGMENT_BYTES"));
    StatusOr<int64_t> v = EnvInt("STRATA_SEGMENT_BYTES");
    ASSERT_TRUE(v.ok()) << text << ": " << v.status();
    EXPECT_EQ(*v, value) << text;
  }
}

TEST(EnvTest, IntInRangeFallsBackToTheDefault) {
  {
    ScopedEnv env("STRATA_COMM_SPIN_MS", "7");
    EXPECT_EQ(EnvIntInRange("STRATA_COMM_SPIN_MS", 0, 60000), 7);
  }
  for (const char* bad : {"-1", "60001", "abc"}) {
    ScopedEnv env("STRATA_COMM_SPIN_MS", bad);
    EXPECT_EQ(EnvIntInRange("STRATA_COMM_SPIN_MS", 0, 60000), 50) << bad;
  }
  ScopedEnv env("STRATA_COMM_SPIN_MS", nullptr);
  EXPECT_EQ(EnvIntInRange("STRATA_COMM_SPIN_MS", 0, 60000), 50);
}

TEST(EnvTest, BadIntegerIsInvalidArgument) {
  {
    ScopedEnv env("STRATA_SEGMENT_BYTES", "abc");
    StatusOr<int64_t> v = EnvInt("STRATA_SEGMENT_BYTES");
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(v.status().message(), "STRATA_SEGMENT_BYTES='abc' is not an integer");
  }
  for (const char* bad : {"12x", "1.5", "+-3", "+", "99999999999999999999"}) {
    ScopedEnv env("STRATA_COMM_TIMEOUT_MS", bad);
    EXPECT_EQ(EnvInt("STRATA_COMM_TIMEOUT_MS").status().code(), StatusCode::kInvalidArgument)
        << bad;
  }
}

TEST(EnvTest, ParsesDoublesAndBools) {
  {
    ScopedEnv env("STRATA_LINK_DELAY_US", "2.5e3");
    EXPECT_DOUBLE_EQ(EnvDouble("STRATA_LINK_DELAY_US").value(), 2500.0);
  }
  {
    ScopedEnv env("STRATA_LINK_DELAY_US", "fast");
    StatusOr<double> v = EnvDouble("STRATA_LINK_DELAY_US");
    EXPECT_EQ(v.status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(v.status().message(), "STRATA_LINK_DELAY_US='fast' is not a number");
  }
  const std::pair<const char*, bool> bools[] = {{"1", true},   {"TRUE", true}, {"yes", true},
                                                {"On", true},  {"0", false},   {"false", false},
                                                {"NO", false}, {"off", false}};
  for (const auto& [text, value] : bools) {
    ScopedEnv env("STRATA_STAR_HUB", text);
    StatusOr<bool> b = EnvBool("STRATA_STAR_HUB");
    ASSERT_TRUE(b.ok()) << text;
    EXPECT_EQ(*b, value) << text;
  }
  ScopedEnv env("STRATA_STAR_HUB", "maybe");
  EXPECT_EQ(EnvBool("STRATA_STAR_HUB").status().code(), StatusCode::kInvalidArgument);
}

TEST(EnvDeathTest, UnregisteredNameDies) {
  EXPECT_DEATH((void)EnvString("STRATA_TYPO"), "STRATA_TYPO is not registered");
  EXPECT_DEATH((void)EnvInt("HOME"), "HOME is not registered");
  EXPECT_DEATH((void)EnvIsSet("STRATA_TYPO"), "not registered");
}

TEST(EnvDeathTest, UnparseableDefaultDies) {
  // STRATA_TCP_IFNAME's default "auto" is a string; reading it as an integer is a code bug.
  ScopedEnv env("STRATA_TCP_IFNAME", nullptr);
  EXPECT_DEATH((void)EnvInt("STRATA_TCP_IFNAME"), "default of STRATA_TCP_IFNAME");
}

// ---------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------

class LoggingTest : public ::testing::Test {
 protected:
  void TearDown() override {
    SetLogRank(-1);
    LoadLogSettingsFromEnv();
  }
};

TEST_F(LoggingTest, ParseLevelAndMask) {
  EXPECT_EQ(ParseLogLevel("trace").value(), LogLevel::kTrace);
  EXPECT_EQ(ParseLogLevel("INFO").value(), LogLevel::kInfo);
  EXPECT_EQ(ParseLogLevel("off").value(), LogLevel::kOff);
  StatusOr<LogLevel> bad = ParseLogLevel("loud");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("trace, debug, info, warn, error, off"), std::string::npos);

  EXPECT_EQ(ParseLogMask("all").value(), kAllSubsys);
  EXPECT_EQ(ParseLogMask("comm").value(), static_cast<uint32_t>(Subsys::kComm));
  EXPECT_EQ(ParseLogMask("Comm, KV,ckpt").value(), static_cast<uint32_t>(Subsys::kComm) |
                                                       static_cast<uint32_t>(Subsys::kKv) |
                                                       static_cast<uint32_t>(Subsys::kCkpt));
  EXPECT_FALSE(ParseLogMask("comm,bogus").ok());
  EXPECT_FALSE(ParseLogMask(" , ").ok());
  EXPECT_STREQ(SubsysName(Subsys::kLaunch), "LAUNCH");
  EXPECT_STREQ(SubsysName(Subsys::kKernels), "KERNELS");
}

TEST_F(LoggingTest, LevelAndMaskGateMessages) {
  SetLogLevel(LogLevel::kInfo);
  SetLogMask(static_cast<uint32_t>(Subsys::kComm) | static_cast<uint32_t>(Subsys::kMem));
  EXPECT_TRUE(LogEnabled(LogLevel::kInfo, Subsys::kComm));
  EXPECT_TRUE(LogEnabled(LogLevel::kError, Subsys::kMem));
  EXPECT_FALSE(LogEnabled(LogLevel::kDebug, Subsys::kComm));
  EXPECT_FALSE(LogEnabled(LogLevel::kError, Subsys::kKv));
  SetLogLevel(LogLevel::kOff);
  EXPECT_FALSE(LogEnabled(LogLevel::kError, Subsys::kComm));
}

TEST_F(LoggingTest, MessageFormatAndLazyArguments) {
  SetLogLevel(LogLevel::kInfo);
  SetLogMask(static_cast<uint32_t>(Subsys::kComm));
  SetLogRank(3);
  int evaluated = 0;
  auto count = [&] { return ++evaluated; };
  testing::internal::CaptureStderr();
  STRATA_LOG(INFO, COMM, "connected to {} peers", 7);
  STRATA_LOG(DEBUG, COMM, "hidden debug {}", count());
  STRATA_LOG(ERROR, KV, "hidden kv {}", count());
  std::string out = testing::internal::GetCapturedStderr();
  EXPECT_NE(out.find("[r3] COMM base_test.cc:"), std::string::npos) << out;
  EXPECT_NE(out.find("] connected to 7 peers"), std::string::npos) << out;
  EXPECT_EQ(out.find("hidden"), std::string::npos) << out;
  EXPECT_EQ(out[0], 'I') << out;
  EXPECT_EQ(evaluated, 0);  // disabled messages do not evaluate their arguments
}

TEST_F(LoggingTest, EnvironmentSettings) {
  {
    ScopedEnv level("STRATA_LOG_LEVEL", "Debug");
    ScopedEnv subsys("STRATA_LOG_SUBSYS", "comm,ckpt");
    LoadLogSettingsFromEnv();
    EXPECT_EQ(GetLogLevel(), LogLevel::kDebug);
    EXPECT_EQ(GetLogMask(),
              static_cast<uint32_t>(Subsys::kComm) | static_cast<uint32_t>(Subsys::kCkpt));
  }
  {
    ScopedEnv level("STRATA_LOG_LEVEL", nullptr);
    ScopedEnv subsys("STRATA_LOG_SUBSYS", nullptr);
    LoadLogSettingsFromEnv();
    EXPECT_EQ(GetLogLevel(), LogLevel::kWarn);
    EXPECT_EQ(GetLogMask(), kAllSubsys);
  }
}

TEST_F(LoggingTest, BadEnvironmentWarnsOnceAndUsesDefaults) {
  ScopedEnv level("STRATA_LOG_LEVEL", "loud");
  ScopedEnv subsys("STRATA_LOG_SUBSYS", "comm,bogus");
  testing::internal::CaptureStderr();
  LoadLogSettingsFromEnv();
  std::string out = testing::internal::GetCapturedStderr();
  EXPECT_EQ(GetLogLevel(), LogLevel::kWarn);
  EXPECT_EQ(GetLogMask(), kAllSubsys);
  auto count = [&](std::string_view needle) {
    int n = 0;
    for (size_t pos = out.find(needle); pos != std::string::npos; pos = out.find(needle, pos + 1)) {
      ++n;
    }
    return n;
  };
  EXPECT_EQ(count("ignoring STRATA_LOG_LEVEL"), 1) << out;
  EXPECT_EQ(count("ignoring STRATA_LOG_SUBSYS"), 1) << out;
  EXPECT_NE(out.find("'loud'"), std::string::npos) << out;
  EXPECT_NE(out.find("'bogus'"), std::string::npos) << out;
}

// ---------------------------------------------------------------------------------------------
// DType
// ---------------------------------------------------------------------------------------------

TEST(DTypeTest, SizesNamesParse) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_EQ(DTypeSize(DType::kI8), 1u);
  EXPECT_EQ(DTypeSize(DType::kI32), 4u);
  EXPECT_EQ(DTypeSize(DType::kI64), 8u);
  for (DType t : {DType::kF32, DType::kF16, DType::kBF16, DType::kI8, DType::kI32, DType::kI64}) {
    StatusOr<DType> parsed = ParseDType(DTypeName(t));
    ASSERT_TRUE(parsed.ok()) << DTypeName(t);
    EXPECT_EQ(*parsed, t);
  }
  EXPECT_STREQ(DTypeName(DType::kBF16), "bf16");
  EXPECT_EQ(ParseDType("BF16").value(), DType::kBF16);
  StatusOr<DType> bad = ParseDType("float128");
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("f32, f16, bf16, i8, i32, i64"), std::string::npos);
  EXPECT_TRUE(IsFloating(DType::kBF16));
  EXPECT_TRUE(IsFloating(DType::kF32));
  EXPECT_FALSE(IsFloating(DType::kI8));
  EXPECT_FALSE(IsFloating(DType::kI64));
}

bool IsBF16NaN(uint16_t h) { return (h & 0x7f80) == 0x7f80 && (h & 0x007f) != 0; }
bool IsF16NaN(uint16_t h) { return (h & 0x7c00) == 0x7c00 && (h & 0x03ff) != 0; }

TEST(DTypeTest, BF16KnownValues) {
  EXPECT_EQ(F32ToBF16(1.0f), 0x3F80);
  EXPECT_EQ(F32ToBF16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToBF16(0.0f), 0x0000);
  EXPECT_EQ(F32ToBF16(-0.0f), 0x8000);
  // Ties go to the even neighbour; anything past the tie rounds up.
  EXPECT_EQ(F32ToBF16(FromBits(0x3F808000)), 0x3F80);  // tie, 0x3F80 is even
  EXPECT_EQ(F32ToBF16(FromBits(0x3F818000)), 0x3F82);  // tie, 0x3F82 is even
  EXPECT_EQ(F32ToBF16(FromBits(0x3F808001)), 0x3F81);
  EXPECT_EQ(F32ToBF16(FromBits(0x3F807FFF)), 0x3F80);
  EXPECT_EQ(F32ToBF16(std::numeric_limits<float>::infinity()), 0x7F80);
  EXPECT_EQ(F32ToBF16(-std::numeric_limits<float>::infinity()), 0xFF80);
  EXPECT_EQ(F32ToBF16(std::numeric_limits<float>::max()), 0x7F80);  // rounds past the top
  EXPECT_TRUE(IsBF16NaN(F32ToBF16(std::numeric_limits<float>::quiet_NaN())));
  // A NaN whose payload lives only in the low bits must not truncate to infinity.
  EXPECT_TRUE(IsBF16NaN(F32ToBF16(FromBits(0x7F800001))));
  EXPECT_TRUE(IsBF16NaN(F32ToBF16(FromBits(0xFF800001))));
  EXPECT_EQ(F32ToBF16(FromBits(0xFF800001)) & 0x8000, 0x8000);
  EXPECT_EQ(BF16ToF32(0x3F80), 1.0f);
  EXPECT_EQ(BF16ToF32(0x4049), 3.140625f);
  EXPECT_TRUE(std::isnan(BF16ToF32(0x7FC0)));
  EXPECT_EQ(Bits(BF16ToF32(0xFFC1)), 0xFFC10000u);  // widening keeps sign and payload
  EXPECT_TRUE(std::isinf(BF16ToF32(0xFF80)));
}

TEST(DTypeTest, F16KnownValues) {
  EXPECT_EQ(F32ToF16(1.0f), 0x3C00);
  EXPECT_EQ(F32ToF16(-2.0f), 0xC000);
  EXPECT_EQ(F32ToF16(0.5f), 0x3800);
  EXPECT_EQ(F32ToF16(65504.0f), 0x7BFF);
  EXPECT_EQ(F32ToF16(65519.0f), 0x7BFF);
  EXPECT_EQ(F32ToF16(65520.0f), 0x7C00);  // the tie above the largest half goes to infinity
  EXPECT_EQ(F32ToF16(1e10f), 0x7C00);
  EXPECT_EQ(F32ToF16(-1e10f), 0xFC00);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -14)), 0x0400);  // smallest normal
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -24)), 0x0001);  // smallest subnormal
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25)), 0x0000);  // tie between 0 and 2^-24 -> even (0)
  EXPECT_EQ(F32ToF16(-std::ldexp(1.0f, -25)), 0x8000);
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -25) * 1.0001f), 0x0001);
  EXPECT_EQ(F32ToF16(std::ldexp(3.0f, -25)), 0x0002);     // 1.5 * 2^-24: tie -> 2 (even)
  EXPECT_EQ(F32ToF16(std::ldexp(5.0f, -25)), 0x0002);     // 2.5 * 2^-24: tie -> 2 (even)
  EXPECT_EQ(F32ToF16(std::ldexp(1023.5f, -24)), 0x0400);  // rounds up into the normals
  EXPECT_EQ(F32ToF16(std::ldexp(1.0f, -30)), 0x0000);
  EXPECT_EQ(F32ToF16(-0.0f), 0x8000);
  EXPECT_EQ(F32ToF16(1.0f / 3.0f), 0x3555);
  EXPECT_EQ(F32ToF16(FromBits(0x3F801000)), 0x3C00);  // 1 + 2^-11: tie -> 0x3C00 (even)
  EXPECT_EQ(F32ToF16(FromBits(0x3F803000)), 0x3C02);  // 1 + 3 * 2^-11: tie -> 0x3C02 (even)
  EXPECT_EQ(F32ToF16(std::numeric_limits<float>::infinity()), 0x7C00);
  EXPECT_EQ(F32ToF16(-std::numeric_limits<float>::infinity()), 0xFC00);
  EXPECT_TRUE(IsF16NaN(F32ToF16(std::numeric_limits<float>::quiet_NaN())));
  EXPECT_TRUE(IsF16NaN(F32ToF16(FromBits(0x7F800001))));
  EXPECT_EQ(F16ToF32(0x3C00), 1.0f);
  EXPECT_EQ(F16ToF32(0x7BFF), 65504.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(F16ToF32(0x03FF), std::ldexp(1023.0f, -24));
  EXPECT_EQ(F16ToF32(0x0200), std::ldexp(1.0f, -15));
  EXPECT_TRUE(std::signbit(F16ToF32(0x8000)));
  EXPECT_TRUE(std::isinf(F16ToF32(0x7C00)));
  EXPECT_TRUE(std::isnan(F16ToF32(0x7E00)));
  EXPECT_EQ(Bits(F16ToF32(0xFE01)), 0xFFC02000u);
}

TEST(DTypeTest, AllBF16PatternsRoundTrip) {
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    auto h = static_cast<uint16_t>(i);
    float f = BF16ToF32(h);
    uint16_t back = F32ToBF16(f);
    if (IsBF16NaN(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << i;
      ASSERT_TRUE(IsBF16NaN(back)) << std::hex << i;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << std::hex << i;
    } else {
      ASSERT_EQ(back, h) << std::hex << i;
    }
  }
}

TEST(DTypeTest, AllF16PatternsRoundTrip) {
  for (uint32_t i = 0; i <= 0xFFFF; ++i) {
    auto h = static_cast<uint16_t>(i);
    float f = F16ToF32(h);
    uint16_t back = F32ToF16(f);
    if (IsF16NaN(h)) {
      ASSERT_TRUE(std::isnan(f)) << std::hex << i;
      ASSERT_TRUE(IsF16NaN(back)) << std::hex << i;
      ASSERT_EQ(back & 0x8000, h & 0x8000) << std::hex << i;
    } else {
      ASSERT_EQ(back, h) << std::hex << i;
    }
  }
}

// Checks that `h` is the nearest 16-bit value to f (ties to even) among its two neighbours, for
// a sweep of f32 bit patterns across every exponent.
template <class ToF32, class FromF32>
void CheckNearestEven(ToF32 to_f32, FromF32 from_f32, uint16_t max_finite) {
  for (uint64_t u = 0; u <= 0xFFFFFFFFu; u += 4093) {
    float f = FromBits(static_cast<uint32_t>(u));
    if (!std::isfinite(f)) continue;
    uint16_t h = from_f32(f);
    uint16_t mag = h & 0x7fff;
    if (mag > max_finite) {
      // Overflow: the value must be at least halfway to the next power of two past the top.
      double top = to_f32(max_finite);
      double ulp = top - static_cast<double>(to_f32(static_cast<uint16_t>(max_finite - 1)));
      ASSERT_GE(std::fabs(static_cast<double>(f)), top + ulp / 2) << std::hex << u;
      continue;
    }
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    double err = std::fabs(static_cast<double>(f) - static_cast<double>(to_f32(h)));
    if (mag > 0) {
      double below = sign * to_f32(static_cast<uint16_t>(mag - 1));
      double e = std::fabs(static_cast<double>(f) - below);
      ASSERT_TRUE(err < e || (err == e && mag % 2 == 0)) << std::hex << u;
    }
    double above = mag < max_finite ? sign * to_f32(static_cast<uint16_t>(mag + 1))
                                    : sign * 2.0 * to_f32(max_finite);  // stand-in neighbour
    double e = std::fabs(static_cast<double>(f) - above);
    ASSERT_TRUE(err < e || (err == e && mag % 2 == 0)) << std::hex << u;
  }
}

TEST(DTypeTest, F32ToF16IsNearestEven) {
  CheckNearestEven([](uint16_t h) { return F16ToF32(h); }, [](float f) { return F32ToF16(f); },
                   0x7BFF);
}

TEST(DTypeTest, F32ToBF16IsNearestEven) {
  CheckNearestEven([](uint16_t h) { return BF16ToF32(h); }, [](float f) { return F32ToBF16(f); },
                   0x7F7F);
}

TEST(DTypeTest, ConvertF32ToI8Saturates) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> src = {1000.0f, -1000.0f, 127.4f, 126.6f, -128.6f, 2.5f, 3.5f,
                                  -2.5f,   -0.4f,    nan,    inf,    -inf,    0.0f};
  const std::vector<int8_t> want = {127, -128, 127, 127, -128, 2, 4, -2, 0, 0, 127, -128, 0};
  std::vector<int8_t> dst(src.size(), 99);
  ConvertBuffer(src.data(), DType::kF32, dst.data(), DType::kI8, src.size());
  EXPECT_EQ(dst, want);
}

TEST(DTypeTest, ConvertToI64Saturates) {
  const std::vector<float> src = {1e19f, -1e19f, 0x1p63f, -0x1p63f, 12345.5f};
  std::vector<int64_t> dst(src.size());
  ConvertBuffer(src.data(), DType::kF32, dst.data(), DType::kI64, src.size());
  EXPECT_EQ(dst[0], INT64_MAX);
  EXPECT_EQ(dst[1], INT64_MIN);
  EXPECT_EQ(dst[2], INT64_MAX);
  EXPECT_EQ(dst[3], INT64_MIN);
  EXPECT_EQ(dst[4], 12346);  // tie to even

  const std::vector<int64_t> wide = {300, -300, 5, INT64_MAX, INT64_MIN};
  std::vector<int8_t> narrow(wide.size());
  ConvertBuffer(wide.data(), DType::kI64, narrow.data(), DType::kI8, wide.size());
  EXPECT_EQ(narrow, (std::vector<int8_t>{127, -128, 5, 127, -128}));
  std::vector<int32_t> mid(wide.size());
  ConvertBuffer(wide.data(), DType::kI64, mid.data(), DType::kI32, wide.size());
  EXPECT_EQ(mid, (std::vector<int32_t>{300, -300, 5, INT32_MAX, INT32_MIN}));
}

TEST(DTypeTest, ConvertIntToBF16RoundsOnce) {
  // 2^24 + 2^16 + 1 is just above the bf16 tie 2^24 + 2^16, so it rounds up to 2^24 + 2^17
  // (0x4B81). Rounding to f32 first would land exactly on the tie and then go to even (0x4B80).
  const std::vector<int64_t> src = {(1 << 24) + (1 << 16) + 1, -((1 << 24) + (1 << 16) + 1),
                                    (1 << 24) + (1 << 16), 3, INT64_MAX};
  std::vector<uint16_t> dst(src.size());
  ConvertBuffer(src.data(), DType::kI64, dst.data(), DType::kBF16, src.size());
  EXPECT_EQ(dst[0], 0x4B81);
  EXPECT_EQ(dst[1], 0xCB81);
  EXPECT_EQ(dst[2], 0x4B80);  // an exact tie does go to even
  EXPECT_EQ(dst[3], F32ToBF16(3.0f));
  EXPECT_EQ(dst[4], F32ToBF16(0x1p63f));
  std::vector<int32_t> src32 = {(1 << 24) + (1 << 16) + 1, 70000};
  std::vector<uint16_t> half(src32.size());
  ConvertBuffer(src32.data(), DType::kI32, half.data(), DType::kF16, src32.size());
  EXPECT_EQ(half[0], 0x7C00);
  EXPECT_EQ(half[1], 0x7C00);
}

TEST(DTypeTest, ConvertFloatsAgreesWithScalarFunctions) {
  std::vector<float> src;
  for (int i = -300; i <= 300; ++i) src.push_back(static_cast<float>(i) * 0.37f);
  src.push_back(std::numeric_limits<float>::quiet_NaN());
  std::vector<uint16_t> half(src.size());
  std::vector<uint16_t> bf(src.size());
  ConvertBuffer(src.data(), DType::kF32, half.data(), DType::kF16, src.size());
  ConvertBuffer(src.data(), DType::kF32, bf.data(), DType::kBF16, src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    EXPECT_EQ(half[i], F32ToF16(src[i])) << i;
    EXPECT_EQ(bf[i], F32ToBF16(src[i])) << i;
  }
  // f16 -> bf16 goes through the exact f32 value, so it is one rounding.
  std::vector<uint16_t> bf_from_half(src.size());
  ConvertBuffer(half.data(), DType::kF16, bf_from_half.data(), DType::kBF16, src.size());
  for (size_t i = 0; i + 1 < src.size(); ++i) {
    EXPECT_EQ(bf_from_half[i], F32ToBF16(F16ToF32(half[i]))) << i;
  }
  EXPECT_TRUE(IsBF16NaN(bf_from_half.back()));
  // Same type is a bit-exact copy, in place too.
  ConvertBuffer(half.data(), DType::kF16, half.data(), DType::kF16, half.size());
  EXPECT_EQ(half[0], F32ToF16(src[0]));
  std::vector<float> back(src.size());
  ConvertBuffer(half.data(), DType::kF16, back.data(), DType::kF32, src.size());
  EXPECT_EQ(back[300 + 10], F16ToF32(F32ToF16(3.7f)));
  std::vector<int32_t> ints(src.size());
  ConvertBuffer(half.data(), DType::kF16, ints.data(), DType::kI32, src.size());
  EXPECT_EQ(ints[300 + 10], 4);   // 3.7 -> 4
  EXPECT_EQ(ints[300 - 10], -4);  // -3.7 -> -4
  EXPECT_EQ(ints.back(), 0);      // NaN -> 0
}

// ---------------------------------------------------------------------------------------------
// AlignedBuffer
// ---------------------------------------------------------------------------------------------

TEST(AlignedBufferTest, AlignmentAndSize) {
  for (size_t alignment : {size_t{8}, size_t{64}, size_t{4096}}) {
    AlignedBuffer buf(1000, alignment);
    ASSERT_NE(buf.data(), nullptr);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(buf.data()) % alignment, 0u) << alignment;
    EXPECT_EQ(buf.size(), 1000u);
    EXPECT_GE(buf.capacity(), 1000u);
    EXPECT_EQ(buf.capacity() % alignment, 0u);
    buf.Zero();
    for (size_t i = 0; i < buf.size(); ++i) ASSERT_EQ(buf.as<uint8_t>()[i], 0);
  }
}

TEST(AlignedBufferTest, ZeroSize) {
  AlignedBuffer empty;
  EXPECT_EQ(empty.size(), 0u);
  EXPECT_EQ(empty.data(), nullptr);
  empty.Zero();
  AlignedBuffer zero(0);
  EXPECT_EQ(zero.size(), 0u);
}

TEST(AlignedBufferTest, MoveTransfersOwnership) {
  AlignedBuffer a(256);
  a.as<float>()[0] = 1.5f;
  void* p = a.data();
  AlignedBuffer b = std::move(a);
  EXPECT_EQ(b.data(), p);
  EXPECT_EQ(b.size(), 256u);
  EXPECT_EQ(b.as<float>()[0], 1.5f);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): moved-from state is specified
  EXPECT_EQ(a.size(), 0u);
  AlignedBuffer c(16);
  c = std::move(b);
  EXPECT_EQ(c.data(), p);
  EXPECT_EQ(c.size(), 256u);
}

TEST(AlignedBufferTest, ResizeGrowsOnlyWhenLarger) {
  AlignedBuffer buf(1024);
  void* p = buf.data();
  buf.Resize(100);
  EXPECT_EQ(buf.size(), 100u);
  EXPECT_EQ(buf.data(), p);  // reused
  buf.Resize(1024);
  EXPECT_EQ(buf.data(), p);
  buf.Resize(1 << 20);
  EXPECT_EQ(buf.size(), size_t{1} << 20);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(buf.data()) % 64, 0u);
  buf.as<uint8_t>()[(1 << 20) - 1] = 7;  // the whole range is writable
}

TEST(AlignedBufferDeathTest, BadAlignmentDies) {
  EXPECT_DEATH(AlignedBuffer(64, 48), "not a power of two");
}

// ---------------------------------------------------------------------------------------------
// ThreadPool
// ---------------------------------------------------------------------------------------------

TEST(ThreadPoolTest, CoversEveryIndexOnceAndSums) {
  for (int threads : {1, 2, 3, 4, 8}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (size_t n : {size_t{1}, size_t{2}, size_t{7}, size_t{100}, size_t{10007}}) {
      std::vector<std::atomic<int>> hits(n);
      std::atomic<uint64_t> sum{0};
      std::atomic<int> calls{0};
      pool.ParallelFor(n, [&](size_t begin, size_t end) {
        ASSERT_LT(begin, end);
        ASSERT_LE(end, n);
        uint64_t local = 0;
        for (size_t i = begin; i < end; ++i) {
          hits[i].fetch_add(1);
          local += i + 1;
        }
        sum.fetch_add(local);
        calls.fetch_add(1);
      });
      for (size_t i = 0; i < n; ++i) ASSERT_EQ(hits[i].load(), 1) << "n=" << n << " i=" << i;
      EXPECT_EQ(sum.load(), uint64_t{n} * (n + 1) / 2) << "threads=" << threads << " n=" << n;
      EXPECT_LE(calls.load(), threads);
      EXPECT_EQ(calls.load(), static_cast<int>(std::min<size_t>(n, threads)));
    }
  }
}

TEST(ThreadPoolTest, RespectsMinChunk) {
  ThreadPool pool(4);
  std::mutex mu;
  std::vector<std::pair<size_t, size_t>> chunks;
  auto record = [&](size_t b, size_t e) {
    std::lock_guard<std::mutex> lock(mu);
    chunks.emplace_back(b, e);
  };
  pool.ParallelFor(100, record, 30);
  EXPECT_EQ(chunks.size(), 3u);  // 100 / 30 = 3 chunks, each >= 30
  for (auto [b, e] : chunks) EXPECT_GE(e - b, 30u);
  chunks.clear();
  std::thread::id caller = std::this_thread::get_id();
  std::thread::id ran_on;
  pool.ParallelFor(
      50,
      [&](size_t b, size_t e) {
        record(b, e);
        ran_on = std::this_thread::get_id();
      },
      30);
  ASSERT_EQ(chunks.size(), 1u);  // fewer than 2 * min_chunk items: one chunk, inline
  EXPECT_EQ(chunks[0], (std::pair<size_t, size_t>{0, 50}));
  EXPECT_EQ(ran_on, caller);
  int called = 0;
  pool.ParallelFor(0, [&](size_t, size_t) { ++called; });
  EXPECT_EQ(called, 0);
}

TEST(ThreadPoolTest, ManyRounds) {
  ThreadPool pool(4);
  for (int round = 0; round < 2000; ++round) {
    std::atomic<int> total{0};
    std::atomic<int> calls{0};
    pool.ParallelFor(64 + static_cast<size_t>(round % 5), [&](size_t b, size_t e) {
      total.fetch_add(static_cast<int>(e - b));
      calls.fetch_add(1);
    });
    ASSERT_EQ(total.load(), 64 + round % 5) << round;
    ASSERT_EQ(calls.load(), 4) << round;
  }
}

TEST(ThreadPoolTest, WorkersRunChunks) {
  // The caller grabs chunks too and may finish all of them before a worker wakes, so the
  // caller's chunk waits (bounded) until some other thread has run one.
  ThreadPool pool(3);
  const std::thread::id caller = std::this_thread::get_id();
  std::atomic<bool> worker_ran{false};
  pool.ParallelFor(3, [&](size_t, size_t) {
    if (std::this_thread::get_id() != caller) {
      worker_ran.store(true);
      return;
    }
    Deadline give_up = Deadline::After(std::chrono::seconds(10));
    while (!worker_ran.load() && !give_up.expired()) std::this_thread::yield();
  });
  EXPECT_TRUE(worker_ran.load());
}

TEST(ThreadPoolTest, ExceptionReachesCaller) {
  ThreadPool pool(3);
  std::atomic<int> done{0};
  EXPECT_THROW(pool.ParallelFor(3,
                                [&](size_t b, size_t) {
                                  done.fetch_add(1);
                                  if (b == 1) throw std::runtime_error("chunk 1 failed");
                                }),
               std::runtime_error);
  EXPECT_EQ(done.load(), 3);  // the other chunks still ran
  std::atomic<int> after{0};
  pool.ParallelFor(3, [&](size_t, size_t) { after.fetch_add(1); });  // pool still usable
  EXPECT_EQ(after.load(), 3);
}

TEST(ThreadPoolTest, DefaultPoolWorks) {
  ThreadPool& pool = ThreadPool::Default();
  EXPECT_GE(pool.size(), 1);
  EXPECT_EQ(&pool, &ThreadPool::Default());
  std::atomic<size_t> count{0};
  pool.ParallelFor(1000, [&](size_t b, size_t e) { count.fetch_add(e - b); });
  EXPECT_EQ(count.load(), 1000u);
}

TEST(ThreadPoolDeathTest, NestedCallDies) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  EXPECT_DEATH(
      {
        ThreadPool pool(2);
        pool.ParallelFor(2, [&](size_t, size_t) { pool.ParallelFor(2, [](size_t, size_t) {}); });
      },
      "another ParallelFor");
}

// ---------------------------------------------------------------------------------------------
// Clock
// ---------------------------------------------------------------------------------------------

TEST(ClockTest, NowIsMonotonic) {
  int64_t a = NowNs();
  int64_t b = NowNs();
  EXPECT_LE(a, b);
}

TEST(ClockTest, FiniteDeadline) {
  Deadline d = Deadline::After(milliseconds(200));
  EXPECT_FALSE(d.expired());
  EXPECT_FALSE(d.is_never());
  EXPECT_GT(d.remaining(), nanoseconds(0));
  EXPECT_LE(d.remaining(), milliseconds(200));
  EXPECT_GE(d.remaining_ms_for_poll(), 1);
  EXPECT_LE(d.remaining_ms_for_poll(), 200);
  EXPECT_GT(d.at_ns(), NowNs());
  // Rounded up, never down: a poll with this timeout cannot return before the deadline, and it
  // waits at most one millisecond past it.
  for (int i = 0; i < 100; ++i) {
    Deadline soon = Deadline::After(std::chrono::microseconds(1500 + 37 * i));
    int64_t before = NowNs();
    int64_t ms = soon.remaining_ms_for_poll();
    int64_t after = NowNs();
    EXPECT_GE(ms * 1'000'000, soon.at_ns() - after) << i;
    EXPECT_LT((ms - 1) * 1'000'000, soon.at_ns() - before) << i;
  }
}

TEST(ClockTest, ExpiredDeadline) {
  for (nanoseconds d : {nanoseconds(0), nanoseconds(-5'000'000)}) {
    Deadline past = Deadline::After(d);
    EXPECT_TRUE(past.expired());
    EXPECT_EQ(past.remaining(), nanoseconds(0));
    EXPECT_EQ(past.remaining_ms_for_poll(), 0);
  }
  Deadline brief = Deadline::After(std::chrono::microseconds(100));
  std::this_thread::sleep_for(milliseconds(2));
  EXPECT_TRUE(brief.expired());
}

TEST(ClockTest, NeverAndSaturation) {
  Deadline never = Deadline::Never();
  EXPECT_TRUE(never.is_never());
  EXPECT_FALSE(never.expired());
  EXPECT_EQ(never.remaining_ms_for_poll(), -1);
  EXPECT_EQ(never.at_ns(), INT64_MAX);
  EXPECT_EQ(never.remaining(), nanoseconds::max());
  Deadline huge = Deadline::After(nanoseconds::max());  // must not overflow
  EXPECT_FALSE(huge.expired());
  EXPECT_FALSE(huge.is_never());
  EXPECT_EQ(huge.remaining_ms_for_poll(), INT32_MAX);
}

}  // namespace
}  // namespace strata
