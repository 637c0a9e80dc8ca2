#include "parallel/tp_engine.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/dtype.h"
#include "kernels/quant.h"

namespace strata::parallel {
namespace {

StatusOr<kernels::WeightType> WeightTypeOf(const std::string& s) {
  if (s == "f32") return kernels::WeightType::kF32;
  if (s == "bf16") return kernels::WeightType::kBF16;
  if (s == "q8_0") return kernels::WeightType::kQ8_0;
  return Status::InvalidArgument("shard weight dtype '" + s + "' is unknown");
}

// FNV-1a of a string, for comparing fingerprints across ranks with one integer allreduce.
int64_t Hash64(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return static_cast<int64_t>(h >> 1);
}

}  // namespace

StatusOr<std::unique_ptr<TpEngine>> TpEngine::Open(const std::string& shard_dir,
                                                   comm::Communicator& comm,
                                                   const EngineOptions& options) {
  auto e = std::unique_ptr<TpEngine>(new TpEngine(comm, options));
  Status st = e->Load(shard_dir);  // no collectives inside: a failing rank cannot desynchronize
  // Every rank must know that loading worked everywhere before the model's collectives start.
  comm::CollectiveOptions max;
  max.op = comm::ReduceOp::kMax;
  int32_t bad = st.ok() ? 0 : 1, any_bad = 0;
  STRATA_RETURN_IF_ERROR(comm.Allreduce(&bad, &any_bad, 1, DType::kI32, max));
  if (!st.ok()) return st;
  if (any_bad != 0) return Status::Aborted("another rank failed to open its shard (see its error)");
  // Same model on every rank: the largest fingerprint hash must be everyone's.
  int64_t mine = Hash64(e->shard_->manifest().model_fingerprint()), hi = 0;
  STRATA_RETURN_IF_ERROR(comm.Allreduce(&mine, &hi, 1, DType::kI64, max));
  int32_t differs = hi != mine ? 1 : 0, any_differs = 0;
  STRATA_RETURN_IF_ERROR(comm.Allreduce(&differs, &any_differs, 1, DType::kI32, max));
  if (any_differs != 0) {
    return Status::InvalidArgument(shard_dir + ": the ranks opened shards of different models "
                                   "(fingerprints differ); re-run strata shard");
  }
  // Every rank learns who computes which LM head rows; together they must tile the vocabulary
  // (rank files from two strata shard runs with other ratios would not).
  const int64_t rows[2] = {e->vocab_begin_, e->vocab_end_};
  std::vector<int64_t> all(2 * static_cast<size_t>(comm.size()));
  STRATA_RETURN_IF_ERROR(comm.Allgather(rows, all.data(), sizeof(rows)));
  int64_t at = 0;
  for (int r = 0; r < comm.size(); ++r) {
    const int64_t b = all[2 * static_cast<size_t>(r)], end = all[2 * static_cast<size_t>(r) + 1];
    e->head_rows_.emplace_back(b, end);
    if (end == b) continue;
    if (b != at) {
      return Status::InvalidArgument(fmt::format(
          "{}: rank {} computes LM head rows [{}, {}) but the ranks before it end at {}: the "
          "rank files come from different strata shard runs; re-run strata shard", shard_dir, r,
          b, end, at));
    }
    at = end;
  }
  if (at != e->config_.vocab_size) {
    return Status::InvalidArgument(fmt::format(
        "{}: the ranks' LM head rows end at {}, the vocabulary has {}; re-run strata shard",
        shard_dir, at, e->config_.vocab_size));
  }
  return e;
}

Status TpEngine::Load(const std::string& shard_dir) {
  const int rank = comm_.rank();
  STRATA_ASSIGN_OR_RETURN(shard_, runtime::ShardFile::Open(runtime::ShardPath(shard_dir, rank)));
  const proto::ShardManifest& m = shard_->manifest();
  if (m.ranks() != comm_.size() || m.rank() != rank) {
    return Status::InvalidArgument(fmt::format(
        "{} was written for rank {} of {}, but this is rank {} of {}: shard the model for {} "
        "ranks (strata shard --ranks {})", shard_->path(), m.rank(), m.ranks(), rank,
        comm_.size(), comm_.size(), comm_.size()));
  }
  STRATA_ASSIGN_OR_RETURN(config_, runtime::ParseLlamaConfig(m.config_json(), shard_->path()));
  STRATA_ASSIGN_OR_RETURN(wtype_, WeightTypeOf(m.weight_dtype()));
  heads_ = m.slice().head_end() - m.slice().head_begin();
  kv_heads_ = m.slice().kv_head_end() - m.slice().kv_head_begin();
  ffn_ = m.slice().ffn_end() - m.slice().ffn_begin();
  if (opts_.max_seq < 0 || opts_.max_seq > config_.max_position_embeddings) {
    return Status::InvalidArgument(fmt::format(
        "a context of {} tokens is outside what this model allows (1..{}, its "
        "max_position_embeddings)",
        opts_.max_seq, config_.max_position_embeddings));
  }
  max_seq_ = opts_.max_seq > 0 ? opts_.max_seq
                               : std::min<int64_t>(config_.max_position_embeddings, 2048);
  if (m.blocks_size() != 2 * config_.num_hidden_layers) {
    return Status::Corruption(fmt::format("{}: {} blocks for {} layers", shard_->path(),
                                          m.blocks_size(), config_.num_hidden_layers));
  }
  const int64_t hidden = config_.hidden_size;
  input_norm_.assign(static_cast<size_t>(config_.num_hidden_layers), {});
  post_norm_.assign(static_cast<size_t>(config_.num_hidden_layers), {});
  for (const proto::TensorEntry& t : m.resident()) {
    STRATA_ASSIGN_OR_RETURN(std::vector<uint8_t> bytes, shard_->ReadTensor(t));
    auto as_f32 = [&] {
      std::vector<float> v(bytes.size() / 4);
      std::memcpy(v.data(), bytes.data(), v.size() * 4);
      return v;
    };
    const std::string& n = t.name();
    if (n == "model.embed_tokens.weight") {
      embed_ = std::move(bytes);
    } else if (n == "lm_head.weight") {
      lm_head_ = std::move(bytes);
    } else if (n == "model.norm.weight") {
      final_norm_ = as_f32();
    } else {
      int layer = -1;
      char kind[64] = {};
      if (std::sscanf(n.c_str(), "model.layers.%d.%63s", &layer, kind) != 2 || layer < 0 ||
          layer >= config_.num_hidden_layers) {
        return Status::Corruption(shard_->path() + ": unexpected resident tensor " + n);
      }
      (std::string(kind) == "input_layernorm.weight" ? input_norm_ : post_norm_)[layer] = as_f32();
    }
  }
  if (rank == 0 && embed_.empty()) {
    return Status::Corruption(shard_->path() + ": rank 0's shard lacks the embeddings");
  }
  // The LM head rows this rank computes: its slice's range, or (shards written before the head
  // was split) all of them on rank 0 and none elsewhere.
  if (m.slice().vocab_end() > 0) {
    vocab_begin_ = m.slice().vocab_begin();
    vocab_end_ = m.slice().vocab_end();
  } else if (rank == 0) {
    vocab_begin_ = 0;
    vocab_end_ = config_.vocab_size;
  }
  if (vocab_begin_ < 0 || vocab_end_ < vocab_begin_ || vocab_end_ > config_.vocab_size) {
    return Status::Corruption(fmt::format("{}: LM head rows [{}, {}) outside the vocabulary of {}",
                                          shard_->path(), vocab_begin_, vocab_end_,
                                          config_.vocab_size));
  }
  if (vocab_end_ > vocab_begin_) {
    const size_t want = kernels::WeightBytes(wtype_, vocab_end_ - vocab_begin_, hidden);
    if (lm_head_.size() != want || final_norm_.size() != static_cast<size_t>(hidden)) {
      return Status::Corruption(fmt::format(
          "{}: LM head rows [{}, {}) need a {}-byte lm_head.weight and the final norm; the shard "
          "has {} bytes and a final norm of {} floats", shard_->path(), vocab_begin_, vocab_end_,
          want, lm_head_.size(), final_norm_.size()));
    }
  }
  std::vector<memory::BlockExtent> extents;
  for (const proto::BlockEntry& b : m.blocks()) extents.push_back({b.offset(), b.bytes()});
  memory::WindowOptions wo;
  wo.window = opts_.window;
  wo.mode = opts_.window == 0 ? memory::WindowMode::kResident : opts_.window_mode;
  wo.direct_io = opts_.direct_io;
  STRATA_ASSIGN_OR_RETURN(window_, memory::WeightWindow::Open(shard_->path(), extents, wo));
  k_cache_.clear();
  v_cache_.clear();
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    k_cache_.emplace_back(static_cast<size_t>(max_seq_ * kv_heads_ * config_.head_dim) * 4);
    v_cache_.emplace_back(static_cast<size_t>(max_seq_ * kv_heads_ * config_.head_dim) * 4);
  }
  pool_ = opts_.pool != nullptr ? opts_.pool : &ThreadPool::Default();
  return Status::OK();
}

