#include "runtime/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/check.h"
#include "base/clock.h"
#include "kernels/ops.h"
#include "kernels/train.h"
#include "runtime/file_util.h"
#include "runtime/hf_model.h"
#include "runtime/safetensors.h"

namespace strata::runtime {
namespace fs = std::filesystem;
namespace {

// Per-layer tensors in the order LayerOffsets::e holds them.
constexpr const char* kLayerTensors[9] = {
    "input_layernorm.weight",        "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",       "self_attn.o_proj.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",          "mlp.up_proj.weight",      "mlp.down_proj.weight"};

bool IsNorm(const std::string& name) { return name.find("norm") != std::string::npos; }

float* F(AlignedBuffer& b) { return b.as<float>(); }

AlignedBuffer Floats(int64_t n) { return AlignedBuffer(static_cast<size_t>(n) * sizeof(float)); }

// Row- and element-wise ops over the pool: each element is computed exactly as on one thread
// (no sums across the split), so the split changes nothing in the result.
void ForRows(ThreadPool* pool, int64_t rows, const std::function<void(int64_t, int64_t)>& fn) {
  if (pool == nullptr || pool->size() == 1 || rows < 64) {
    fn(0, rows);
    return;
  }
  pool->ParallelFor(static_cast<size_t>(rows), [&](size_t b, size_t e) {
    fn(static_cast<int64_t>(b), static_cast<int64_t>(e));
  }, 16);
}

void AddInPlace(float* y, const float* x, int64_t rows, int64_t dim, ThreadPool* pool) {
  ForRows(pool, rows, [&](int64_t b, int64_t e) {
    for (int64_t i = b * dim; i < e * dim; ++i) y[i] += x[i];
  });
}

void RmsNormRows(float* out, const float* x, const float* w, int64_t rows, int64_t dim, float eps,
                 ThreadPool* pool) {
  ForRows(pool, rows, [&](int64_t b, int64_t e) {
    kernels::RmsNorm(out + b * dim, x + b * dim, w, e - b, dim, eps);
  });
}

void SwiGLURows(float* out, const float* g, const float* u, int64_t rows, int64_t dim,
                ThreadPool* pool) {
  ForRows(pool, rows, [&](int64_t b, int64_t e) {
    kernels::SwiGLU(out + b * dim, g + b * dim, u + b * dim, (e - b) * dim);
  });
}

void SwiGLUBackwardRows(float* dg, float* du, const float* dout, const float* g, const float* u,
                        int64_t rows, int64_t dim, ThreadPool* pool) {
  ForRows(pool, rows, [&](int64_t b, int64_t e) {
    kernels::SwiGLUBackward(dg + b * dim, du + b * dim, dout + b * dim, g + b * dim, u + b * dim,
                            (e - b) * dim);
  });
}

void RopeRows(float* x, int64_t n, int64_t heads, int64_t hd, const int32_t* pos, float theta,
              bool backward, ThreadPool* pool) {
  ForRows(pool, n, [&](int64_t b, int64_t e) {
    if (backward) {
      kernels::RopeBackward(x + b * heads * hd, e - b, heads, hd, pos + b, theta);
    } else {
      kernels::Rope(x + b * heads * hd, e - b, heads, hd, pos + b, theta);
    }
  });
}

}  // namespace

StatusOr<memory::ParamLayout> LlamaParamLayout(const LlamaConfig& config, int ranks) {
  memory::ParamLayout layout;
  for (const ExpectedTensor& t : LlamaTensorLayout(config)) {
    STRATA_RETURN_IF_ERROR(layout.Add(t.name, t.shape, /*decay=*/!IsNorm(t.name)));
  }
  layout.Finalize(ranks);
  return layout;
}

void InitLlamaParams(memory::ParamStore& store, uint64_t seed, float stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, stddev);
  for (const memory::ParamEntry& e : store.layout().entries()) {
    float* w = store.weight(e);
    if (IsNorm(e.name)) {
      std::fill(w, w + e.numel, 1.0f);
    } else {
      for (size_t i = 0; i < e.numel; ++i) w[i] = normal(rng);
    }
  }
}

Status LoadLlamaParams(memory::ParamStore& store, const HfModel& model) {
  for (const memory::ParamEntry& e : store.layout().entries()) {
    STRATA_RETURN_IF_ERROR(model.ReadF32(e.name, store.weight(e), e.numel));
  }
  return Status::OK();
}

