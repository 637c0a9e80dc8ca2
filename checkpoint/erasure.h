// Erasure coding for in-memory snapshots (issue 5): Reed-Solomon over GF(2^8) through ISA-L, the
// rotating stripe layout of an erasure-coding group of k + m nodes, and the CRC-32C checksum
// that tells a corrupted stored fragment from a good one.
//
// Everything here is a pure in-memory function over caller-owned pointers: the snapshot manager
// moves the fragments between nodes; this file only says which bytes go where and computes them.
//
// ---------------------------------------------------------------------------------------------
// Reed-Solomon (class ReedSolomon)
//
// A code with k data fragments and m parity fragments of equal length. The generator is ISA-L's
// Cauchy matrix (gf_gen_cauchy1_matrix): (k + m) x k, identity on top, parity row r, column j
// = 1 / (r xor j) in GF(2^8). Every k x k submatrix of it is invertible, so ANY k of the k + m
// fragments determine the others (maximum distance separable). Reconstruct inverts the k x k
// submatrix of the first k surviving rows (gf_invert_matrix) and recomputes every missing row,
// data and parity alike, in one ec_encode_data pass over the survivors. The Cauchy rows need
// distinct row/column indices below 256, hence k + m <= 256.
//
// Work is cut into chunks of Options::chunk_bytes; chunk c covers bytes [c * chunk, (c + 1) *
// chunk) of every fragment. Chunks are independent (coding is bytewise), so a ThreadPool runs
// them in parallel and the output is bit-identical for any thread count or chunk size.
//
// ---------------------------------------------------------------------------------------------
// Rotating stripe layout of a group (class StripeLayout)
//
// n = k + m nodes, numbered 0..n-1; each contributes `bytes` bytes (its snapshot) and keeps
// them where they are. Let
//
//   P = ceil(bytes / k)                        (the piece size)
//
// Node i's buffer is cut into k pieces: piece j is bytes [j * P, min((j + 1) * P, bytes)),
// conceptually zero-padded to P bytes (only the last non-empty piece and the empty ones after it
// are short; the padding never exists in memory). There are n stripes, s = 0..n-1. Stripe s is
// one Reed-Solomon codeword of k + m fragments of P bytes:
//
//   data fragment   d (0 <= d < k): piece d of node (s + m + d) mod n
//   parity fragment p (0 <= p < m): slot p of node (s + p) mod n's parity buffer
//
// So node i is a data node of exactly k stripes (s = i - m - j for its pieces j = 0..k-1) and a
// parity node of exactly m stripes (s = i - p, p = 0..m-1). The m parity nodes {s, .., s+m-1}
// and the k data nodes {s+m, .., s+m+k-1} of a stripe are disjoint and together are all n
// nodes: every stripe has exactly one fragment on every node, and parity never sits on a node
// whose data is in the same stripe.
//
// Storage per node: its own `bytes` of data, untouched, plus a parity buffer of m * P bytes
// (slot p at offset p * P holds parity row p of stripe (i - p) mod n), i.e. m/k of its data
// rounded up to whole bytes: m * ceil(bytes / k).
//
// Recovery: losing a set L of nodes loses exactly |L| fragments of every stripe (one per node).
// With |L| <= m every stripe still has >= k fragments and is rebuilt by Reconstruct; that gives
// back the lost nodes' data pieces and their parity slots. With |L| > m every stripe is short,
// so the group cannot be rebuilt (DataLoss; the snapshot must come from disk).
//
// Example, k = 2, m = 1, n = 3, bytes = 10, P = 5 (node i's pieces are iA = [0,5), iB = [5,10)):
//   stripe 0: data 1A 2B  parity on node 0 (slot 0)
//   stripe 1: data 2A 0B  parity on node 1 (slot 0)
//   stripe 2: data 0A 1B  parity on node 2 (slot 0)
// Each node holds 10 data bytes + 5 parity bytes; lose any one node and each stripe misses one
// fragment.
//
// ---------------------------------------------------------------------------------------------
// Fragment checksums (FragmentChecksum): CRC-32C (Castagnoli, the iSCSI polynomial) through
// ISA-L's crc32_iscsi, standard form (initial value and final xor 0xFFFFFFFF), so
// FragmentChecksum("123456789", 9) == 0xE3069283. A fragment whose stored checksum no longer
// matches is treated as missing and rebuilt from the others.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "base/status.h"
#include "base/thread_pool.h"