uint64_t TpEngine::resident_bytes() const {
  uint64_t b = window_->resident_bytes() + embed_.size() + lm_head_.size();
  for (const auto& c : k_cache_) b += c.size();
  for (const auto& c : v_cache_) b += c.size();
  return b;
}

uint64_t TpEngine::memory_budget_bytes() const {
  uint64_t b = window_->budget_bytes() + embed_.size() + lm_head_.size();
  b += final_norm_.size() * sizeof(float);
  for (const auto& n : input_norm_) b += n.size() * sizeof(float);
  for (const auto& n : post_norm_) b += n.size() * sizeof(float);
  for (const auto& c : k_cache_) b += c.size();
  for (const auto& c : v_cache_) b += c.size();
  return b;
}

uint64_t TpEngine::decode_weight_bytes() const {
  uint64_t b = lm_head_.size();
  for (const proto::BlockEntry& e : shard_->manifest().blocks()) {
    for (const proto::TensorEntry& t : e.tensors()) b += t.bytes();
  }
  return b;
}

StatusOr<TpEngine::BlockTensors> TpEngine::AcquireBlock(int index) {
  STRATA_ASSIGN_OR_RETURN(const uint8_t* base, window_->Acquire(index));
  const proto::BlockEntry& b = shard_->manifest().blocks(index);
  BlockTensors t;
  for (int i = 0; i < b.tensors_size() && i < 4; ++i) {
    t.w[i] = base + (b.tensors(i).offset() - b.offset());
  }
  return t;
}

