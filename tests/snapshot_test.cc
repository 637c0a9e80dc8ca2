// snapshotd + SnapshotClient (#5): the server runs in a forked child (so it can be SIGKILLed like
// a real one), "ranks" are clients in this process or in forked children that die on purpose.
#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <gtest/gtest.h>

#include "base/clock.h"
#include "checkpoint/erasure.h"
#include "checkpoint/snapshot_client.h"
#include "checkpoint/snapshot_wire.h"
#include "checkpoint/snapshotd.h"

namespace strata::checkpoint {
namespace {

namespace fs = std::filesystem;

// Sizes deliberately not multiples of a page or of 8: sections end mid-word.
constexpr size_t kWeights = 200003;
constexpr size_t kMoment = 100001;
constexpr size_t kExtra = 77;
constexpr size_t kOffM = 200064;  // sections at caller-chosen offsets with gaps between them
constexpr size_t kOffV = kOffM + kMoment + 31;
constexpr size_t kOffX = kOffV + kMoment + 5;
constexpr size_t kBytes = kOffX + kExtra;

uint64_t Mix(uint64_t x) {  // splitmix64
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The bytes rank `rank` snapshots at `version`: different for every rank, version and section.
std::vector<uint8_t> Expected(int rank, int64_t version, int section, size_t n) {
  std::vector<uint8_t> out(n);
  const uint64_t seed = Mix(static_cast<uint64_t>(rank) * 1000003 + version * 7919 + section);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(Mix(seed + i / 8) >> (8 * (i % 8)));
  return out;
}

struct Layout {
  const char* name;
  size_t offset;
  size_t bytes;
};
const Layout kSections[] = {
    {"weights", 0, kWeights}, {"adam_m", kOffM, kMoment}, {"adam_v", kOffV, kMoment},
    {"extra", kOffX, kExtra}};

std::vector<Section> Sections() {
  std::vector<Section> s;
  for (const Layout& l : kSections) s.push_back({l.name, l.offset, l.bytes});
  return s;
}

// One snapshot as a trainer takes it: BeginVersion, copy every section, Publish.
Status Snapshot(SnapshotClient& c, int rank, int64_t version) {
  STRATA_ASSIGN_OR_RETURN(uint8_t* dst, c.BeginVersion(version));
  for (int i = 0; i < 4; ++i) {
    const auto data = Expected(rank, version, i, kSections[i].bytes);
    std::memcpy(dst + kSections[i].offset, data.data(), data.size());
  }
  return c.Publish(version, Sections());
}

// Reads rank's sections of `info` and compares them with what it wrote at `version`.
void ExpectData(SnapshotClient& c, const LatestInfo& info, int rank, int64_t version) {
  std::vector<std::vector<uint8_t>> bufs;
  std::vector<SectionBuffer> out;
  for (const Layout& l : kSections) bufs.emplace_back(l.bytes, 0xEE);
  for (int i = 0; i < 4; ++i) out.push_back({kSections[i].name, bufs[i].data(), bufs[i].size()});
  ASSERT_TRUE(c.ReadLatest(info, out, rank).ok()) << c.ReadLatest(info, out, rank);
  for (int i = 0; i < 4; ++i) {
    EXPECT_TRUE(bufs[i] == Expected(rank, version, i, kSections[i].bytes))
        << "rank " << rank << " version " << version << " section " << kSections[i].name;
  }
}

std::vector<std::string> ShmObjects(const std::string& run) {
  const std::string prefix = SlotShmName(run, 0, 0).substr(1, std::string::npos);
  const std::string stem = prefix.substr(0, prefix.find("-r0-s0"));
  std::vector<std::string> out;
  if (DIR* d = ::opendir("/dev/shm")) {
    while (dirent* e = ::readdir(d)) {
      if (std::string(e->d_name).rfind(stem + "-r", 0) == 0) out.push_back(e->d_name);
    }
    ::closedir(d);
  }
  return out;
}

class SnapshotTest : public ::testing::Test {
 protected:
  void SetUp() override {
    static std::atomic<int> counter{0};
    run_ = fmt::format("snaptest-{}-{}", ::getpid(), counter++);
    dir_ = fs::temp_directory_path() / run_;
    fs::create_directories(dir_);
    options_.run = run_;
    options_.socket_path = (dir_ / "sd.sock").string();
    options_.idle_timeout_s = 60;
  }
  void TearDown() override {
    for (pid_t p : servers_) {
      ::kill(p, SIGKILL);
      ::waitpid(p, nullptr, 0);
    }
    for (const std::string& n : ShmObjects(run_)) ::shm_unlink(("/" + n).c_str());
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Forks a snapshotd; returns once it answers (or fails the test).
  pid_t StartServer(const SnapshotdOptions& o) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      auto d = Snapshotd::Create(o);
      if (!d.ok()) ::_exit(2);
      const Status st = (*d)->Run();
      ::_exit(st.ok() ? 0 : st.code() == StatusCode::kAlreadyExists ? 17 : 3);
    }
    servers_.push_back(pid);
    return pid;
  }
  pid_t StartServerAndWait(const SnapshotdOptions& o) {
    const pid_t pid = StartServer(o);
    EXPECT_TRUE(WaitForServer(o.socket_path)) << "snapshotd did not come up";
    return pid;
  }
  static bool WaitForServer(const std::string& path) {
    const int64_t deadline = NowNs() + 10'000'000'000;
    while (NowNs() < deadline) {
      auto c = SnapshotClient::Connect(path);
      if (c.ok() && (*c)->Ping().ok()) return true;
      ::usleep(10000);
    }
    return false;
  }
  // Exit code of a server, waiting up to `timeout_s`; -1 if it is still running, -2 if killed.
  int WaitServer(pid_t pid, double timeout_s) {
    const int64_t deadline = NowNs() + static_cast<int64_t>(timeout_s * 1e9);
    while (NowNs() < deadline) {
      int st = 0;
      if (::waitpid(pid, &st, WNOHANG) == pid) {
        std::erase(servers_, pid);
        return WIFEXITED(st) ? WEXITSTATUS(st) : -2;
      }
      ::usleep(5000);
    }
    return -1;
  }
  std::unique_ptr<SnapshotClient> Client(int rank, int world = 2) {
    auto c = SnapshotClient::Connect(options_.socket_path);
    EXPECT_TRUE(c.ok()) << c.status();
    if (!c.ok()) return nullptr;
    const Status st = (*c)->Register(rank, world, kBytes);
    EXPECT_TRUE(st.ok()) << st;
    return std::move(*c);
  }

  // Ranks 0 and 1 snapshot versions 1..last, each committing.
  static void SnapshotBoth(SnapshotClient& r0, SnapshotClient& r1, int64_t last) {
    for (int64_t v = 1; v <= last; ++v) {
      ASSERT_TRUE(Snapshot(r0, 0, v).ok()) << v;
      ASSERT_TRUE(Snapshot(r1, 1, v).ok()) << v;
    }
  }

  std::string run_;
  fs::path dir_;
  SnapshotdOptions options_;
  std::vector<pid_t> servers_;
};


// The fused copy: an exact copy, and the CRC-32C of it, at sizes around its 256 KiB chunk and
// its 1 MiB switch to streaming stores, to and from addresses off any alignment.
TEST(CopyAndChecksum, CopiesExactlyAndMatchesFragmentChecksum) {
  std::mt19937 rng(7);
  for (size_t n : {size_t{0}, size_t{1}, size_t{(256 << 10) - 1}, size_t{256 << 10},
                   size_t{(256 << 10) + 1}, size_t{(1 << 20) - 1}, size_t{1 << 20},
                   size_t{(1 << 20) + 63}, size_t{(3 << 20) + 17}}) {
    for (size_t shift : {size_t{0}, size_t{3}, size_t{37}}) {
      std::vector<uint8_t> src(n + shift), dst(n + shift + 1, 0xEE);
      for (uint8_t& b : src) b = static_cast<uint8_t>(rng());
      const uint8_t* from = src.data() + (shift % 7);
      uint8_t* to = dst.data() + shift;
      const uint32_t crc = CopyAndChecksum(to, from, n);
      EXPECT_EQ(crc, FragmentChecksum(from, n)) << n << " +" << shift;
      EXPECT_TRUE(std::equal(from, from + n, to)) << n << " +" << shift;
      EXPECT_EQ(to[n], 0xEE) << n << " +" << shift;  // nothing past the end
      EXPECT_TRUE(std::all_of(dst.begin(), dst.begin() + static_cast<long>(shift),
                              [](uint8_t b) { return b == 0xEE; }))
          << "nothing before the start";
    }
  }
}

TEST_F(SnapshotTest, CommitsOnlyWhenEveryRankPublishedAndReadsBackBitwise) {
  StartServerAndWait(options_);
  auto r0 = Client(0);
  auto r1 = Client(1);
  ASSERT_TRUE(r0 && r1);
  EXPECT_FALSE(r0->reattached());

  ASSERT_TRUE(Snapshot(*r0, 0, 1).ok());
  EXPECT_FALSE(r0->last_publish_committed());
  auto none = r0->Latest();
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_FALSE(none->found) << "v1 must not commit before rank 1 published it";

  ASSERT_TRUE(Snapshot(*r1, 1, 1).ok());
  EXPECT_TRUE(r1->last_publish_committed());
  auto v1 = r0->Latest();
  ASSERT_TRUE(v1.ok() && v1->found);
  EXPECT_EQ(v1->version, 1);
  EXPECT_FALSE(v1->from_disk);

  // v2 goes to the other slot: v1 stays intact until v2 commits.
  auto p1 = r0->BeginVersion(2);
  ASSERT_TRUE(p1.ok()) << p1.status();
  std::memset(*p1, 0xAB, kBytes);  // a half-written snapshot must not disturb the committed one
  ExpectData(*r0, *r0->Latest(), 0, 1);
  ASSERT_TRUE(Snapshot(*r0, 0, 2).ok());
  ASSERT_TRUE(Snapshot(*r1, 1, 2).ok());
  auto v2 = r1->Latest();
  ASSERT_TRUE(v2.ok() && v2->found);
  EXPECT_EQ(v2->version, 2);
  ASSERT_EQ(v2->manifest.ranks_size(), 2);
  EXPECT_NE(v2->manifest.ranks(0).shm_name(), v1->manifest.ranks(0).shm_name());
  // The manifest's checksums are CRC-32C of exactly what was written.
  for (const auto& rk : v2->manifest.ranks()) {
    ASSERT_EQ(rk.sections_size(), 4);
    for (int i = 0; i < 4; ++i) {
      const auto data = Expected(rk.rank(), 2, i, kSections[i].bytes);
      EXPECT_EQ(rk.sections(i).crc32c(), FragmentChecksum(data.data(), data.size()));
    }
  }
  ExpectData(*r0, *v2, 0, 2);
  ExpectData(*r0, *v2, 1, 2);  // any rank's data can be read through the manifest

  // Versions must increase past the committed one.
  EXPECT_EQ(r0->BeginVersion(2).status().code(), StatusCode::kFailedPrecondition);

  // Rank 0 ahead by a version: it cannot overwrite its published-but-uncommitted v3 with v4
  // (that would make v3 uncommittable), so BeginVersion(4) waits and, here, times out.
  ASSERT_TRUE(Snapshot(*r0, 0, 3).ok());
  auto impatient = SnapshotClient::Connect(options_.socket_path,
                                           SnapshotClient::Options{.rpc_timeout_s = 5,
                                                                   .begin_timeout_s = 0.2});
  ASSERT_TRUE(impatient.ok());
  ASSERT_TRUE((*impatient)->Register(0, 2, kBytes).ok());  // takes over rank 0 (reattach)
  EXPECT_TRUE((*impatient)->reattached());
  const int64_t t0 = NowNs();
  auto busy = (*impatient)->BeginVersion(4);
  EXPECT_EQ(busy.status().code(), StatusCode::kUnavailable) << busy.status();
  EXPECT_NE(busy.status().message().find("busy"), std::string::npos) << busy.status();
  EXPECT_LT(NowNs() - t0, 3'000'000'000);
  ASSERT_TRUE(Snapshot(*r1, 1, 3).ok());
  ASSERT_TRUE(Snapshot(**impatient, 0, 4).ok());
  auto v3 = r1->Latest();
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ(v3->version, 3);
  ExpectData(*r1, *v3, 0, 3);
  ExpectData(*r1, *v3, 1, 3);
}

TEST_F(SnapshotTest, ExpectedLocalRanksWaitsForRanksNotRegisteredYet) {
  options_.expected_local_ranks = 2;
  StartServerAndWait(options_);
  auto r0 = Client(0);
  ASSERT_TRUE(r0);
  ASSERT_TRUE(Snapshot(*r0, 0, 1).ok());
  EXPECT_FALSE(r0->last_publish_committed()) << "rank 1 has not even registered yet";
  EXPECT_FALSE(r0->Latest()->found);
  auto r1 = Client(1);
  ASSERT_TRUE(r1);
  ASSERT_TRUE(Snapshot(*r1, 1, 1).ok());
  EXPECT_TRUE(r1->last_publish_committed());
  EXPECT_EQ(r0->Latest()->version, 1);
}

TEST_F(SnapshotTest, TrainerDyingMidSnapshotKeepsCommittedVersionAndRestartReattaches) {
  StartServerAndWait(options_);
  auto r0 = Client(0);
  auto r1 = Client(1);
  ASSERT_TRUE(r0 && r1);
  ASSERT_NO_FATAL_FAILURE(SnapshotBoth(*r0, *r1, 2));
  r1.reset();  // rank 1's trainer is gone...
  // ...and its restarted incarnation dies again mid-snapshot: after BeginVersion, half the bytes
  // written, no Publish.
  const pid_t child = ::fork();
  if (child == 0) {
    auto c = SnapshotClient::Connect(options_.socket_path);
    if (!c.ok() || !(*c)->Register(1, 2, kBytes).ok()) ::_exit(2);
    auto p = (*c)->BeginVersion(3);
    if (!p.ok()) ::_exit(3);
    std::memset(*p, 0x5A, kBytes / 2);
    ::_exit(0);
  }
  int wst = 0;
  ASSERT_EQ(::waitpid(child, &wst, 0), child);
  ASSERT_TRUE(WIFEXITED(wst) && WEXITSTATUS(wst) == 0) << wst;
  ASSERT_TRUE(Snapshot(*r0, 0, 3).ok());  // rank 0 goes on; v3 cannot commit without rank 1

  // The next restart of rank 1 reattaches and reads v2 back bitwise.
  auto r1b = Client(1);
  ASSERT_TRUE(r1b);
  EXPECT_TRUE(r1b->reattached());
  auto latest = r1b->Latest();
  ASSERT_TRUE(latest.ok() && latest->found);
  EXPECT_EQ(latest->version, 2);
  ExpectData(*r1b, *latest, 1, 2);
  ExpectData(*r1b, *latest, 0, 2);
  // And snapshots on from there: v3 commits once the restarted rank 1 publishes it.
  ASSERT_TRUE(Snapshot(*r1b, 1, 3).ok());
  EXPECT_TRUE(r1b->last_publish_committed());
  auto v3 = r0->Latest();
  ASSERT_TRUE(v3.ok());
  EXPECT_EQ(v3->version, 3);
  ExpectData(*r0, *v3, 1, 3);
}

TEST_F(SnapshotTest, CorruptedByteInSharedMemoryIsCorruptionNamingRankAndSection) {
  StartServerAndWait(options_);
  auto r0 = Client(0, 1);
  ASSERT_TRUE(r0);
  ASSERT_TRUE(Snapshot(*r0, 0, 7).ok());
  auto info = r0->Latest();
  ASSERT_TRUE(info.ok() && info->found);
  const std::string name = info->manifest.ranks(0).shm_name();
  const int fd = ::shm_open(name.c_str(), O_RDWR, 0);
  ASSERT_GE(fd, 0);
  const size_t len = SlotBytes(kBytes);
  auto* p = static_cast<uint8_t*>(::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0));
  ::close(fd);
  ASSERT_NE(p, MAP_FAILED);
  p[kOffM + 12345] ^= 0x10;  // one bit of adam_m
  std::vector<uint8_t> w(kWeights), m(kMoment);
  EXPECT_TRUE(r0->ReadLatest(*info, {{"weights", w.data(), w.size()}}).ok());
  const Status st = r0->ReadLatest(*info, {{"adam_m", m.data(), m.size()}});
  EXPECT_EQ(st.code(), StatusCode::kCorruption) << st;
  EXPECT_NE(st.message().find("rank 0"), std::string::npos) << st;
  EXPECT_NE(st.message().find("adam_m"), std::string::npos) << st;
  p[kOffM + 12345] ^= 0x10;
  EXPECT_TRUE(r0->ReadLatest(*info, {{"adam_m", m.data(), m.size()}}).ok());
  // Wrong buffer size and unknown names are caller errors, told apart from corruption.
  EXPECT_EQ(r0->ReadLatest(*info, {{"adam_m", m.data(), m.size() - 1}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_EQ(r0->ReadLatest(*info, {{"nope", m.data(), 1}}).code(), StatusCode::kNotFound);
  ::munmap(p, len);
}

TEST_F(SnapshotTest, PersistsEveryNthVersionAndFreshServerFallsBackToDisk) {
  options_.persist_dir = (dir_ / "persist").string();
  options_.persist_every = 2;
  options_.persist_keep = 2;
  const pid_t pid = StartServerAndWait(options_);
  auto r0 = Client(0, 1);
  ASSERT_TRUE(r0);
  for (int64_t v = 1; v <= 7; ++v) ASSERT_TRUE(Snapshot(*r0, 0, v).ok()) << v;
  // Commits 2, 4, 6 are persisted; with persist_keep 2 only v4 and v6 remain.
  const fs::path root = fs::path(options_.persist_dir) / run_;
  const int64_t deadline = NowNs() + 10'000'000'000;
  while (!fs::exists(root / "v6") && NowNs() < deadline) ::usleep(5000);
  ASSERT_TRUE(r0->Finish().ok());  // Finish waits for queued persistence before exiting
  EXPECT_EQ(WaitServer(pid, 10), 0);
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(root)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"v4", "v6"}));
  // The file holds exactly the bytes written (independent of the client's reader).
  {
    std::ifstream f(root / "v6" / "rank0.bin", std::ios::binary);
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(f)), {});
    ASSERT_EQ(bytes.size(), kBytes);
    for (int i = 0; i < 4; ++i) {
      const auto want = Expected(0, 6, i, kSections[i].bytes);
      EXPECT_TRUE(std::equal(want.begin(), want.end(), bytes.begin() + kSections[i].offset))
          << kSections[i].name;
    }
  }
  EXPECT_TRUE(ShmObjects(run_).empty());