std::string LlamaConfigJson(const LlamaConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {"LlamaForCausalLM"};
  j["model_type"] = "llama";
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_hidden_layers;
  j["num_attention_heads"] = c.num_attention_heads;
  j["num_key_value_heads"] = c.num_key_value_heads;
  if (c.head_dim != c.hidden_size / c.num_attention_heads) j["head_dim"] = c.head_dim;
  j["vocab_size"] = c.vocab_size;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["hidden_act"] = "silu";
  j["torch_dtype"] = "float32";
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_id >= 0) j["eos_token_id"] = c.eos_token_id;
  return j.dump(2) + "\n";
}

Status SaveHfFolder(const memory::ParamStore& store, const LlamaConfig& config,
                    const std::string& dir, const std::string& tokenizer_path) {
  fs::path target = fs::absolute(dir).lexically_normal();
  if (target.filename().empty()) target = target.parent_path();
  std::error_code ec;
  fs::create_directories(target.parent_path(), ec);
  if (ec) return Status::IOError(fmt::format("creating {}: {}", target.parent_path().string(),
                                             ec.message()));
  const fs::path tmp = target.parent_path() / (target.filename().string() + ".tmp-save");
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  if (ec) return Status::IOError(fmt::format("creating {}: {}", tmp.string(), ec.message()));

  STRATA_RETURN_IF_ERROR(WriteFileAtomic((tmp / "config.json").string(), LlamaConfigJson(config)));
  std::vector<std::pair<TensorInfo, const void*>> tensors;
  for (const memory::ParamEntry& e : store.layout().entries()) {
    TensorInfo info;
    info.name = e.name;
    info.dtype = DType::kF32;
    info.shape = e.shape;
    info.bytes = e.numel * sizeof(float);
    tensors.emplace_back(std::move(info), store.weights() + e.offset);
  }
  STRATA_RETURN_IF_ERROR(WriteSafetensors((tmp / "model.safetensors").string(), tensors,
                                          {{"format", "pt"}, {"producer", "strata train"}}));
  if (!tokenizer_path.empty()) {
    std::ifstream in(tokenizer_path, std::ios::binary);
    if (!in) return Status::NotFound("tokenizer " + tokenizer_path);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    STRATA_RETURN_IF_ERROR(WriteFileAtomic((tmp / "tokenizer.model").string(), bytes));
  }
  STRATA_RETURN_IF_ERROR(FsyncPath(tmp.string()));
  // Replace an older save only once the new one is complete.
  const fs::path old = target.parent_path() / (target.filename().string() + ".tmp-old");
  fs::remove_all(old, ec);
  if (fs::exists(target)) {
    fs::rename(target, old, ec);
    if (ec) return Status::IOError(fmt::format("moving {} aside: {}", target.string(), ec.message()));
  }
  fs::rename(tmp, target, ec);
  if (ec) return Status::IOError(fmt::format("renaming {} to {}: {}", tmp.string(),
                                             target.string(), ec.message()));
  fs::remove_all(old, ec);
  return FsyncPath(target.parent_path().string());
}

// ---- executor ------------------------------------------------------------------------------