Status TpEngine::AllreduceInto(float* residual, float* partial, int64_t count) {
  comm::CollectiveOptions o;
  o.algorithm = opts_.allreduce;
  const int64_t t0 = NowNs();
  STRATA_RETURN_IF_ERROR(comm_.Allreduce(partial, partial, static_cast<size_t>(count),
                                         DType::kF32, o));
  allreduce_ns_ += NowNs() - t0;
  for (int64_t i = 0; i < count; ++i) residual[i] += partial[i];
  return Status::OK();
}

Status TpEngine::Embed(const int32_t* tokens, int64_t n, float* x) {
  const int64_t hidden = config_.hidden_size;
  if (comm_.rank() == 0) {
    const size_t row_bytes = kernels::WeightBytes(wtype_, 1, hidden);
    for (int64_t t = 0; t < n; ++t) {
      if (tokens[t] < 0 || tokens[t] >= config_.vocab_size) {
        return Status::InvalidArgument(fmt::format("token id {} outside the vocabulary of {}",
                                                   tokens[t], config_.vocab_size));
      }
      const uint8_t* row = embed_.data() + static_cast<size_t>(tokens[t]) * row_bytes;
      float* dst = x + t * hidden;
      switch (wtype_) {
        case kernels::WeightType::kF32: std::memcpy(dst, row, hidden * 4); break;
        case kernels::WeightType::kBF16:
          ConvertBuffer(row, DType::kBF16, dst, DType::kF32, static_cast<size_t>(hidden));
          break;
        case kernels::WeightType::kQ8_0: kernels::DequantizeRowsQ8_0(row, dst, 1, hidden); break;
      }
    }
  }
  // Only rank 0 holds the embeddings: it sends the rows (n x hidden floats).
  comm::CollectiveOptions o;
  o.algorithm = comm::Algorithm::kStar;
  return comm_.Broadcast(x, static_cast<size_t>(n * hidden) * 4, 0, o);
}