namespace strata::checkpoint {

// CRC-32C of `len` bytes (any length, including 0 and > 2 GiB).
uint32_t FragmentChecksum(const void* data, size_t len);
// The CRC-32C of the bytes whose CRC-32C is `crc` followed by `len` more bytes: checksums a
// buffer held in several pieces without gathering it. FragmentChecksumExtend(0, p, n) ==
// FragmentChecksum(p, n).
uint32_t FragmentChecksumExtend(uint32_t crc, const void* data, size_t len);

class StripeLayout;

class ReedSolomon {
 public:
  struct Options {
    // Bytes per fragment handed to one ec_encode_data call and the unit of work a ThreadPool
    // thread takes. Must be a positive multiple of 64 (and at most 1 GiB: ISA-L lengths are
    // int). Coding is memory-bound: throughput is flat from 16 KiB to 4 MiB chunks
    // (BM_EncodeChunk in bench/erasure_bench.cc); 256 KiB gives a 64 MiB snapshot 256 chunks,
    // plenty to balance a pool.
    size_t chunk_bytes = 256 << 10;
  };

  // k >= 1 data fragments, m >= 0 parity fragments, k + m <= kMaxFragments; InvalidArgument
  // otherwise (and for a bad chunk_bytes).
  static StatusOr<ReedSolomon> Create(int k, int m, const Options& options);
  static StatusOr<ReedSolomon> Create(int k, int m) { return Create(k, m, Options{}); }

  static constexpr int kMaxFragments = 256;

  int k() const { return k_; }
  int m() const { return m_; }
  const Options& options() const { return options_; }
  // The (k + m) x k generator, row-major; rows 0..k-1 are the identity.
  const std::vector<uint8_t>& encode_matrix() const { return matrix_; }

  // parity[p] = sum_j matrix[k + p][j] * data[j] over GF(2^8), bytewise, for `len` bytes of each
  // of the k data and m parity buffers. Buffers must not overlap. `pool` (optional) runs the
  // chunks in parallel; the result does not depend on it.
  Status Encode(const uint8_t* const* data, uint8_t* const* parity, size_t len,
                ThreadPool* pool = nullptr) const;

  // Parity row `row` (0 <= row < m) alone: out = sum_j matrix[k + row][j] * data[j], the same
  // bytes Encode writes to parity[row]. A node that stores one parity fragment of a stripe
  // computes just that one.
  Status EncodeRow(int row, const uint8_t* const* data, uint8_t* out, size_t len,
                   ThreadPool* pool = nullptr) const;

  // fragments: k + m pointers, data fragments first, then parity, each `len` bytes.
  // present[i] says whether fragments[i] holds valid bytes. Rewrites every fragment that is not
  // present (data and parity) from the present ones. Present fragments are only read.
  // DataLoss when more than m are missing; InvalidArgument when present.size() != k + m.
  Status Reconstruct(uint8_t* const* fragments, const std::vector<bool>& present, size_t len,
                     ThreadPool* pool = nullptr) const;

 private:
  // The group functions reuse the chunk workers and recovery plans across stripes.
  friend Status EncodeGroup(const ReedSolomon&, const StripeLayout&, const uint8_t* const*,
                            uint8_t* const*, ThreadPool*);
  friend Status RebuildGroup(const ReedSolomon&, const StripeLayout&, uint8_t* const*,
                             uint8_t* const*, const std::vector<bool>&, ThreadPool*);