StatusOr<std::unique_ptr<TrainExecutor>> TrainExecutor::Create(const LlamaConfig& config,
                                                               memory::ParamStore* store,
                                                               const ExecutorOptions& options) {
  if (options.batch < 1 || options.seq < 1) {
    return Status::InvalidArgument(
        fmt::format("batch {} and seq {} must be positive", options.batch, options.seq));
  }
  if (options.seq > config.max_position_embeddings) {
    return Status::InvalidArgument(fmt::format(
        "sequence length {} is longer than the model allows (max_position_embeddings {})",
        options.seq, config.max_position_embeddings));
  }
  if (options.anchor_every < 1) return Status::InvalidArgument("anchor_every must be >= 1");
  if (options.ce_chunk_tokens < 1) return Status::InvalidArgument("ce_chunk_tokens must be >= 1");
  std::unique_ptr<TrainExecutor> x(new TrainExecutor());
  x->config_ = config;
  x->store_ = store;
  x->opts_ = options;
  const memory::ParamLayout& layout = store->layout();
  auto find = [&](const std::string& name) -> StatusOr<const memory::ParamEntry*> {
    const memory::ParamEntry* e = layout.Find(name);
    if (e == nullptr) return Status::NotFound("parameter store has no " + name);
    return e;
  };
  STRATA_ASSIGN_OR_RETURN(x->embed_, find("model.embed_tokens.weight"));
  STRATA_ASSIGN_OR_RETURN(x->final_norm_, find("model.norm.weight"));
  if (config.tie_word_embeddings) {
    x->lm_head_ = x->embed_;
  } else {
    STRATA_ASSIGN_OR_RETURN(x->lm_head_, find("lm_head.weight"));
  }
  const int L = static_cast<int>(config.num_hidden_layers);
  x->layers_.resize(L);
  for (int l = 0; l < L; ++l) {
    for (int t = 0; t < 9; ++t) {
      STRATA_ASSIGN_OR_RETURN(x->layers_[l].e[t],
                              find(fmt::format("model.layers.{}.{}", l, kLayerTensors[t])));
    }
  }

  const int64_t n = options.batch * options.seq;
  const int64_t d = config.hidden_size, qd = config.q_dim(), kvd = config.kv_dim();
  const int64_t I = config.intermediate_size;
  x->n_ = n;
  x->ids_.resize(n);
  x->targets_.resize(n);
  x->positions_.resize(n);
  for (int64_t i = 0; i < n; ++i) x->positions_[i] = static_cast<int32_t>(i % options.seq);
  const int K = options.anchor_every;
  const int n_anchors = (L + K - 1) / K;
  for (int a = 0; a < n_anchors; ++a) x->anchors_.push_back(Floats(n * d));
  for (int j = 1; j < std::min(K, L); ++j) x->segment_.push_back(Floats(n * d));
  x->ping_ = Floats(n * d);
  x->pong_ = Floats(n * d);
  x->h_final_ = Floats(n * d);
  x->a_ = Floats(n * d);
  x->q_ = Floats(n * qd);
  x->k_ = Floats(n * kvd);
  x->v_ = Floats(n * kvd);
  x->o_ = Floats(n * qd);
  x->lse_ = Floats(options.batch * config.num_attention_heads * options.seq);
  x->h2_ = Floats(n * d);
  x->bn_ = Floats(n * d);
  x->g_ = Floats(n * I);
  x->u_ = Floats(n * I);
  x->s_ = Floats(n * I);
  x->dh_ = Floats(n * d);
  x->ds_ = Floats(n * I);
  x->dx_ = Floats(n * d);
  x->do_ = Floats(n * qd);
  x->dq_ = Floats(n * qd);
  x->dk_ = Floats(n * kvd);
  x->dv_ = Floats(n * kvd);
  x->xf_ = Floats(n * d);

  x->zero_copy_ = options.stage != StageMode::kCopy;
  if (!x->zero_copy_) {
    size_t layer_floats = 0;
    for (int t = 0; t < 9; ++t) layer_floats += (x->layers_[0].e[t]->numel + 15) / 16 * 16;
    for (auto& s : x->slot_) s = Floats(static_cast<int64_t>(layer_floats));
    x->stager_ = std::thread([p = x.get()] { p->StagerLoop(); });
  }
  return x;
}

TrainExecutor::~TrainExecutor() {
  if (stager_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    stager_.join();
  }
}

ExecutorMemory TrainExecutor::Estimate(const LlamaConfig& c, const ExecutorOptions& o) {
  const size_t n = static_cast<size_t>(o.batch * o.seq), d = c.hidden_size, qd = c.q_dim();
  const size_t kvd = c.kv_dim(), I = c.intermediate_size, L = c.num_hidden_layers;
  const size_t K = static_cast<size_t>(std::max(1, o.anchor_every)), f = sizeof(float);
  ExecutorMemory m;
  m.anchors = ((L + K - 1) / K + 1) * n * d * f;
  m.workspace = ((std::min(K, L) - 1) * n * d + 8 * n * d + 4 * n * qd + 4 * n * kvd +
                 4 * n * I + static_cast<size_t>(o.batch * c.num_attention_heads * o.seq)) * f;
  if (o.stage == StageMode::kCopy) {
    const size_t layer = 2 * d + d * qd + 2 * d * kvd + qd * d + 3 * d * I + 9 * 16;
    m.staging = 2 * layer * f;
  }
  m.loss_scratch = static_cast<size_t>(o.ce_chunk_tokens) * c.vocab_size * f;
  return m;
}