Status TpEngine::Forward(const int32_t* tokens, int64_t n, int64_t pos, bool all_logits,
                         std::vector<float>* logits) {
  const runtime::LlamaConfig& c = config_;
  const int64_t hidden = c.hidden_size, hd = c.head_dim;
  if (n <= 0) return Status::InvalidArgument("forward of no tokens");
  if (pos < 0 || pos + n > max_seq_) {
    return Status::OutOfRange(fmt::format("positions [{}, {}) exceed the KV cache of {} tokens",
                                          pos, pos + n, max_seq_));
  }
  // Activations live in members that only grow: a decode step allocates nothing.
  Scratch& sc = scratch_;
  auto fit = [](std::vector<float>& v, int64_t size) {
    if (v.size() < static_cast<size_t>(size)) v.resize(static_cast<size_t>(size));
  };
  fit(sc.x, n * hidden);
  fit(sc.h, n * hidden);
  fit(sc.part, n * hidden);
  fit(sc.q, n * heads_ * hd);
  fit(sc.att, n * heads_ * hd);
  fit(sc.k, n * kv_heads_ * hd);
  fit(sc.v, n * kv_heads_ * hd);
  fit(sc.gate, n * ffn_);
  fit(sc.up, n * ffn_);
  if (sc.positions.size() < static_cast<size_t>(n)) sc.positions.resize(static_cast<size_t>(n));
  std::vector<float>&x = sc.x, &h = sc.h, &part = sc.part, &q = sc.q, &att = sc.att, &k = sc.k,
                     &v = sc.v, &gate = sc.gate, &up = sc.up;
  std::vector<int32_t>& positions = sc.positions;
  for (int64_t t = 0; t < n; ++t) positions[t] = static_cast<int32_t>(pos + t);
  STRATA_RETURN_IF_ERROR(Embed(tokens, n, x.data()));

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const int attn_index = static_cast<int>(2 * l);
    STRATA_ASSIGN_OR_RETURN(BlockTensors w, AcquireBlock(attn_index));
    kernels::RmsNorm(h.data(), x.data(), input_norm_[l].data(), n, hidden, c.rms_norm_eps);
    const int64_t qd = heads_ * hd, kvd = kv_heads_ * hd;
    float *qp = q.data(), *kp = k.data(), *vp = v.data();
    if (n == 1 && w.w[1] == w.w[0] + kernels::WeightBytes(wtype_, qd, hidden) &&
        w.w[2] == w.w[1] + kernels::WeightBytes(wtype_, kvd, hidden)) {
      // Decode with q, k and v stored back to back (strata shard writes them in that order, 64-byte
      // aligned, so they are whenever their sizes are multiples of 64 bytes): one matrix-
      // vector product over all their rows, one parallel step instead of three. Each output
      // row is the same dot product either way.
      fit(sc.qkv, qd + 2 * kvd);
      kernels::Linear(sc.qkv.data(), h.data(), w.w[0], wtype_, 1, qd + 2 * kvd, hidden, pool_);
      qp = sc.qkv.data();
      kp = qp + qd;
      vp = kp + kvd;
    } else {
      kernels::Linear(qp, h.data(), w.w[0], wtype_, n, qd, hidden, pool_);
      kernels::Linear(kp, h.data(), w.w[1], wtype_, n, kvd, hidden, pool_);
      kernels::Linear(vp, h.data(), w.w[2], wtype_, n, kvd, hidden, pool_);
    }
    kernels::Rope(qp, n, heads_, hd, positions.data(), c.rope_theta);
    kernels::Rope(kp, n, kv_heads_, hd, positions.data(), c.rope_theta);
    float* kc = k_cache_[l].as<float>();
    float* vc = v_cache_[l].as<float>();
    const size_t row = static_cast<size_t>(kvd);
    for (int64_t t = 0; t < n; ++t) {
      std::memcpy(kc + (pos + t) * row, kp + t * row, row * 4);
      std::memcpy(vc + (pos + t) * row, vp + t * row, row * 4);
    }
    kernels::Attention(att.data(), qp, kc, vc, n, heads_, kv_heads_, hd, positions.data(),
                       c.sliding_window, pool_);
    kernels::Linear(part.data(), att.data(), w.w[3], wtype_, n, hidden, heads_ * hd, pool_);
    window_->Release(attn_index);
    STRATA_RETURN_IF_ERROR(AllreduceInto(x.data(), part.data(), n * hidden));

    const int ffn_index = attn_index + 1;
    STRATA_ASSIGN_OR_RETURN(w, AcquireBlock(ffn_index));
    kernels::RmsNorm(h.data(), x.data(), post_norm_[l].data(), n, hidden, c.rms_norm_eps);
    float *gp = gate.data(), *upp = up.data();
    if (n == 1 && w.w[1] == w.w[0] + kernels::WeightBytes(wtype_, ffn_, hidden)) {
      // Decode with gate and up back to back: one product over both (as q, k, v above).
      fit(sc.gate_up, 2 * ffn_);
      kernels::Linear(sc.gate_up.data(), h.data(), w.w[0], wtype_, 1, 2 * ffn_, hidden, pool_);
      gp = sc.gate_up.data();
      upp = gp + ffn_;
    } else {
      kernels::Linear(gp, h.data(), w.w[0], wtype_, n, ffn_, hidden, pool_);
      kernels::Linear(upp, h.data(), w.w[1], wtype_, n, ffn_, hidden, pool_);
    }
    // Split over the pool when it is large (prefill: n * ffn_ sigmoids); decode stays inline.
    pool_->ParallelFor(static_cast<size_t>(n * ffn_), [&](size_t b, size_t e) {
      kernels::SwiGLU(gp + b, gp + b, upp + b, static_cast<int64_t>(e - b));
    }, 16384);
    kernels::Linear(part.data(), gp, w.w[2], wtype_, n, hidden, ffn_, pool_);
    window_->Release(ffn_index);
    STRATA_RETURN_IF_ERROR(AllreduceInto(x.data(), part.data(), n * hidden));
  }
  const int64_t first = all_logits ? 0 : n - 1;
  return Head(x.data() + first * hidden, n - first, logits);
}

