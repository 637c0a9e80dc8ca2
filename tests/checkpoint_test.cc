// Erasure coding of snapshots (checkpoint/erasure.h): Reed-Solomon encode/reconstruct, the
// rotating group layout, and fragment checksums.
//
// Independent references: parity is recomputed here with a bit-by-bit GF(2^8) multiply (the
// AES-free polynomial x^8 + x^4 + x^3 + x^2 + 1 = 0x11d that ISA-L uses) from the Cauchy
// formula 1 / (r xor j); the group parity is recomputed from the layout formula written in the
// header comment, not from StripeLayout's accessors; CRC-32C is checked against the standard
// check value of "123456789".
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "base/thread_pool.h"
#include "checkpoint/erasure.h"

namespace strata::checkpoint {
namespace {

using Bytes = std::vector<uint8_t>;

// Carry-less multiply reduced by 0x11d, one bit at a time: slow, obviously correct.
uint8_t RefMul(uint8_t a, uint8_t b) {
  unsigned acc = 0, x = a;
  for (int bit = 0; bit < 8; ++bit) {
    if (b & (1u << bit)) acc ^= x;
    x <<= 1;
    if (x & 0x100u) x ^= 0x11du;
  }
  return static_cast<uint8_t>(acc);
}

uint8_t RefInv(uint8_t a) {
  for (unsigned b = 1; b < 256; ++b) {
    if (RefMul(a, static_cast<uint8_t>(b)) == 1) return static_cast<uint8_t>(b);
  }
  ADD_FAILURE() << "no inverse of " << int{a};
  return 0;
}

// Cauchy parity coefficient of parity row p (generator row k + p) and data column j.
uint8_t RefCoef(int k, int p, int j) {
  static const std::vector<uint8_t> inverses = [] {
    std::vector<uint8_t> inv(256, 0);
    for (unsigned a = 1; a < 256; ++a) inv[a] = RefInv(static_cast<uint8_t>(a));
    return inv;
  }();
  return inverses[static_cast<uint8_t>((k + p) ^ j)];
}

Bytes RandomBytes(size_t n, std::mt19937& rng) {
  Bytes b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

std::vector<uint8_t*> Ptrs(std::vector<Bytes>& bufs) {
  std::vector<uint8_t*> p;
  for (auto& b : bufs) p.push_back(b.data());
  return p;
}

std::vector<const uint8_t*> ConstPtrs(const std::vector<Bytes>& bufs) {
  std::vector<const uint8_t*> p;
  for (const auto& b : bufs) p.push_back(b.data());
  return p;
}

ReedSolomon MakeRs(int k, int m, size_t chunk_bytes = 64) {
  ReedSolomon::Options opt;
  opt.chunk_bytes = chunk_bytes;  // small, so test buffers cross many chunks
  auto rs = ReedSolomon::Create(k, m, opt);
  EXPECT_TRUE(rs.ok()) << rs.status();
  return std::move(rs).value();
}

const std::vector<std::pair<int, int>> kCodes = {{1, 1}, {2, 1}, {3, 2}, {4, 2},
                                                 {2, 0}, {3, 0}, {5, 3}, {1, 3}};

// ---------------------------------------------------------------------------------------------

TEST(FragmentChecksum, Crc32cCheckValue) {
  EXPECT_EQ(FragmentChecksum("123456789", 9), 0xE3069283u);
  EXPECT_EQ(FragmentChecksum(nullptr, 0), 0u);
  // 32 zero bytes: the iSCSI test vector of RFC 3720, B.4.
  const Bytes zeros(32, 0);
  EXPECT_EQ(FragmentChecksum(zeros.data(), zeros.size()), 0x8A9136AAu);
  const Bytes ones(32, 0xFF);
  EXPECT_EQ(FragmentChecksum(ones.data(), ones.size()), 0x62A8AB43u);
}

TEST(FragmentChecksum, EveryByteFlipIsDetected) {
  std::mt19937 rng(7);
  Bytes b = RandomBytes(4099, rng);
  const uint32_t good = FragmentChecksum(b.data(), b.size());
  for (size_t i = 0; i < b.size(); i += 37) {
    b[i] ^= 0x01;
    EXPECT_NE(FragmentChecksum(b.data(), b.size()), good) << i;
    b[i] ^= 0x01;
  }
  EXPECT_EQ(FragmentChecksum(b.data(), b.size()), good);
}

TEST(ReedSolomon, RejectsBadParameters) {
  EXPECT_EQ(ReedSolomon::Create(0, 1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ReedSolomon::Create(2, -1).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ReedSolomon::Create(200, 57).status().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(ReedSolomon::Create(200, 56).ok());
  ReedSolomon::Options opt;
  opt.chunk_bytes = 100;
  EXPECT_EQ(ReedSolomon::Create(2, 1, opt).status().code(), StatusCode::kInvalidArgument);
  opt.chunk_bytes = 0;
  EXPECT_EQ(ReedSolomon::Create(2, 1, opt).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StripeLayout::Create(0, 1, 10).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(StripeLayout::Create(3, -2, 10).status().code(), StatusCode::kInvalidArgument);
}

TEST(ReedSolomon, GeneratorIsIdentityOverCauchy) {
  for (auto [k, m] : kCodes) {
    ReedSolomon rs = MakeRs(k, m);
    const Bytes& a = rs.encode_matrix();
    ASSERT_EQ(a.size(), static_cast<size_t>((k + m) * k));
    for (int r = 0; r < k + m; ++r) {
      for (int j = 0; j < k; ++j) {
        const uint8_t want = r < k ? (r == j ? 1 : 0) : RefCoef(k, r - k, j);
        EXPECT_EQ(a[r * k + j], want) << "k=" << k << " m=" << m << " r=" << r << " j=" << j;
      }
    }
  }
}

TEST(ReedSolomon, EncodeMatchesBitwiseReference) {
  std::mt19937 rng(1);
  for (auto [k, m] : kCodes) {
    for (size_t len : {size_t{1}, size_t{31}, size_t{33}, size_t{1000}, size_t{4097}}) {
      std::vector<Bytes> data, parity(m, Bytes(len, 0xEE));
      for (int j = 0; j < k; ++j) data.push_back(RandomBytes(len, rng));
      ReedSolomon rs = MakeRs(k, m);
      ASSERT_TRUE(rs.Encode(ConstPtrs(data).data(), Ptrs(parity).data(), len).ok());
      for (int p = 0; p < m; ++p) {
        for (size_t i = 0; i < len; ++i) {
          uint8_t want = 0;
          for (int j = 0; j < k; ++j) want ^= RefMul(RefCoef(k, p, j), data[j][i]);
          ASSERT_EQ(parity[p][i], want)
              << "k=" << k << " m=" << m << " len=" << len << " p=" << p << " i=" << i;
        }
      }
    }
  }
}

// Every pattern of at most m missing fragments comes back bitwise; more than m is DataLoss.
TEST(ReedSolomon, ReconstructsEveryErasurePattern) {
  std::mt19937 rng(2);
  ThreadPool pool(3);
  const size_t len = 1237;  // odd, crosses 20 chunks of 64
  for (auto [k, m] : kCodes) {
    const int n = k + m;
    ReedSolomon rs = MakeRs(k, m);
    std::vector<Bytes> frags;
    for (int j = 0; j < k; ++j) frags.push_back(RandomBytes(len, rng));
    for (int p = 0; p < m; ++p) frags.emplace_back(len, 0);
    {
      auto ptrs = Ptrs(frags);
      ASSERT_TRUE(rs.Encode(ptrs.data(), ptrs.data() + k, len).ok());
    }
    for (unsigned mask = 0; mask < (1u << n); ++mask) {
      const int missing = std::popcount(mask);
      std::vector<Bytes> work = frags;
      std::vector<bool> present(n);
      for (int i = 0; i < n; ++i) {
        present[i] = !(mask & (1u << i));
        if (!present[i]) work[i] = RandomBytes(len, rng);  // garbage where the fragment was lost
      }
      auto ptrs = Ptrs(work);
      Status st = rs.Reconstruct(ptrs.data(), present, len, (mask & 1) ? &pool : nullptr);
      if (missing <= m) {
        ASSERT_TRUE(st.ok()) << st;
        for (int i = 0; i < n; ++i) {
          ASSERT_EQ(work[i], frags[i])
              << "k=" << k << " m=" << m << " mask=" << mask << " fragment " << i;
        }
      } else {
        EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st;
        EXPECT_NE(st.message().find(std::to_string(missing) + " of " + std::to_string(n)),
                  std::string::npos)
            << st;
      }
    }
  }
}

// The widest code the Cauchy generator allows: k + m = 256, random erasure patterns.
TEST(ReedSolomon, WidestCodeReconstructs) {
  std::mt19937 rng(10);
  const int k = 250, m = 6, n = k + m;
  const size_t len = 77;
  ReedSolomon rs = MakeRs(k, m);
  std::vector<Bytes> frags;
  for (int j = 0; j < k; ++j) frags.push_back(RandomBytes(len, rng));
  for (int p = 0; p < m; ++p) frags.emplace_back(len, 0);
  {
    auto ptrs = Ptrs(frags);
    ASSERT_TRUE(rs.Encode(ptrs.data(), ptrs.data() + k, len).ok());
  }
  for (int trial = 0; trial < 5; ++trial) {
    std::vector<Bytes> work = frags;
    std::vector<bool> present(n, true);
    for (int lost = 0; lost < m;) {
      const int i = static_cast<int>(rng() % n);
      if (!present[i]) continue;
      present[i] = false;
      work[i].assign(len, 0);
      ++lost;
    }
    ASSERT_TRUE(rs.Reconstruct(Ptrs(work).data(), present, len).ok());
    EXPECT_EQ(work, frags) << "trial " << trial;
  }
}

TEST(ReedSolomon, ReconstructRejectsWrongPresentSize) {
  ReedSolomon rs = MakeRs(3, 2);
  std::vector<Bytes> frags(5, Bytes(8, 0));
  auto ptrs = Ptrs(frags);
  EXPECT_EQ(rs.Reconstruct(ptrs.data(), std::vector<bool>(4, true), 8).code(),
            StatusCode::kInvalidArgument);
}

TEST(ReedSolomon, ThreadsAndChunkSizeDoNotChangeResults) {
  std::mt19937 rng(3);
  const int k = 4, m = 2;
  const size_t len = 300001;
  std::vector<Bytes> data;
  for (int j = 0; j < k; ++j) data.push_back(RandomBytes(len, rng));
  std::vector<Bytes> reference(m, Bytes(len, 0));
  ASSERT_TRUE(
      MakeRs(k, m, 1 << 20).Encode(ConstPtrs(data).data(), Ptrs(reference).data(), len).ok());
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    for (size_t chunk : {size_t{64}, size_t{4096}, size_t{256} << 10}) {
      ReedSolomon rs = MakeRs(k, m, chunk);
      std::vector<Bytes> parity(m, Bytes(len, 0));
      ASSERT_TRUE(rs.Encode(ConstPtrs(data).data(), Ptrs(parity).data(), len, &pool).ok());
      EXPECT_EQ(parity, reference) << threads << " threads, chunk " << chunk;

      // And a two-data-fragment loss rebuilt on the pool.
      std::vector<Bytes> frags = data;
      frags.insert(frags.end(), parity.begin(), parity.end());
      std::vector<Bytes> work = frags;
      work[0].assign(len, 0);
      work[2].assign(len, 0);
      std::vector<bool> present = {false, true, false, true, true, true};
      ASSERT_TRUE(rs.Reconstruct(Ptrs(work).data(), present, len, &pool).ok());
      EXPECT_EQ(work, frags) << threads << " threads, chunk " << chunk;
    }
  }
}

// A stored fragment with a flipped byte fails its checksum, is treated as missing and rebuilt.
TEST(ReedSolomon, CorruptFragmentIsDetectedAndRepaired) {
  std::mt19937 rng(4);
  const int k = 3, m = 2;
  const size_t len = 999;
  ReedSolomon rs = MakeRs(k, m);
  std::vector<Bytes> frags;
  for (int j = 0; j < k; ++j) frags.push_back(RandomBytes(len, rng));
  for (int p = 0; p < m; ++p) frags.emplace_back(len, 0);
  auto ptrs = Ptrs(frags);
  ASSERT_TRUE(rs.Encode(ptrs.data(), ptrs.data() + k, len).ok());
  std::vector<uint32_t> sums;
  for (const auto& f : frags) sums.push_back(FragmentChecksum(f.data(), f.size()));

  for (int victim = 0; victim < k + m; ++victim) {
    std::vector<Bytes> stored = frags;
    stored[victim][len / 2 + victim] ^= 0x40;
    std::vector<bool> present(k + m);
    int bad = 0;
    for (int i = 0; i < k + m; ++i) {
      present[i] = FragmentChecksum(stored[i].data(), len) == sums[i];
      bad += present[i] ? 0 : 1;
    }
    EXPECT_EQ(bad, 1);
    EXPECT_FALSE(present[victim]);
    ASSERT_TRUE(rs.Reconstruct(Ptrs(stored).data(), present, len).ok());
    EXPECT_EQ(stored, frags) << "victim " << victim;
  }
}

// ---------------------------------------------------------------------------------------------
// Group layout

const std::vector<size_t> kGroupBytes = {0, 1, 2, 3, 5, 7, 64, 997, 10007};

TEST(StripeLayout, EveryStripeSpansEveryNodeOnce) {
  for (auto [k, m] : kCodes) {
    for (size_t bytes : kGroupBytes) {
      auto layout_or = StripeLayout::Create(k, m, bytes);
      ASSERT_TRUE(layout_or.ok());
      const StripeLayout& layout = *layout_or;
      const int n = k + m;
      ASSERT_EQ(layout.nodes(), n);
      ASSERT_EQ(layout.stripes(), n);
      EXPECT_EQ(layout.piece_bytes(), (bytes + k - 1) / k);
      EXPECT_GE(layout.piece_bytes() * k, bytes);
      EXPECT_LT(layout.piece_bytes() * k, bytes + k);
      EXPECT_EQ(layout.parity_bytes(), m * layout.piece_bytes());

      // Data pieces cover [0, bytes) exactly.
      size_t covered = 0;
      for (int d = 0; d < k; ++d) {
        if (layout.DataLength(d) > 0) {
          EXPECT_EQ(layout.DataOffset(d), covered);
        }
        covered += layout.DataLength(d);
      }
      EXPECT_EQ(covered, bytes);

      std::set<std::pair<int, int>> data_used, parity_used;  // (node, piece or slot)
      for (int s = 0; s < n; ++s) {
        std::set<int> data_nodes, parity_nodes;
        for (int d = 0; d < k; ++d) {
          data_nodes.insert(layout.DataNode(s, d));
          EXPECT_TRUE(data_used.insert({layout.DataNode(s, d), d}).second);
        }
        for (int p = 0; p < m; ++p) {
          parity_nodes.insert(layout.ParityNode(s, p));
          EXPECT_TRUE(parity_used.insert({layout.ParityNode(s, p), p}).second);
          // Parity never on a node whose data is in the stripe.
          EXPECT_EQ(data_nodes.count(layout.ParityNode(s, p)), 0u);
        }
        EXPECT_EQ(data_nodes.size() + parity_nodes.size(), static_cast<size_t>(n));
      }
      // Every piece of every node is in exactly one stripe, every parity slot used once.
      EXPECT_EQ(data_used.size(), static_cast<size_t>(n * k));
      EXPECT_EQ(parity_used.size(), static_cast<size_t>(n * m));
    }
  }
}

struct Group {
  std::vector<Bytes> data, parity;
};

Group MakeGroup(const StripeLayout& layout, std::mt19937& rng) {
  Group g;
  for (int i = 0; i < layout.nodes(); ++i) {
    g.data.push_back(RandomBytes(layout.bytes(), rng));
    g.parity.emplace_back(layout.parity_bytes(), 0xCD);
  }
  return g;
}

// Parity of the whole group from the header's formula: stripe s takes piece d of node
// (s + m + d) mod n (zero-padded), parity row p goes to slot p of node (s + p) mod n.
std::vector<Bytes> RefGroupParity(int k, int m, size_t bytes, const std::vector<Bytes>& data) {
  const int n = k + m;
  const size_t piece = (bytes + k - 1) / k;
  std::vector<Bytes> parity(n, Bytes(m * piece, 0));
  for (int s = 0; s < n; ++s) {
    for (int p = 0; p < m; ++p) {
      for (size_t i = 0; i < piece; ++i) {
        uint8_t acc = 0;
        for (int d = 0; d < k; ++d) {
          const size_t at = d * piece + i;
          const uint8_t byte = at < bytes ? data[(s + m + d) % n][at] : 0;
          acc ^= RefMul(RefCoef(k, p, d), byte);
        }
        parity[(s + p) % n][p * piece + i] = acc;
      }
    }
  }
  return parity;
}

TEST(GroupCode, EncodeMatchesLayoutFormulaAndLeavesDataInPlace) {
  std::mt19937 rng(5);
  ThreadPool pool(2);
  for (auto [k, m] : kCodes) {
    for (size_t bytes : kGroupBytes) {
      StripeLayout layout = *StripeLayout::Create(k, m, bytes);
      ReedSolomon rs = MakeRs(k, m);
      Group g = MakeGroup(layout, rng);
      const std::vector<Bytes> original = g.data;
      ASSERT_TRUE(
          EncodeGroup(rs, layout, ConstPtrs(g.data).data(), Ptrs(g.parity).data(), &pool).ok());
      EXPECT_EQ(g.data, original);
      for (const auto& p : g.parity) EXPECT_EQ(p.size(), m * ((bytes + k - 1) / k));
      EXPECT_EQ(g.parity, RefGroupParity(k, m, bytes, g.data))
          << "k=" << k << " m=" << m << " bytes=" << bytes;
    }
  }
}

TEST(GroupCode, RebuildsEveryCombinationOfLostNodes) {
  std::mt19937 rng(6);
  ThreadPool pool(3);
  for (auto [k, m] : kCodes) {
    for (size_t bytes : kGroupBytes) {
      const int n = k + m;
      StripeLayout layout = *StripeLayout::Create(k, m, bytes);
      ReedSolomon rs = MakeRs(k, m);
      Group g = MakeGroup(layout, rng);
      ASSERT_TRUE(EncodeGroup(rs, layout, ConstPtrs(g.data).data(), Ptrs(g.parity).data()).ok());
      for (unsigned mask = 0; mask < (1u << n); ++mask) {
        const int lost = std::popcount(mask);
        Group w = g;
        std::vector<bool> present(n);
        for (int i = 0; i < n; ++i) {
          present[i] = !(mask & (1u << i));
          if (!present[i]) {  // the replacement node starts with garbage
            w.data[i] = RandomBytes(bytes, rng);
            w.parity[i] = RandomBytes(layout.parity_bytes(), rng);
          }
        }
        Status st = RebuildGroup(rs, layout, Ptrs(w.data).data(), Ptrs(w.parity).data(), present,
                                 (mask & 2) ? &pool : nullptr);
        if (lost <= m) {
          ASSERT_TRUE(st.ok()) << st;
          ASSERT_EQ(w.data, g.data)
              << "k=" << k << " m=" << m << " bytes=" << bytes << " lost mask " << mask;
          ASSERT_EQ(w.parity, g.parity)
              << "k=" << k << " m=" << m << " bytes=" << bytes << " lost mask " << mask;
        } else {
          EXPECT_EQ(st.code(), StatusCode::kDataLoss) << st;
        }
      }
    }
  }
}

TEST(GroupCode, RejectsMismatchedCode) {
  StripeLayout layout = *StripeLayout::Create(3, 2, 100);
  ReedSolomon rs = MakeRs(4, 1);
  std::vector<Bytes> data(5, Bytes(100)), parity(5, Bytes(layout.parity_bytes()));
  EXPECT_EQ(EncodeGroup(rs, layout, ConstPtrs(data).data(), Ptrs(parity).data()).code(),
            StatusCode::kInvalidArgument);
  ReedSolomon rs32 = MakeRs(3, 2);
  EXPECT_EQ(
      RebuildGroup(rs32, layout, Ptrs(data).data(), Ptrs(parity).data(), std::vector<bool>(4, true))
          .code(),
      StatusCode::kInvalidArgument);
}

// Node 2's stored snapshot picks up a flipped byte: its checksum no longer matches, the node is
// treated as lost, and the group rebuilds it. Same for a parity buffer.
TEST(GroupCode, CorruptNodeIsDetectedAndRepaired) {
  std::mt19937 rng(8);
  const int k = 4, m = 2, n = 6;
  const size_t bytes = 50021;
  StripeLayout layout = *StripeLayout::Create(k, m, bytes);
  ReedSolomon rs = MakeRs(k, m, 4096);
  Group g = MakeGroup(layout, rng);
  ASSERT_TRUE(EncodeGroup(rs, layout, ConstPtrs(g.data).data(), Ptrs(g.parity).data()).ok());
  std::vector<uint32_t> data_sums, parity_sums;
  for (int i = 0; i < n; ++i) {
    data_sums.push_back(FragmentChecksum(g.data[i].data(), bytes));
    parity_sums.push_back(FragmentChecksum(g.parity[i].data(), layout.parity_bytes()));
  }
  for (bool in_parity : {false, true}) {
    Group w = g;
    if (in_parity) {
      w.parity[4][123] ^= 0x80;
    } else {
      w.data[2][bytes - 1] ^= 0x01;
    }
    std::vector<bool> present(n);
    for (int i = 0; i < n; ++i) {
      present[i] = FragmentChecksum(w.data[i].data(), bytes) == data_sums[i] &&
                   FragmentChecksum(w.parity[i].data(), layout.parity_bytes()) == parity_sums[i];
    }
    EXPECT_EQ(std::count(present.begin(), present.end(), false), 1);
    EXPECT_FALSE(present[in_parity ? 4 : 2]);
    ASSERT_TRUE(RebuildGroup(rs, layout, Ptrs(w.data).data(), Ptrs(w.parity).data(), present).ok());
    EXPECT_EQ(w.data, g.data);
    EXPECT_EQ(w.parity, g.parity);
  }
}

TEST(GroupCode, ThreadsDoNotChangeResults) {
  std::mt19937 rng(9);
  const int k = 3, m = 2;
  const size_t bytes = 200003;
  StripeLayout layout = *StripeLayout::Create(k, m, bytes);
  Group g = MakeGroup(layout, rng);
  std::vector<Bytes> reference;
  for (int threads : {1, 2, 4}) {
    ThreadPool pool(threads);
    for (size_t chunk : {size_t{64}, size_t{256} << 10}) {
      ReedSolomon rs = MakeRs(k, m, chunk);
      Group w = g;
      ASSERT_TRUE(
          EncodeGroup(rs, layout, ConstPtrs(w.data).data(), Ptrs(w.parity).data(), &pool).ok());
      if (reference.empty()) reference = w.parity;
      EXPECT_EQ(w.parity, reference) << threads << " threads, chunk " << chunk;

      Group lost = w;
      lost.data[0].assign(bytes, 0);
      lost.parity[0].assign(layout.parity_bytes(), 0);
      lost.data[3].assign(bytes, 0);
      lost.parity[3].assign(layout.parity_bytes(), 0);
      std::vector<bool> present = {false, true, true, false, true};
      ASSERT_TRUE(
          RebuildGroup(rs, layout, Ptrs(lost.data).data(), Ptrs(lost.parity).data(), present, &pool)
              .ok());
      EXPECT_EQ(lost.data, w.data);
      EXPECT_EQ(lost.parity, w.parity);
    }
  }
}

}  // namespace
}  // namespace strata::checkpoint