  // What Reconstruct computes for one pattern of missing fragments: the rows to rebuild, the k
  // survivors they are computed from, and ISA-L's expanded tables for those rows.
  struct Recovery {
    std::vector<int> sources;  // k fragment indices, ascending
    std::vector<int> targets;  // missing fragment indices, ascending
    std::vector<uint8_t> tables;
  };

  ReedSolomon(int k, int m, const Options& options);

  StatusOr<Recovery> PlanRecovery(const std::vector<bool>& present) const;
  // Encodes bytes [offset, offset + len) of every fragment (offset-relative to each pointer).
  void EncodeRange(const uint8_t* const* data, uint8_t* const* parity, size_t offset,
                   size_t len) const;
  void RecoverRange(const Recovery& recovery, uint8_t* const* fragments, size_t offset,
                    size_t len) const;
  size_t NumChunks(size_t len) const;

  int k_ = 0;
  int m_ = 0;
  Options options_;
  std::vector<uint8_t> matrix_;         // (k + m) x k
  std::vector<uint8_t> encode_tables_;  // ec_init_tables of the m parity rows: 32 * k * m
};

class StripeLayout {
 public:
  // InvalidArgument unless k >= 1, m >= 0 and k + m <= ReedSolomon::kMaxFragments. bytes may be
  // anything, including 0 and values not divisible by k.
  static StatusOr<StripeLayout> Create(int k, int m, size_t bytes);

  int k() const { return k_; }
  int m() const { return m_; }
  int nodes() const { return k_ + m_; }    // n
  int stripes() const { return k_ + m_; }  // one per node: the rotation
  // Each node's data (its snapshot), kept in place.
  size_t bytes() const { return bytes_; }
  // P = ceil(bytes / k): the length of every fragment of every stripe.
  size_t piece_bytes() const { return piece_; }
  // What each node stores besides its own data: m * P.
  size_t parity_bytes() const { return static_cast<size_t>(m_) * piece_; }

  // Node holding data fragment d (0 <= d < k) of `stripe`: (stripe + m + d) mod n. The fragment
  // is that node's piece d: DataOffset(d), DataLength(d) valid bytes, zero padding after them.
  int DataNode(int stripe, int d) const { return (stripe + m_ + d) % nodes(); }
  size_t DataOffset(int d) const { return static_cast<size_t>(d) * piece_; }
  size_t DataLength(int d) const;
  // Node holding parity fragment p (0 <= p < m) of `stripe`: (stripe + p) mod n, in its parity
  // buffer at ParityOffset(p), P bytes.
  int ParityNode(int stripe, int p) const { return (stripe + p) % nodes(); }
  size_t ParityOffset(int p) const { return static_cast<size_t>(p) * piece_; }

  // Bytes [0, full_bytes()) of every fragment exist in memory for every stripe (all k pieces are
  // at least that long); only the tail [full_bytes(), P), shorter than k bytes, involves padding.
  size_t full_bytes() const { return DataLength(k_ - 1); }

 private:
  StripeLayout(int k, int m, size_t bytes);

  int k_ = 0;
  int m_ = 0;
  size_t bytes_ = 0;
  size_t piece_ = 0;
};

// Computes every node's parity buffer. data: n pointers to each node's `bytes` of data; parity:
// n pointers to each node's parity_bytes() buffer (written). rs must have the layout's k and m
// (InvalidArgument otherwise).
Status EncodeGroup(const ReedSolomon& rs, const StripeLayout& layout, const uint8_t* const* data,
                   uint8_t* const* parity, ThreadPool* pool = nullptr);

// Rebuilds the data and parity buffers of every node i with !present[i] from the survivors'
// data and parity. data/parity: n pointers each, as for EncodeGroup; the lost nodes' buffers are
// the destinations (any content), the survivors' are only read. DataLoss when more than m nodes
// are lost; InvalidArgument when present.size() != n or k, m differ.
Status RebuildGroup(const ReedSolomon& rs, const StripeLayout& layout, uint8_t* const* data,
                    uint8_t* const* parity, const std::vector<bool>& present,
                    ThreadPool* pool = nullptr);

}  // namespace strata::checkpoint