Status TpEngine::Head(const float* x, int64_t rows, std::vector<float>* logits) {
  const int64_t hidden = config_.hidden_size, vocab = config_.vocab_size;
  const int64_t mine = vocab_end_ - vocab_begin_;
  const int rank = comm_.rank();
  if (mine == 0 && rank != 0) return Status::OK();
  constexpr int kLogitsTag = 1;
  if (mine > 0) {
    std::vector<float>& h = scratch_.h;
    if (h.size() < static_cast<size_t>(rows * hidden)) h.resize(static_cast<size_t>(rows * hidden));
    kernels::RmsNorm(h.data(), x, final_norm_.data(), rows, hidden, config_.rms_norm_eps);
    head_part_.resize(static_cast<size_t>(rows * mine));
    kernels::Linear(head_part_.data(), h.data(), lm_head_.data(), wtype_, rows, mine, hidden,
                    pool_);
  }
  if (rank != 0) return comm_.Send(0, head_part_.data(), head_part_.size() * sizeof(float), kLogitsTag);
  // Rank 0: its own columns, then every other rank's, in place (rows x columns of each).
  logits->resize(static_cast<size_t>(rows * vocab));
  auto place = [&](const float* part, int64_t begin, int64_t cols) {
    for (int64_t t = 0; t < rows; ++t) {
      std::memcpy(logits->data() + t * vocab + begin, part + t * cols,
                  static_cast<size_t>(cols) * sizeof(float));
    }
  };
  if (mine > 0) place(head_part_.data(), vocab_begin_, mine);
  for (int r = 1; r < comm_.size(); ++r) {
    const auto [b, end] = head_rows_[static_cast<size_t>(r)];
    if (end == b) continue;
    head_recv_.resize(static_cast<size_t>(rows * (end - b)));
    STRATA_RETURN_IF_ERROR(
        comm_.Recv(r, head_recv_.data(), head_recv_.size() * sizeof(float), kLogitsTag));
    place(head_recv_.data(), b, end - b);
  }
  return Status::OK();
}

}  // namespace strata::parallel