  // A fresh snapshotd with empty memory answers from disk and says so.
  StartServerAndWait(options_);
  auto c = SnapshotClient::Connect(options_.socket_path);
  ASSERT_TRUE(c.ok());
  auto latest = (*c)->Latest();
  ASSERT_TRUE(latest.ok() && latest->found) << latest.status();
  EXPECT_TRUE(latest->from_disk);
  EXPECT_EQ(latest->version, 6);
  EXPECT_EQ(latest->disk_dir, (root / "v6").string());
  ExpectData(**c, *latest, 0, 6);
  // A damaged disk copy is caught by the same checksums.
  {
    std::fstream f(root / "v6" / "rank0.bin", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(kOffX + 3));
    f.put('\x42' ^ static_cast<char>(Expected(0, 6, 3, kExtra)[3]));
  }
  std::vector<uint8_t> x(kExtra);
  const Status bad = (*c)->ReadLatest(*latest, {{"extra", x.data(), x.size()}}, 0);
  EXPECT_EQ(bad.code(), StatusCode::kCorruption) << bad;
  EXPECT_NE(bad.message().find("extra"), std::string::npos);
}

TEST_F(SnapshotTest, KilledServerGivesUnavailableNotAHangAndSurvivingMemoryIsRecovered) {
  const pid_t pid = StartServerAndWait(options_);
  auto r0 = Client(0);
  auto r1 = Client(1);
  ASSERT_TRUE(r0 && r1);
  ASSERT_NO_FATAL_FAILURE(SnapshotBoth(*r0, *r1, 2));
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  EXPECT_EQ(WaitServer(pid, 5), -2);
  const int64_t t0 = NowNs();
  const Status st = Snapshot(*r0, 0, 3);
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
  EXPECT_EQ(r1->Latest().status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(SnapshotClient::Connect(options_.socket_path).status().code(),
            StatusCode::kUnavailable);
  EXPECT_LT(NowNs() - t0, 2'000'000'000) << "a dead snapshotd must fail fast";

  // The shared memory outlived the server; a new one finds the committed version in the slots'
  // manifest rooms once the ranks re-register.
  EXPECT_EQ(ShmObjects(run_).size(), 4u);
  StartServerAndWait(options_);
  auto n0 = Client(0);
  auto n1 = Client(1);
  ASSERT_TRUE(n0 && n1);
  EXPECT_TRUE(n0->reattached());
  auto latest = n1->Latest();
  ASSERT_TRUE(latest.ok() && latest->found) << latest.status();
  EXPECT_EQ(latest->version, 2);
  EXPECT_FALSE(latest->from_disk);
  ExpectData(*n1, *latest, 0, 2);
  ExpectData(*n1, *latest, 1, 2);
  ASSERT_TRUE(Snapshot(*n0, 0, 3).ok());
  ASSERT_TRUE(Snapshot(*n1, 1, 3).ok());
  EXPECT_EQ(n0->Latest()->version, 3);
}

// A snapshotd replaced in the middle of a run (it hung and a rank killed it): one rank comes to
// the new one while the other is still in a step, and its snapshot must commit without waiting
// for the other to register (that rank may be waiting for it in a collective).
TEST_F(SnapshotTest, ServerReplacedMidRunAdoptsEveryLocalRankFromSharedMemory) {
  options_.expected_local_ranks = 2;
  const pid_t pid = StartServerAndWait(options_);
  auto r0 = Client(0);
  auto r1 = Client(1);
  ASSERT_TRUE(r0 && r1);
  ASSERT_NO_FATAL_FAILURE(SnapshotBoth(*r0, *r1, 2));
  ASSERT_TRUE(Snapshot(*r1, 1, 3).ok());  // rank 1 published v3; rank 0's v3 never got there
  EXPECT_FALSE(r1->last_publish_committed());
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  EXPECT_EQ(WaitServer(pid, 5), -2);

  StartServerAndWait(options_);
  auto patient = SnapshotClient::Connect(options_.socket_path,
                                         SnapshotClient::Options{.rpc_timeout_s = 5,
                                                                 .begin_timeout_s = 2});
  ASSERT_TRUE(patient.ok());
  ASSERT_TRUE((*patient)->Register(0, 2, kBytes).ok());
  EXPECT_TRUE((*patient)->reattached());
  auto latest = (*patient)->Latest();
  ASSERT_TRUE(latest.ok() && latest->found) << latest.status();
  EXPECT_EQ(latest->version, 2) << "v2 is recovered before rank 1 registers";
  ExpectData(**patient, *latest, 1, 2);
  // Rank 0 redoes v3: it commits with the v3 rank 1 left in its slot.
  const Status redo = Snapshot(**patient, 0, 3);
  ASSERT_TRUE(redo.ok()) << redo;
  EXPECT_TRUE((*patient)->last_publish_committed());
  auto v3 = (*patient)->Latest();
  ASSERT_TRUE(v3.ok() && v3->found);
  EXPECT_EQ(v3->version, 3);
  ExpectData(**patient, *v3, 0, 3);
  ExpectData(**patient, *v3, 1, 3);
  // Rank 1 comes back (its old connection died with the old server) and both go on.
  EXPECT_EQ(Snapshot(*r1, 1, 4).code(), StatusCode::kUnavailable);
  auto n1 = Client(1);
  ASSERT_TRUE(n1);
  EXPECT_TRUE(n1->reattached());
  ASSERT_TRUE(Snapshot(**patient, 0, 4).ok());
  ASSERT_TRUE(Snapshot(*n1, 1, 4).ok());
  EXPECT_TRUE(n1->last_publish_committed());
  EXPECT_EQ(n1->Latest()->version, 4);
}

// What a new snapshotd adopts must be this launch's ranks of the node: when a relaunch puts
// another rank here, the adopted rank that never registers is dropped, not waited for.
TEST_F(SnapshotTest, AdoptedRankReplacedByAnotherIsNotWaitedFor) {
  options_.expected_local_ranks = 2;
  const pid_t pid = StartServerAndWait(options_);
  {
    auto r0 = Client(0, 3);
    auto r1 = Client(1, 3);
    ASSERT_TRUE(r0 && r1);
    ASSERT_TRUE(Snapshot(*r0, 0, 1).ok());
    ASSERT_TRUE(Snapshot(*r1, 1, 1).ok());
    EXPECT_TRUE(r1->last_publish_committed());
  }
  ASSERT_EQ(::kill(pid, SIGKILL), 0);
  EXPECT_EQ(WaitServer(pid, 5), -2);
  StartServerAndWait(options_);
  auto n0 = Client(0, 3);  // adopts ranks 0 and 1
  auto n2 = Client(2, 3);  // but this launch put rank 2 here instead of rank 1
  ASSERT_TRUE(n0 && n2);
  ASSERT_TRUE(Snapshot(*n0, 0, 2).ok());
  ASSERT_TRUE(Snapshot(*n2, 2, 2).ok());
  EXPECT_TRUE(n2->last_publish_committed()) << "rank 1 must not be waited for";
  auto v2 = n0->Latest();
  ASSERT_TRUE(v2.ok() && v2->found);
  EXPECT_EQ(v2->version, 2);
  ASSERT_EQ(v2->manifest.ranks_size(), 2);
  EXPECT_EQ(v2->manifest.ranks(0).rank(), 0);
  EXPECT_EQ(v2->manifest.ranks(1).rank(), 2);
  ExpectData(*n0, *v2, 2, 2);
}

TEST_F(SnapshotTest, FinishRemovesSharedMemoryAndSocket) {
  const pid_t pid = StartServerAndWait(options_);
  auto r0 = Client(0);
  auto r1 = Client(1);
  ASSERT_TRUE(r0 && r1);
  ASSERT_TRUE(Snapshot(*r0, 0, 1).ok());
  ASSERT_TRUE(Snapshot(*r1, 1, 1).ok());
  auto objs = ShmObjects(run_);
  std::sort(objs.begin(), objs.end());
  ASSERT_EQ(objs.size(), 4u);
  EXPECT_EQ("/" + objs[0], SlotShmName(run_, 0, 0));
  ASSERT_TRUE(r0->Finish().ok());
  EXPECT_EQ(WaitServer(pid, 5), 0);
  EXPECT_TRUE(ShmObjects(run_).empty());
  EXPECT_FALSE(fs::exists(options_.socket_path));
  EXPECT_EQ(r1->Latest().status().code(), StatusCode::kUnavailable);
}

TEST_F(SnapshotTest, MalformedFramesCloseOnlyThatConnection) {
  StartServerAndWait(options_);
  auto good = Client(0, 1);
  ASSERT_TRUE(good);
  auto raw_reply = [&](const std::string& bytes) -> std::pair<Status, proto::SnapshotReply> {
    auto fd = ConnectUnix(options_.socket_path);
    EXPECT_TRUE(fd.ok());
    EXPECT_EQ(::send(*fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
    proto::SnapshotReply reply;
    Status st = ReadFrame(*fd, &reply, 5000);
    // The server closes the connection after the error reply.
    char c;
    const ssize_t after = ::recv(*fd, &c, 1, 0);
    EXPECT_EQ(after, 0);
    ::close(*fd);
    return {st, reply};
  };
  {
    auto [st, reply] = raw_reply(std::string("\xff\xff\xff\x7f", 4));  // 2 GiB length
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(reply.code(), static_cast<int>(StatusCode::kInvalidArgument));
    EXPECT_NE(reply.message().find("limit"), std::string::npos) << reply.message();
  }
  {
    auto [st, reply] = raw_reply(std::string("\x05\x00\x00\x00\xff\xff\xff\xff\xff", 9));
    ASSERT_TRUE(st.ok()) << st;
    EXPECT_EQ(reply.code(), static_cast<int>(StatusCode::kInvalidArgument));
  }
  {
    // Half a frame, then hang up: the server drops it silently.
    auto fd = ConnectUnix(options_.socket_path);
    ASSERT_TRUE(fd.ok());
    ASSERT_EQ(::send(*fd, "\x40\x00\x00\x00\x0a", 5, MSG_NOSIGNAL), 5);
    ::close(*fd);
  }
  // Requests the server must refuse without dying.
  EXPECT_EQ(good->Register(0, 1, kBytes + 1).code(), StatusCode::kFailedPrecondition);
  auto other = SnapshotClient::Connect(options_.socket_path);
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*other)->Register(3, 2, kBytes).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ((*other)->Register(1, 2, kBytes).code(), StatusCode::kFailedPrecondition)
      << "world size differs from rank 0's";
  ASSERT_TRUE(good->BeginVersion(1).ok());
  EXPECT_EQ(good->Publish(1, {{"weights", kBytes - 10, 11}}).code(),
            StatusCode::kInvalidArgument);
  EXPECT_TRUE(good->Ping().ok()) << good->Ping().status();
  EXPECT_TRUE(Snapshot(*good, 0, 1).ok());
  EXPECT_EQ(good->Latest()->version, 1);
}

TEST_F(SnapshotTest, IdleTimeoutExitsAndRacingServersLeaveOne) {
  options_.idle_timeout_s = 0.3;
  const pid_t a = StartServer(options_);
  const pid_t b = StartServer(options_);
  ASSERT_TRUE(WaitForServer(options_.socket_path));
  // One of the two wins the socket; the other says AlreadyExists (exit 17 here) at once, and the
  // winner exits by itself once idle, cleaning up.
  const int ea = WaitServer(a, 5);
  const int eb = WaitServer(b, 5);
  EXPECT_EQ(std::min(ea, eb), 0) << ea << " " << eb;
  EXPECT_EQ(std::max(ea, eb), 17) << ea << " " << eb;
  EXPECT_FALSE(fs::exists(options_.socket_path));
}

// The real thing: ranks racing to start a detached `strata snapshotd`; one server results, it
// outlives them, and Finish ends it with everything removed.
TEST_F(SnapshotTest, EnsureSnapshotdStartsOneDetachedServerForRacingRanks) {
#ifndef STRATA_BINARY
  GTEST_SKIP() << "built without the path of the strata binary";
#else
  const std::string binary = STRATA_BINARY;
  if (::access(binary.c_str(), X_OK) != 0) GTEST_SKIP() << binary << " is not built";
  if (std::system(fmt::format("'{}' snapshotd --help >/dev/null 2>&1", binary).c_str()) != 0) {
    GTEST_SKIP() << binary << " has no snapshotd subcommand";
  }
  options_.idle_timeout_s = 20;
  constexpr int kRanks = 3;
  std::vector<pid_t> kids;
  for (int r = 0; r < kRanks; ++r) {
    const pid_t pid = ::fork();
    if (pid == 0) {
      const Status st = EnsureSnapshotd(options_, binary);
      if (!st.ok()) std::fprintf(stderr, "rank %d: %s\n", r, st.ToString().c_str());
      ::_exit(st.ok() ? 0 : 1);
    }
    kids.push_back(pid);
  }
  for (pid_t pid : kids) {
    int wst = 0;
    ASSERT_EQ(::waitpid(pid, &wst, 0), pid);
    EXPECT_TRUE(WIFEXITED(wst) && WEXITSTATUS(wst) == 0) << "a racing rank failed";
  }
  std::vector<std::unique_ptr<SnapshotClient>> ranks;
  for (int r = 0; r < kRanks; ++r) ranks.push_back(Client(r, kRanks));
  auto server_pid = ranks[0]->Ping();
  ASSERT_TRUE(server_pid.ok()) << server_pid.status();
  for (int r = 1; r < kRanks; ++r) EXPECT_EQ(*ranks[r]->Ping(), *server_pid) << "two servers";
  EXPECT_NE(::getsid(*server_pid), ::getsid(0)) << "snapshotd must be in its own session";
  for (int r = 0; r < kRanks; ++r) ASSERT_TRUE(Snapshot(*ranks[r], r, 5).ok());
  auto latest = ranks[2]->Latest();
  ASSERT_TRUE(latest.ok() && latest->found);
  EXPECT_EQ(latest->version, 5);
  ExpectData(*ranks[2], *latest, 1, 5);
  EXPECT_EQ(ShmObjects(run_).size(), 2u * kRanks);
  ASSERT_TRUE(ranks[0]->Finish().ok());
  // Not our child (double fork): wait for the socket and the process to go away.
  const int64_t deadline = NowNs() + 5'000'000'000;
  auto gone = [&] {
    if (fs::exists(options_.socket_path)) return false;
    std::ifstream stat(fmt::format("/proc/{}/stat", *server_pid));
    std::string pid, comm, state;
    return !(stat >> pid >> comm >> state) || state == "Z";  // a zombie of a non-reaping init
  };
  while (!gone() && NowNs() < deadline) ::usleep(10000);
  EXPECT_TRUE(gone());
  EXPECT_TRUE(ShmObjects(run_).empty());
  ::unlink(fmt::format("/tmp/strata-snapshotd-{}.log", SanitizeRunName(run_)).c_str());
#endif
}

TEST_F(SnapshotTest, EnsureSnapshotdFindsARunningServer) {
  StartServerAndWait(options_);
  EXPECT_TRUE(EnsureSnapshotd(options_, "/nonexistent/strata").ok());
  EXPECT_EQ(DefaultSocketPath("job/1 x"), DefaultSocketPath("job/1 x"));
  EXPECT_NE(DefaultSocketPath("job/1"), DefaultSocketPath("job_1"));
  EXPECT_EQ(DefaultSocketPath("job_1"), "/tmp/strata-snapshotd-job_1.sock");
}

}  // namespace
}  // namespace strata::checkpoint