ExecutorMemory TrainExecutor::memory() const {
  ExecutorMemory m;
  for (const auto& b : anchors_) m.anchors += b.size();
  m.anchors += h_final_.size();
  for (const auto& b : segment_) m.workspace += b.size();
  for (const AlignedBuffer* b : {&ping_, &pong_, &a_, &q_, &k_, &v_, &o_, &lse_, &h2_, &bn_, &g_,
                                 &u_, &s_, &dh_, &ds_, &dx_, &do_, &dq_, &dk_, &dv_, &xf_}) {
    m.workspace += b->size();
  }
  m.staging = slot_[0].size() + slot_[1].size();
  m.loss_scratch = static_cast<size_t>(opts_.ce_chunk_tokens) * config_.vocab_size * sizeof(float);
  return m;
}

TrainExecutor::LayerWeights TrainExecutor::StoreWeights(int layer) const {
  const float* base = store_->weights();
  const auto& e = layers_[layer].e;
  return {base + e[0]->offset, base + e[1]->offset, base + e[2]->offset,
          base + e[3]->offset, base + e[4]->offset, base + e[5]->offset,
          base + e[6]->offset, base + e[7]->offset, base + e[8]->offset};
}

TrainExecutor::LayerGrads TrainExecutor::StoreGrads(int layer) {
  float* base = store_->grads();
  const auto& e = layers_[layer].e;
  return {base + e[0]->offset, base + e[1]->offset, base + e[2]->offset,
          base + e[3]->offset, base + e[4]->offset, base + e[5]->offset,
          base + e[6]->offset, base + e[7]->offset, base + e[8]->offset};
}

// ---- staging -------------------------------------------------------------------------------

void TrainExecutor::StageStart(std::vector<int> schedule) {
  std::lock_guard<std::mutex> lock(mu_);
  schedule_ = std::move(schedule);
  filled_ = 0;
  released_ = 0;
  cv_.notify_all();
}

void TrainExecutor::StagerLoop() {
  for (;;) {
    size_t i;
    int layer;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Entry i goes to slot i % 2, free once entry i - 2 is released.
      cv_.wait(lock, [&] {
        return stop_ || (filled_ < schedule_.size() && filled_ < released_ + 2);
      });
      if (stop_) return;
      i = filled_;
      layer = schedule_[i];
    }
    float* dst = F(slot_[i % 2]);
    const auto& e = layers_[layer].e;
    for (int t = 0; t < 9; ++t) {
      std::memcpy(dst, store_->weights() + e[t]->offset, e[t]->numel * sizeof(float));
      dst += (e[t]->numel + 15) / 16 * 16;
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      filled_ = i + 1;
    }
    cv_.notify_all();
  }
}

TrainExecutor::LayerWeights TrainExecutor::StageAcquire(size_t i) {
  if (zero_copy_) return StoreWeights(schedule_[i]);
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (filled_ <= i) {
      const uint64_t t0 = NowNs();
      cv_.wait(lock, [&] { return filled_ > i; });
      stage_wait_ns_ += NowNs() - t0;
    }
  }
  const float* p = F(slot_[i % 2]);
  const auto& e = layers_[schedule_[i]].e;
  LayerWeights w;
  const float** out[9] = {&w.attn_norm, &w.wq, &w.wk, &w.wv, &w.wo,
                          &w.ffn_norm,  &w.wg, &w.wu, &w.wd};
  for (int t = 0; t < 9; ++t) {
    *out[t] = p;
    p += (e[t]->numel + 15) / 16 * 16;
  }
  return w;
}

void TrainExecutor::StageRelease(size_t i) {
  if (zero_copy_) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    released_ = std::max(released_, i + 1);
  }
  cv_.notify_all();
}

void TrainExecutor::StageFinish() {
  if (zero_copy_) {
    schedule_.clear();
    return;
  }
  std::unique_lock<std::mutex> lock(mu_);
  // Every entry was acquired and released, so the stager is idle; drop the schedule.
  schedule_.clear();
  filled_ = released_ = 0;
}

// ---- the model -----------------------------------------------------------------------------

