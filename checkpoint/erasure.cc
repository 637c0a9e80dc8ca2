#include "checkpoint/erasure.h"

#include <fmt/format.h>
#include <isa-l/crc.h>
#include <isa-l/erasure_code.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <functional>
#include <utility>

namespace strata::checkpoint {
namespace {

// ISA-L takes lengths as int: chunks and checksum pieces stay below this.
constexpr size_t kMaxCallBytes = size_t{1} << 30;

// Pointer arrays for one ISA-L call live on the stack: k + m <= 256.
using PtrArray = std::array<unsigned char*, ReedSolomon::kMaxFragments>;

// Runs fn(item) for items [0, count), on the pool when there is more than one item.
void RunItems(size_t count, ThreadPool* pool, const std::function<void(size_t)>& fn) {
  if (count == 0) return;
  if (pool == nullptr || pool->size() == 1 || count == 1) {
    for (size_t i = 0; i < count; ++i) fn(i);
    return;
  }
  pool->ParallelFor(
      count,
      [&](size_t begin, size_t end) {
        for (size_t i = begin; i < end; ++i) fn(i);
      },
      1);
}

Status CheckCode(int k, int m) {
  if (k < 1 || m < 0 || k + m > ReedSolomon::kMaxFragments) {
    return Status::InvalidArgument(
        fmt::format("erasure code k={} m={}: need k >= 1, m >= 0 and k + m <= {}", k, m,
                    ReedSolomon::kMaxFragments));
  }
  return Status::OK();
}

}  // namespace

uint32_t FragmentChecksum(const void* data, size_t len) {
  return FragmentChecksumExtend(0, data, len);
}

uint32_t FragmentChecksumExtend(uint32_t crc_so_far, const void* data, size_t len) {
  // crc32_iscsi is the bare CRC register update: the standard CRC-32C pre- and post-inverts, and
  // chaining the register across pieces covers buffers longer than an int. The register after
  // the earlier bytes is the inverse of their standard CRC.
  auto* p = static_cast<unsigned char*>(const_cast<void*>(data));
  uint32_t crc = ~crc_so_far;
  while (len > 0) {
    const size_t n = std::min(len, kMaxCallBytes);
    crc = crc32_iscsi(p, static_cast<int>(n), crc);
    p += n;
    len -= n;
  }
  return crc ^ 0xFFFFFFFFu;
}

// ---------------------------------------------------------------------------------------------
// ReedSolomon

ReedSolomon::ReedSolomon(int k, int m, const Options& options) : k_(k), m_(m), options_(options) {}

StatusOr<ReedSolomon> ReedSolomon::Create(int k, int m, const Options& options) {
  STRATA_RETURN_IF_ERROR(CheckCode(k, m));
  if (options.chunk_bytes == 0 || options.chunk_bytes % 64 != 0 ||
      options.chunk_bytes > kMaxCallBytes) {
    return Status::InvalidArgument(
        fmt::format("erasure chunk_bytes={} must be a positive multiple of 64 up to {}",
                    options.chunk_bytes, kMaxCallBytes));
  }
  ReedSolomon rs(k, m, options);
  const int n = k + m;
  rs.matrix_.resize(static_cast<size_t>(n) * static_cast<size_t>(k));
  gf_gen_cauchy1_matrix(rs.matrix_.data(), n, k);
  if (m > 0) {
    rs.encode_tables_.resize(32 * static_cast<size_t>(k) * static_cast<size_t>(m));
    ec_init_tables(k, m, rs.matrix_.data() + static_cast<size_t>(k) * static_cast<size_t>(k),
                   rs.encode_tables_.data());
  }
  return rs;
}

size_t ReedSolomon::NumChunks(size_t len) const {
  return (len + options_.chunk_bytes - 1) / options_.chunk_bytes;
}

void ReedSolomon::EncodeRange(const uint8_t* const* data, uint8_t* const* parity, size_t offset,
                              size_t len) const {
  PtrArray src, dst;
  for (int j = 0; j < k_; ++j) src[j] = const_cast<uint8_t*>(data[j]) + offset;
  for (int p = 0; p < m_; ++p) dst[p] = parity[p] + offset;
  ec_encode_data(static_cast<int>(len), k_, m_, const_cast<uint8_t*>(encode_tables_.data()),
                 src.data(), dst.data());
}

void ReedSolomon::RecoverRange(const Recovery& recovery, uint8_t* const* fragments, size_t offset,
                               size_t len) const {
  PtrArray src, dst;
  for (int j = 0; j < k_; ++j) src[j] = fragments[recovery.sources[j]] + offset;
  const int rows = static_cast<int>(recovery.targets.size());
  for (int t = 0; t < rows; ++t) dst[t] = fragments[recovery.targets[t]] + offset;
  ec_encode_data(static_cast<int>(len), k_, rows, const_cast<uint8_t*>(recovery.tables.data()),
                 src.data(), dst.data());
}

Status ReedSolomon::EncodeRow(int row, const uint8_t* const* data, uint8_t* out, size_t len,
                              ThreadPool* pool) const {
  if (row < 0 || row >= m_) {
    return Status::InvalidArgument(fmt::format("ReedSolomon::EncodeRow: row {} of {}", row, m_));
  }
  if (len == 0) return Status::OK();
  if (data == nullptr || out == nullptr) {
    return Status::InvalidArgument("ReedSolomon::EncodeRow: null buffer");
  }
  for (int j = 0; j < k_; ++j) {
    if (data[j] == nullptr) return Status::InvalidArgument("ReedSolomon::EncodeRow: null data");
  }
  // ec_init_tables lays the tables out row by row (32 * k bytes per row), so row `row` alone is
  // a one-row code over the same data.
  uint8_t* tables = const_cast<uint8_t*>(encode_tables_.data()) + static_cast<size_t>(row) * 32 * k_;
  const size_t chunk = options_.chunk_bytes;
  RunItems(NumChunks(len), pool, [&](size_t c) {
    const size_t offset = c * chunk;
    PtrArray src;
    for (int j = 0; j < k_; ++j) src[j] = const_cast<uint8_t*>(data[j]) + offset;
    uint8_t* dst = out + offset;
    ec_encode_data(static_cast<int>(std::min(chunk, len - offset)), k_, 1, tables, src.data(),
                   &dst);
  });
  return Status::OK();
}

Status ReedSolomon::Encode(const uint8_t* const* data, uint8_t* const* parity, size_t len,
                           ThreadPool* pool) const {
  if (m_ == 0 || len == 0) return Status::OK();
  if (data == nullptr || parity == nullptr) {
    return Status::InvalidArgument("ReedSolomon::Encode: null fragment array");
  }
  for (int j = 0; j < k_; ++j) {
    if (data[j] == nullptr) return Status::InvalidArgument("ReedSolomon::Encode: null data");
  }
  for (int p = 0; p < m_; ++p) {
    if (parity[p] == nullptr) return Status::InvalidArgument("ReedSolomon::Encode: null parity");
  }
  const size_t chunk = options_.chunk_bytes;
  RunItems(NumChunks(len), pool, [&](size_t c) {
    const size_t offset = c * chunk;
    EncodeRange(data, parity, offset, std::min(chunk, len - offset));
  });
  return Status::OK();
}

StatusOr<ReedSolomon::Recovery> ReedSolomon::PlanRecovery(const std::vector<bool>& present) const {
  const int n = k_ + m_;
  if (present.size() != static_cast<size_t>(n)) {
    return Status::InvalidArgument(
        fmt::format("ReedSolomon::Reconstruct: present has {} entries, the code has k + m = {}",
                    present.size(), n));
  }
  Recovery rec;
  for (int i = 0; i < n; ++i) {
    if (!present[i]) {
      rec.targets.push_back(i);
    } else if (static_cast<int>(rec.sources.size()) < k_) {
      rec.sources.push_back(i);
    }
  }
  const int missing = static_cast<int>(rec.targets.size());
  if (missing > m_) {
    return Status::DataLoss(
        fmt::format("{} of {} erasure-coded fragments are missing; k={} m={} rebuilds at most {}",
                    missing, n, k_, m_, m_));
  }
  if (missing == 0) return rec;

  // Survivor rows of the generator, inverted: data = inv * survivors.
  const size_t k = static_cast<size_t>(k_);
  std::vector<uint8_t> sub(k * k), inv(k * k);
  for (size_t r = 0; r < k; ++r) {
    std::memcpy(&sub[r * k], &matrix_[static_cast<size_t>(rec.sources[r]) * k], k);
  }
  if (gf_invert_matrix(sub.data(), inv.data(), k_) != 0) {
    // Cannot happen for a Cauchy generator; a failure means the matrix was damaged.
    return Status::Internal("erasure decode: survivor submatrix is singular");
  }
  // A missing data row is its row of the inverse; a missing parity row is the generator row
  // applied to the recovered data, i.e. generator_row * inv.
  std::vector<uint8_t> rows(static_cast<size_t>(missing) * k);
  for (int t = 0; t < missing; ++t) {
    uint8_t* row = &rows[static_cast<size_t>(t) * k];
    const size_t target = static_cast<size_t>(rec.targets[t]);
    if (target < k) {
      std::memcpy(row, &inv[target * k], k);
      continue;
    }
    for (size_t j = 0; j < k; ++j) {
      uint8_t acc = 0;
      for (size_t x = 0; x < k; ++x) acc ^= gf_mul(matrix_[target * k + x], inv[x * k + j]);
      row[j] = acc;
    }
  }
  rec.tables.resize(32 * k * static_cast<size_t>(missing));
  ec_init_tables(k_, missing, rows.data(), rec.tables.data());
  return rec;
}

Status ReedSolomon::Reconstruct(uint8_t* const* fragments, const std::vector<bool>& present,
                                size_t len, ThreadPool* pool) const {
  STRATA_ASSIGN_OR_RETURN(Recovery rec, PlanRecovery(present));
  if (rec.targets.empty() || len == 0) return Status::OK();
  if (fragments == nullptr) {
    return Status::InvalidArgument("ReedSolomon::Reconstruct: null fragment array");
  }
  for (int i = 0; i < k_ + m_; ++i) {
    if (fragments[i] == nullptr) {
      return Status::InvalidArgument(
          fmt::format("ReedSolomon::Reconstruct: fragment {} is null", i));
    }
  }
  const size_t chunk = options_.chunk_bytes;
  RunItems(NumChunks(len), pool, [&](size_t c) {
    const size_t offset = c * chunk;
    RecoverRange(rec, fragments, offset, std::min(chunk, len - offset));
  });
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// StripeLayout

StripeLayout::StripeLayout(int k, int m, size_t bytes)
    : k_(k), m_(m), bytes_(bytes), piece_((bytes + static_cast<size_t>(k) - 1) / k) {}

StatusOr<StripeLayout> StripeLayout::Create(int k, int m, size_t bytes) {
  STRATA_RETURN_IF_ERROR(CheckCode(k, m));
  return StripeLayout(k, m, bytes);
}

size_t StripeLayout::DataLength(int d) const {
  const size_t begin = DataOffset(d);
  return begin >= bytes_ ? 0 : std::min(piece_, bytes_ - begin);
}

// ---------------------------------------------------------------------------------------------
// Group encode and rebuild

namespace {

Status CheckGroup(const ReedSolomon& rs, const StripeLayout& layout, const void* data,
                  const void* parity) {
  if (rs.k() != layout.k() || rs.m() != layout.m()) {
    return Status::InvalidArgument(
        fmt::format("erasure group: code k={} m={} does not match layout k={} m={}", rs.k(), rs.m(),
                    layout.k(), layout.m()));
  }
  if (data == nullptr || (parity == nullptr && layout.m() > 0)) {
    return Status::InvalidArgument("erasure group: null buffer array");
  }
  return Status::OK();
}

// One stripe's fragments within the tail [full, P) of every fragment, copied out into a
// zero-padded scratch area of (k + m) x tail bytes: the short pieces do not exist in memory
// past their end, so the tail is coded here instead of in place. The tail is under k bytes.
class StripeTail {
 public:
  StripeTail(const StripeLayout& layout, int stripe)
      : layout_(layout),
        stripe_(stripe),
        full_(layout.full_bytes()),
        tail_(layout.piece_bytes() - full_),
        scratch_(static_cast<size_t>(layout.nodes()) * tail_, 0) {}

  size_t size() const { return tail_; }
  uint8_t* fragment(int f) { return scratch_.data() + static_cast<size_t>(f) * tail_; }

  // Valid bytes of data fragment d that fall in the tail.
  size_t DataTail(int d) const {
    const size_t len = layout_.DataLength(d);
    return len > full_ ? len - full_ : 0;
  }

  void LoadData(const uint8_t* const* data, int d) {
    const size_t n = DataTail(d);
    if (n > 0) std::memcpy(fragment(d), data[layout_.DataNode(stripe_, d)] + Begin(d), n);
  }
  void LoadParity(const uint8_t* const* parity, int p) {
    std::memcpy(fragment(layout_.k() + p),
                parity[layout_.ParityNode(stripe_, p)] + layout_.ParityOffset(p) + full_, tail_);
  }
  void StoreData(uint8_t* const* data, int d) {
    const size_t n = DataTail(d);
    if (n > 0) std::memcpy(data[layout_.DataNode(stripe_, d)] + Begin(d), fragment(d), n);
  }
  void StoreParity(uint8_t* const* parity, int p) {
    std::memcpy(parity[layout_.ParityNode(stripe_, p)] + layout_.ParityOffset(p) + full_,
                fragment(layout_.k() + p), tail_);
  }

 private:
  size_t Begin(int d) const { return layout_.DataOffset(d) + full_; }

  const StripeLayout& layout_;
  int stripe_;
  size_t full_;
  size_t tail_;
  std::vector<uint8_t> scratch_;
};

}  // namespace

Status EncodeGroup(const ReedSolomon& rs, const StripeLayout& layout, const uint8_t* const* data,
                   uint8_t* const* parity, ThreadPool* pool) {
  STRATA_RETURN_IF_ERROR(CheckGroup(rs, layout, data, parity));
  const int k = layout.k(), m = layout.m(), n = layout.nodes();
  if (m == 0 || layout.piece_bytes() == 0) return Status::OK();

  // Body: bytes [0, full) of every stripe, in place, as one pool job over stripe x chunk.
  const size_t full = layout.full_bytes();
  const size_t chunk = rs.options().chunk_bytes;
  const size_t chunks = rs.NumChunks(full);
  RunItems(static_cast<size_t>(n) * chunks, pool, [&](size_t item) {
    const int s = static_cast<int>(item / chunks);
    const size_t offset = (item % chunks) * chunk;
    std::array<const uint8_t*, ReedSolomon::kMaxFragments> src;
    std::array<uint8_t*, ReedSolomon::kMaxFragments> dst;
    for (int d = 0; d < k; ++d) src[d] = data[layout.DataNode(s, d)] + layout.DataOffset(d);
    for (int p = 0; p < m; ++p) dst[p] = parity[layout.ParityNode(s, p)] + layout.ParityOffset(p);
    rs.EncodeRange(src.data(), dst.data(), offset, std::min(chunk, full - offset));
  });

  // Tails: under k bytes per stripe, zero-padded copies.
  if (full == layout.piece_bytes()) return Status::OK();
  for (int s = 0; s < n; ++s) {
    StripeTail tail(layout, s);
    std::array<const uint8_t*, ReedSolomon::kMaxFragments> src;
    std::array<uint8_t*, ReedSolomon::kMaxFragments> dst;
    for (int d = 0; d < k; ++d) {
      tail.LoadData(data, d);
      src[d] = tail.fragment(d);
    }
    for (int p = 0; p < m; ++p) dst[p] = tail.fragment(k + p);
    rs.EncodeRange(src.data(), dst.data(), 0, tail.size());
    for (int p = 0; p < m; ++p) tail.StoreParity(parity, p);
  }
  return Status::OK();
}

Status RebuildGroup(const ReedSolomon& rs, const StripeLayout& layout, uint8_t* const* data,
                    uint8_t* const* parity, const std::vector<bool>& present, ThreadPool* pool) {
  STRATA_RETURN_IF_ERROR(CheckGroup(rs, layout, data, parity));
  const int k = layout.k(), m = layout.m(), n = layout.nodes();
  if (present.size() != static_cast<size_t>(n)) {
    return Status::InvalidArgument(fmt::format(
        "RebuildGroup: present has {} entries, the group has {} nodes", present.size(), n));
  }
  const int lost = static_cast<int>(std::count(present.begin(), present.end(), false));
  if (lost > m) {
    return Status::DataLoss(fmt::format(
        "{} of {} nodes of an erasure-coding group (k={} m={}) are lost; at most {} can be "
        "rebuilt",
        lost, n, k, m, m));
  }
  if (lost == 0 || layout.piece_bytes() == 0) return Status::OK();

  // Every stripe has one fragment per node, at a different position in each stripe, so each
  // stripe gets its own recovery plan.
  std::vector<ReedSolomon::Recovery> plans;
  plans.reserve(static_cast<size_t>(n));
  for (int s = 0; s < n; ++s) {
    std::vector<bool> frag_present(static_cast<size_t>(n));
    for (int d = 0; d < k; ++d) frag_present[d] = present[layout.DataNode(s, d)];
    for (int p = 0; p < m; ++p) frag_present[k + p] = present[layout.ParityNode(s, p)];
    STRATA_ASSIGN_OR_RETURN(ReedSolomon::Recovery plan, rs.PlanRecovery(frag_present));
    plans.push_back(std::move(plan));
  }

  const size_t full = layout.full_bytes();
  const size_t chunk = rs.options().chunk_bytes;
  const size_t chunks = rs.NumChunks(full);
  RunItems(static_cast<size_t>(n) * chunks, pool, [&](size_t item) {
    const int s = static_cast<int>(item / chunks);
    const size_t offset = (item % chunks) * chunk;
    std::array<uint8_t*, ReedSolomon::kMaxFragments> frags;
    for (int d = 0; d < k; ++d) frags[d] = data[layout.DataNode(s, d)] + layout.DataOffset(d);
    for (int p = 0; p < m; ++p) {
      frags[k + p] = parity[layout.ParityNode(s, p)] + layout.ParityOffset(p);
    }
    rs.RecoverRange(plans[s], frags.data(), offset, std::min(chunk, full - offset));
  });

  if (full == layout.piece_bytes()) return Status::OK();
  for (int s = 0; s < n; ++s) {
    StripeTail tail(layout, s);
    std::array<uint8_t*, ReedSolomon::kMaxFragments> frags;
    for (int f = 0; f < n; ++f) frags[f] = tail.fragment(f);
    for (int d = 0; d < k; ++d) {
      if (present[layout.DataNode(s, d)]) tail.LoadData(data, d);
    }
    for (int p = 0; p < m; ++p) {
      if (present[layout.ParityNode(s, p)]) tail.LoadParity(parity, p);
    }
    rs.RecoverRange(plans[s], frags.data(), 0, tail.size());
    for (int t : plans[s].targets) {
      if (t < k) {
        tail.StoreData(data, t);
      } else {
        tail.StoreParity(parity, t - k);
      }
    }
  }
  return Status::OK();
}

}  // namespace strata::checkpoint