void TrainExecutor::LayerForward(const LayerWeights& w, const float* h_in, float* h_out) {
  const LlamaConfig& c = config_;
  const int64_t n = n_, d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t I = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const int64_t D = c.head_dim;
  ThreadPool* pool = opts_.pool;
  RmsNormRows(F(a_), h_in, w.attn_norm, n, d, c.rms_norm_eps, pool);
  kernels::MatmulForward(F(q_), F(a_), w.wq, n, qd, d, pool);
  kernels::MatmulForward(F(k_), F(a_), w.wk, n, kvd, d, pool);
  kernels::MatmulForward(F(v_), F(a_), w.wv, n, kvd, d, pool);
  RopeRows(F(q_), n, H, D, positions_.data(), c.rope_theta, false, pool);
  RopeRows(F(k_), n, KV, D, positions_.data(), c.rope_theta, false, pool);
  kernels::AttentionTrainForward(F(o_), F(lse_), F(q_), F(k_), F(v_), opts_.batch, opts_.seq, H,
                                 KV, D, pool);
  kernels::MatmulForward(F(h2_), F(o_), w.wo, n, d, qd, pool);
  AddInPlace(F(h2_), h_in, n, d, pool);
  RmsNormRows(F(bn_), F(h2_), w.ffn_norm, n, d, c.rms_norm_eps, pool);
  kernels::MatmulForward(F(g_), F(bn_), w.wg, n, I, d, pool);
  kernels::MatmulForward(F(u_), F(bn_), w.wu, n, I, d, pool);
  SwiGLURows(F(s_), F(g_), F(u_), n, I, pool);
  // The backward needs the down projection's input, not its output: a recompute skips it.
  if (h_out == nullptr) return;
  kernels::MatmulForward(h_out, F(s_), w.wd, n, d, I, pool);
  AddInPlace(h_out, F(h2_), n, d, pool);
}

void TrainExecutor::LayerBackward(const LayerWeights& w, const LayerGrads& g, const float* h_in) {
  const LlamaConfig& c = config_;
  const int64_t n = n_, d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t I = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const int64_t D = c.head_dim;
  ThreadPool* pool = opts_.pool;
  float* dh = F(dh_);  // d(output) on entry; becomes d(h2), then d(input)
  // FFN: out = h2 + down(silu(gate(bn)) * up(bn)), bn = rmsnorm(h2).
  kernels::MatmulBackward(F(ds_), g.wd, dh, F(s_), w.wd, n, d, I, pool);
  SwiGLUBackwardRows(F(g_), F(u_), F(ds_), F(g_), F(u_), n, I, pool);  // dgate, dup in place
  kernels::MatmulBackward(F(dx_), g.wg, F(g_), F(bn_), w.wg, n, I, d, pool);
  kernels::MatmulBackward(F(dx_), g.wu, F(u_), F(bn_), w.wu, n, I, d, pool, /*accumulate_dx=*/true);
  kernels::RmsNormBackward(dh, g.ffn_norm, F(dx_), F(h2_), w.ffn_norm, n, d, c.rms_norm_eps,
                           /*accumulate_dx=*/true);
  // Attention: h2 = h + o_proj(attn(rope(q(a)), rope(k(a)), v(a))), a = rmsnorm(h).
  kernels::MatmulBackward(F(do_), g.wo, dh, F(o_), w.wo, n, d, qd, pool);
  kernels::AttentionTrainBackward(F(dq_), F(dk_), F(dv_), F(do_), F(q_), F(k_), F(v_), F(o_),
                                  F(lse_), opts_.batch, opts_.seq, H, KV, D, pool);
  RopeRows(F(dq_), n, H, D, positions_.data(), c.rope_theta, true, pool);
  RopeRows(F(dk_), n, KV, D, positions_.data(), c.rope_theta, true, pool);
  kernels::MatmulBackward(F(dx_), g.wq, F(dq_), F(a_), w.wq, n, qd, d, pool);
  kernels::MatmulBackward(F(dx_), g.wk, F(dk_), F(a_), w.wk, n, kvd, d, pool, true);
  kernels::MatmulBackward(F(dx_), g.wv, F(dv_), F(a_), w.wv, n, kvd, d, pool, true);
  kernels::RmsNormBackward(dh, g.attn_norm, F(dx_), h_in, w.attn_norm, n, d, c.rms_norm_eps,
                           /*accumulate_dx=*/true);
}

Status TrainExecutor::CheckTokens(const int32_t* tokens) {
  const int64_t T = opts_.seq;
  for (int64_t b = 0; b < opts_.batch; ++b) {
    const int32_t* row = tokens + b * (T + 1);
    for (int64_t t = 0; t <= T; ++t) {
      if (row[t] >= config_.vocab_size || (t < T && row[t] < 0)) {
        return Status::InvalidArgument(fmt::format(
            "token id {} at sequence {} position {} is outside the vocabulary [0, {})", row[t],
            b, t, config_.vocab_size));
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      ids_[b * T + t] = row[t];
      targets_[b * T + t] = row[t + 1];
    }
  }
  return Status::OK();
}

StatusOr<double> TrainExecutor::ForwardBackward(const int32_t* tokens, float grad_scale) {
  return Run(tokens, grad_scale, /*backward=*/true);
}

StatusOr<double> TrainExecutor::Loss(const int32_t* tokens) {
  return Run(tokens, 0.0f, /*backward=*/false);
}

StatusOr<double> TrainExecutor::Run(const int32_t* tokens, float grad_scale, bool backward) {
  STRATA_RETURN_IF_ERROR(CheckTokens(tokens));
  const LlamaConfig& c = config_;
  const int L = static_cast<int>(c.num_hidden_layers);
  const int K = opts_.anchor_every;
  const int64_t n = n_, d = c.hidden_size, V = c.vocab_size;
  ThreadPool* pool = opts_.pool;

  // The walk order: forward 0..L-1, then per segment (last first) its recompute and its reverse.
  std::vector<int> schedule;
  for (int l = 0; l < L; ++l) schedule.push_back(l);
  if (backward) {
    for (int s = (L - 1) / K * K; s >= 0; s -= K) {
      const int e = std::min(s + K, L);
      for (int l = s; l < e - 1; ++l) schedule.push_back(l);
      for (int l = e - 1; l >= s; --l) schedule.push_back(l);
    }
  }
  StageStart(schedule);
  size_t step = 0;

  // Forward: embedding, layers (keeping anchors), final norm.
  kernels::EmbeddingForward(F(anchors_[0]), store_->weight(*embed_), ids_.data(), n, d);
  const float* h = F(anchors_[0]);
  for (int l = 0; l < L; ++l) {
    float* out;
    if (l == L - 1) {
      out = F(h_final_);
    } else if ((l + 1) % K == 0) {
      out = F(anchors_[(l + 1) / K]);
    } else {
      out = (h == F(ping_)) ? F(pong_) : F(ping_);
    }
    LayerWeights w = StageAcquire(step);
    LayerForward(w, h, out);
    StageRelease(step++);
    h = out;
  }
  kernels::RmsNorm(F(xf_), F(h_final_), store_->weight(*final_norm_), n, d, c.rms_norm_eps);
  float* dxf = F(dx_);
  const double loss = kernels::CrossEntropyLmHead(
      backward ? dxf : nullptr, backward ? store_->grad(*lm_head_) : nullptr, F(xf_),
      store_->weight(*lm_head_), targets_.data(), n, d, V, opts_.ce_chunk_tokens, grad_scale,
      pool);
  if (!backward) {
    StageFinish();
    return loss;
  }
  kernels::RmsNormBackward(F(dh_), store_->grad(*final_norm_), dxf, F(h_final_),
                           store_->weight(*final_norm_), n, d, c.rms_norm_eps);

  // Backward, segment by segment.
  for (int s = (L - 1) / K * K; s >= 0; s -= K) {
    const int e = std::min(s + K, L);
    // Layer inputs inside the segment: h_s is the anchor, h_{s+j} recomputed into segment_[j-1].
    auto input = [&](int l) -> float* {
      return l == s ? F(anchors_[s / K]) : F(segment_[l - s - 1]);
    };
    for (int l = s; l < e - 1; ++l) {
      LayerWeights w = StageAcquire(step);
      LayerForward(w, input(l), input(l + 1));
      StageRelease(step++);
    }
    for (int l = e - 1; l >= s; --l) {
      LayerWeights w = StageAcquire(step);
      // The layer's internals: recomputed from its input (its output is not needed),
      // except for the last layer when no recompute ran since the forward pass left its internals
      // in the workspace.
      if (!(l == L - 1 && s == L - 1)) LayerForward(w, input(l), nullptr);
      LayerBackward(w, StoreGrads(l), input(l));
      StageRelease(step++);
    }
  }
  kernels::EmbeddingBackward(store_->grad(*embed_), F(dh_), ids_.data(), n, d);
  StageFinish();
  return loss;
}

}  // namespace strata::runtime
