#include "runtime/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <utility>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "base/check.h"
#include "base/clock.h"
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

float* F(const DeviceBuffer& b) { return b.as<float>(); }

size_t FloatBytes(int64_t n) { return static_cast<size_t>(n) * sizeof(float); }
size_t HalfBytes(int64_t n) { return static_cast<size_t>(n) * sizeof(uint16_t); }

}  // namespace

StatusOr<Precision> ParsePrecision(std::string_view name) {
  if (name == "f32") return Precision::kF32;
  if (name == "bf16") return Precision::kBF16;
  return Status::InvalidArgument(fmt::format("precision must be f32 or bf16, not '{}'", name));
}

const char* PrecisionName(Precision p) { return p == Precision::kBF16 ? "bf16" : "f32"; }

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
  if (config.sliding_window > 0 && options.seq > config.sliding_window) {
    // The training attention is causal over the whole sequence; a banded mask is not written.
    return Status::Unimplemented(fmt::format(
        "sequence length {} is longer than this model's sliding_window {}: training attends over "
        "the whole sequence, so use a sequence length of at most {}",
        options.seq, config.sliding_window, config.sliding_window));
  }
  if (options.anchor_every < 1) return Status::InvalidArgument("anchor_every must be >= 1");
  if (options.ce_chunk_tokens < 1) return Status::InvalidArgument("ce_chunk_tokens must be >= 1");
  const bool bf16 = options.precision == Precision::kBF16;
  if (bf16 && options.stage == StageMode::kZeroCopy) {
    return Status::InvalidArgument(
        "bf16 precision stages bf16 working copies of the weights, so it cannot be zero-copy "
        "(use stage auto or copy)");
  }
  std::unique_ptr<TrainExecutor> x(new TrainExecutor());
  if (options.device == nullptr) {
    x->own_device_ = MakeCpuDevice(options.pool);
    x->dev_ = x->own_device_.get();
  } else {
    x->dev_ = options.device;
  }
  Device* dev = x->dev_;
  x->host_ = dev->host_memory();
  if (!x->host_ && options.stage == StageMode::kZeroCopy) {
    return Status::InvalidArgument(fmt::format(
        "device {} has its own memory, so staging cannot be zero-copy (use stage auto or copy)",
        dev->name()));
  }
  // Never a silent fallback to f32: a device that cannot multiply bf16 is an error.
  if (bf16) STRATA_RETURN_IF_ERROR(dev->Bf16Support());
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
  const int64_t I = config.intermediate_size, V = config.vocab_size;
  x->n_ = n;
  x->ids_.resize(n);
  x->targets_.resize(n);
  x->positions_.resize(n);
  for (int64_t i = 0; i < n; ++i) x->positions_[i] = static_cast<int32_t>(i % options.seq);
  auto make = [&](DeviceBuffer& b, size_t bytes) -> Status {
    STRATA_ASSIGN_OR_RETURN(b, DeviceBuffer::Make(dev, bytes));
    return Status::OK();
  };
  const int K = options.anchor_every;
  const int n_anchors = (L + K - 1) / K;
  x->anchors_.resize(n_anchors);
  for (auto& a : x->anchors_) STRATA_RETURN_IF_ERROR(make(a, FloatBytes(n * d)));
  x->segment_.resize(std::max(0, std::min(K, L) - 1));
  for (auto& s : x->segment_) STRATA_RETURN_IF_ERROR(make(s, FloatBytes(n * d)));
  for (DeviceBuffer* b : {&x->ping_, &x->pong_, &x->h_final_, &x->a_, &x->h2_, &x->bn_, &x->dh_,
                          &x->dx_, &x->xf_}) {
    STRATA_RETURN_IF_ERROR(make(*b, FloatBytes(n * d)));
  }
  for (DeviceBuffer* b : {&x->q_, &x->o_, &x->do_, &x->dq_}) {
    STRATA_RETURN_IF_ERROR(make(*b, FloatBytes(n * qd)));
  }
  for (DeviceBuffer* b : {&x->k_, &x->v_, &x->dk_, &x->dv_}) {
    STRATA_RETURN_IF_ERROR(make(*b, FloatBytes(n * kvd)));
  }
  for (DeviceBuffer* b : {&x->g_, &x->u_, &x->s_, &x->ds_}) {
    STRATA_RETURN_IF_ERROR(make(*b, FloatBytes(n * I)));
  }
  STRATA_RETURN_IF_ERROR(
      make(x->lse_, FloatBytes(options.batch * config.num_attention_heads * options.seq)));
  x->bf16_ = bf16;
  if (bf16) {
    STRATA_RETURN_IF_ERROR(make(x->a16_, HalfBytes(n * d)));
    STRATA_RETURN_IF_ERROR(make(x->o16_, HalfBytes(n * qd)));
    STRATA_RETURN_IF_ERROR(make(x->bn16_, HalfBytes(n * d)));
    STRATA_RETURN_IF_ERROR(make(x->s16_, HalfBytes(n * I)));
    STRATA_RETURN_IF_ERROR(make(x->xf16_, HalfBytes(n * d)));
    STRATA_RETURN_IF_ERROR(make(x->dy16_, HalfBytes(n * std::max({I, d, qd}))));
  }
  // The head's working copy: bf16 always needs one; a discrete device needs one in f32 too.
  if (bf16) {
    STRATA_RETURN_IF_ERROR(make(x->head_, HalfBytes(V * d)));
  } else if (!x->host_) {
    STRATA_RETURN_IF_ERROR(make(x->head_, FloatBytes(V * d)));
  }

  // bf16 working copies are real copies even though the CPU could read the store in place.
  x->zero_copy_ = x->host_ && options.stage != StageMode::kCopy && !bf16;
  size_t slot_bytes = 0;
  if (!x->zero_copy_) {
    slot_bytes = SlotLayout(config, options.precision, x->slot_off_);
    for (auto& s : x->slot_) STRATA_RETURN_IF_ERROR(make(s, slot_bytes));
  }
  if (!x->host_) {
    STRATA_RETURN_IF_ERROR(make(x->d_targets_, n * sizeof(int32_t)));
    STRATA_RETURN_IF_ERROR(make(x->d_positions_, n * sizeof(int32_t)));
    dev->CopyIn(x->d_positions_.data(), x->positions_.data(), n * sizeof(int32_t));
    STRATA_RETURN_IF_ERROR(make(x->fnorm_, FloatBytes(d)));
    STRATA_RETURN_IF_ERROR(make(x->dfnorm_, FloatBytes(d)));
    STRATA_RETURN_IF_ERROR(make(x->dhead_, FloatBytes(V * d)));
    const size_t grad_bytes = SlotLayout(config, Precision::kF32, x->grad_off_);
    for (auto& g : x->grad_slot_) STRATA_RETURN_IF_ERROR(make(g, grad_bytes));
    auto host = [&](HostMem& h, size_t bytes) -> Status {
      h.dev = dev;
      STRATA_ASSIGN_OR_RETURN(h.p, dev->AllocateHost(bytes));
      h.size = bytes;
      return Status::OK();
    };
    if (bf16) {
      STRATA_RETURN_IF_ERROR(host(x->host_stage_, slot_bytes));
    }
    STRATA_RETURN_IF_ERROR(host(x->host_ret_, std::max(FloatBytes(V * d), FloatBytes(n * d))));
    STRATA_RETURN_IF_ERROR(host(x->host_grad_, grad_bytes));
    x->drainer_ = std::thread([p = x.get()] { p->DrainerLoop(); });
  }
  if (!x->zero_copy_) x->stager_ = std::thread([p = x.get()] { p->StagerLoop(); });
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
  if (drainer_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(drain_mu_);
      drain_stop_ = true;
    }
    drain_cv_.notify_all();
    drainer_.join();
  }
  // Nothing may still be reading or writing the buffers released after this.
  if (dev_ != nullptr) (void)dev_->Check();
}

size_t TrainExecutor::SlotLayout(const LlamaConfig& c, Precision p, size_t offsets[9]) {
  const size_t d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), I = c.intermediate_size;
  // kLayerTensors order; norm gains stay f32, matrices take the working precision.
  const size_t numel[9] = {d, qd * d, kvd * d, kvd * d, d * qd, d, I * d, I * d, d * I};
  const size_t matrix_bytes = p == Precision::kBF16 ? sizeof(uint16_t) : sizeof(float);
  size_t off = 0;
  for (int t = 0; t < 9; ++t) {
    offsets[t] = off;
    const bool norm = t == 0 || t == 5;
    off += (numel[t] * (norm ? sizeof(float) : matrix_bytes) + 63) / 64 * 64;
  }
  return off;
}

ExecutorMemory TrainExecutor::Estimate(const LlamaConfig& c, const ExecutorOptions& o) {
  const size_t n = static_cast<size_t>(o.batch * o.seq), d = c.hidden_size, qd = c.q_dim();
  const size_t kvd = c.kv_dim(), I = c.intermediate_size, L = c.num_hidden_layers;
  const size_t V = c.vocab_size;
  const size_t K = static_cast<size_t>(std::max(1, o.anchor_every)), f = sizeof(float);
  const bool bf16 = o.precision == Precision::kBF16;
  const size_t h = sizeof(uint16_t);
  ExecutorMemory m;
  m.anchors = ((L + K - 1) / K + 1) * n * d * f;
  m.workspace = ((std::min(K, L) - 1) * n * d + 8 * n * d + 4 * n * qd + 4 * n * kvd +
                 4 * n * I + static_cast<size_t>(o.batch * c.num_attention_heads * o.seq)) * f;
  if (bf16) m.workspace += (3 * n * d + n * qd + n * I + n * std::max({I, d, qd})) * h;
  if (o.stage == StageMode::kCopy || bf16) {
    size_t offsets[9];
    m.staging = 2 * SlotLayout(c, o.precision, offsets);
  }
  if (bf16) m.staging += V * d * h;
  m.loss_scratch = static_cast<size_t>(o.ce_chunk_tokens) * V * (f + (bf16 ? h : 0));
  if (o.device != nullptr && !o.device->host_memory()) {
    // A discrete device always stages by copy, keeps an f32 head too, and holds the copies of
    // targets and positions, the final norm and its gradient, the head's gradient and two
    // layers' gradient slots; the host keeps page-locked staging (Create has the same sums).
    size_t offsets[9];
    const size_t slot = SlotLayout(c, o.precision, offsets);
    const size_t grad_slot = SlotLayout(c, Precision::kF32, offsets);
    m.staging = 2 * slot + V * d * (bf16 ? h : f);
    m.workspace += 2 * n * sizeof(int32_t) + 2 * d * f + V * d * f + 2 * grad_slot;
    m.host_staging = (bf16 ? slot : 0) + std::max(V * d * f, n * d * f) + grad_slot;
  }
  return m;
}

ExecutorMemory TrainExecutor::memory() const {
  ExecutorMemory m;
  for (const auto& b : anchors_) m.anchors += b.size();
  m.anchors += h_final_.size();
  for (const auto& b : segment_) m.workspace += b.size();
  for (const DeviceBuffer* b : {&ping_, &pong_, &a_, &q_, &k_, &v_, &o_, &lse_, &h2_, &bn_, &g_,
                                &u_, &s_, &dh_, &ds_, &dx_, &do_, &dq_, &dk_, &dv_, &xf_, &a16_,
                                &o16_, &bn16_, &s16_, &xf16_, &dy16_, &d_targets_,
                                &d_positions_, &fnorm_, &dfnorm_, &dhead_, &grad_slot_[0],
                                &grad_slot_[1]}) {
    m.workspace += b->size();
  }
  m.staging = slot_[0].size() + slot_[1].size() + head_.size();
  // The loss chunk lives in the device's scratch (kernels/train.h's per-thread scratch on the
  // CPU): f32 logits, bf16 dlogits.
  m.loss_scratch = static_cast<size_t>(opts_.ce_chunk_tokens) * config_.vocab_size *
                   (sizeof(float) + (bf16_ ? sizeof(uint16_t) : 0));
  m.host_staging = host_stage_.size + host_ret_.size + host_grad_.size;
  return m;
}

TrainExecutor::LayerWeights TrainExecutor::StoreWeights(int layer) const {
  const float* base = store_->weights();
  const auto& e = layers_[layer].e;
  auto m = [&](int t) { return Mat{base + e[t]->offset, nullptr}; };
  return {base + e[0]->offset, m(1), m(2), m(3), m(4), base + e[5]->offset, m(6), m(7), m(8)};
}

TrainExecutor::LayerGrads TrainExecutor::StoreGrads(int layer) {
  float* base = store_->grads();
  const auto& e = layers_[layer].e;
  return {base + e[0]->offset, base + e[1]->offset, base + e[2]->offset,
          base + e[3]->offset, base + e[4]->offset, base + e[5]->offset,
          base + e[6]->offset, base + e[7]->offset, base + e[8]->offset};
}

TrainExecutor::LayerGrads TrainExecutor::BackwardGrads(int layer) {
  if (host_) return StoreGrads(layer);
  const int slot = next_grad_slot_;
  {
    std::unique_lock<std::mutex> lock(drain_mu_);
    drain_cv_.wait(lock, [&] { return !slot_busy_[slot]; });
  }
  CallDrained();
  dev_->Zero(grad_slot_[slot].data(), grad_slot_[slot].size());
  auto* p = grad_slot_[slot].as<uint8_t>();
  auto at = [&](int t) { return reinterpret_cast<float*>(p + grad_off_[t]); };
  return {at(0), at(1), at(2), at(3), at(4), at(5), at(6), at(7), at(8)};
}

void TrainExecutor::AddBack(float* dst, const void* device_src, size_t n) {
  auto* h = static_cast<float*>(host_ret_.p);
  dev_->CopyOut(h, device_src, n * sizeof(float));
  ThreadPool* pool = opts_.pool;
  auto add = [&](size_t b, size_t e) {
    for (size_t i = b; i < e; ++i) dst[i] += h[i];
  };
  if (pool == nullptr || pool->size() == 1 || n < (1u << 16)) {
    add(0, n);
  } else {
    pool->ParallelFor(n, add, 1u << 14);
  }
}

void TrainExecutor::ReturnGrads(int layer) {
  if (host_) {
    if (on_layer_grads_) on_layer_grads_(layer);
    return;
  }
  // The layer's kernels may still be running: the drainer waits for this fence.
  std::unique_ptr<DeviceFence> fence = dev_->RecordFence();
  {
    std::lock_guard<std::mutex> lock(drain_mu_);
    slot_busy_[next_grad_slot_] = true;
    drain_queue_.push_back({layer, next_grad_slot_, std::move(fence)});
  }
  drain_cv_.notify_all();
  next_grad_slot_ ^= 1;
}

void TrainExecutor::WaitDrains() {
  if (host_) return;
  {
    std::unique_lock<std::mutex> lock(drain_mu_);
    drain_cv_.wait(lock, [&] { return !slot_busy_[0] && !slot_busy_[1]; });
  }
  CallDrained();
}

void TrainExecutor::CallDrained() {
  for (;;) {
    int layer;
    {
      std::lock_guard<std::mutex> lock(drain_mu_);
      if (drained_.empty()) return;
      layer = drained_.front();
      drained_.pop_front();
    }
    if (on_layer_grads_) on_layer_grads_(layer);
  }
}

void TrainExecutor::DrainerLoop() {
  for (;;) {
    DrainJob job;
    {
      std::unique_lock<std::mutex> lock(drain_mu_);
      drain_cv_.wait(lock, [&] { return drain_stop_ || !drain_queue_.empty(); });
      if (drain_queue_.empty()) return;  // stopping, nothing left
      job = std::move(drain_queue_.front());
      drain_queue_.pop_front();
    }
    if (job.fence) job.fence->Wait();
    const DeviceBuffer& src = grad_slot_[job.slot];
    dev_->Download(host_grad_.p, src.data(), src.size());
    // Each tensor added into the store on this thread alone (the pool is compute's); the
    // layers' ranges are disjoint, so this never races with the compute thread.
    const LayerGrads g = StoreGrads(job.layer);
    float* dst[9] = {g.attn_norm, g.wq, g.wk, g.wv, g.wo, g.ffn_norm, g.wg, g.wu, g.wd};
    const auto* base = static_cast<const uint8_t*>(host_grad_.p);
    for (int t = 0; t < 9; ++t) {
      const float* h = reinterpret_cast<const float*>(base + grad_off_[t]);
      float* out = dst[t];
      const size_t n = layers_[job.layer].e[t]->numel;
      for (size_t i = 0; i < n; ++i) out[i] += h[i];
    }
    {
      std::lock_guard<std::mutex> lock(drain_mu_);
      slot_busy_[job.slot] = false;
      drained_.push_back(job.layer);
    }
    drain_cv_.notify_all();
  }
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
    std::unique_ptr<DeviceFence> fence;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Entry i goes to slot i % 2, free once entry i - 2 is released.
      cv_.wait(lock, [&] {
        return stop_ || (filled_ < schedule_.size() && filled_ < released_ + 2);
      });
      if (stop_) return;
      i = filled_;
      layer = schedule_[i];
      fence = std::move(fence_[i % 2]);
    }
    // The device may still be computing on the slot's previous layer.
    if (fence) fence->Wait();
    auto* dst = slot_[i % 2].as<uint8_t>();
    // Host memory is written in place; a discrete device's bf16 copy is converted on the host
    // first, then uploaded whole.
    const bool via_host = !host_ && bf16_;
    uint8_t* out = via_host ? static_cast<uint8_t*>(host_stage_.p) : dst;
    const auto& e = layers_[layer].e;
    for (int t = 0; t < 9; ++t) {
      const float* src = store_->weights() + e[t]->offset;
      const bool norm = t == 0 || t == 5;
      const size_t bytes = e[t]->numel * sizeof(float);
      if (bf16_ && !norm) {
        // On this thread alone: compute keeps the pool.
        kernels::ConvertToBF16(reinterpret_cast<uint16_t*>(out + slot_off_[t]), src,
                               e[t]->numel, nullptr);
      } else if (host_ || via_host) {
        std::memcpy(out + slot_off_[t], src, bytes);
      } else {
        dev_->Upload(dst + slot_off_[t], src, bytes);
      }
    }
    if (via_host) dev_->Upload(dst, out, slot_[i % 2].size());
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
  const auto* p = slot_[i % 2].as<uint8_t>();
  auto norm = [&](int t) { return reinterpret_cast<const float*>(p + slot_off_[t]); };
  auto m = [&](int t) {
    return bf16_ ? Mat{nullptr, reinterpret_cast<const uint16_t*>(p + slot_off_[t])}
                 : Mat{reinterpret_cast<const float*>(p + slot_off_[t]), nullptr};
  };
  return {norm(0), m(1), m(2), m(3), m(4), norm(5), m(6), m(7), m(8)};
}

void TrainExecutor::StageRelease(size_t i) {
  if (zero_copy_) return;
  // Compute may have only enqueued its work on the slot: the stager waits for this fence before
  // refilling it.
  std::unique_ptr<DeviceFence> fence = dev_->RecordFence();
  {
    std::lock_guard<std::mutex> lock(mu_);
    fence_[i % 2] = std::move(fence);
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

TrainExecutor::Mat TrainExecutor::Operand(const float* x, DeviceBuffer& buf, int64_t K) {
  if (!bf16_) return {x, nullptr};
  auto* h = buf.as<uint16_t>();
  dev_->ConvertToBF16(h, x, static_cast<size_t>(n_ * K));
  return {nullptr, h};
}

void TrainExecutor::Linear(float* y, Mat x, Mat W, int64_t N, int64_t K) {
  if (bf16_) {
    dev_->MatmulForwardBF16(y, x.h, W.h, n_, N, K);
  } else {
    dev_->MatmulForward(y, x.f, W.f, n_, N, K);
  }
}

void TrainExecutor::LinearBackward(float* dx, float* dW, const float* dy, Mat x, Mat W, int64_t N,
                                   int64_t K, bool accumulate_dx) {
  if (bf16_) {
    const Mat dyh = Operand(dy, dy16_, N);
    dev_->MatmulBackwardBF16(dx, dW, dyh.h, x.h, W.h, n_, N, K, accumulate_dx);
  } else {
    dev_->MatmulBackward(dx, dW, dy, x.f, W.f, n_, N, K, accumulate_dx);
  }
}

void TrainExecutor::LayerForward(const LayerWeights& w, const float* h_in, float* h_out) {
  const LlamaConfig& c = config_;
  const int64_t n = n_, d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t I = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const int64_t D = c.head_dim;
  const int32_t* pos = host_ ? positions_.data() : d_positions_.as<int32_t>();
  dev_->RmsNorm(F(a_), h_in, w.attn_norm, n, d, c.rms_norm_eps);
  const Mat a = Operand(F(a_), a16_, d);
  Linear(F(q_), a, w.wq, qd, d);
  Linear(F(k_), a, w.wk, kvd, d);
  Linear(F(v_), a, w.wv, kvd, d);
  dev_->Rope(F(q_), n, H, D, pos, c.rope_theta, false);
  dev_->Rope(F(k_), n, KV, D, pos, c.rope_theta, false);
  dev_->AttentionForward(F(o_), F(lse_), F(q_), F(k_), F(v_), opts_.batch, opts_.seq, H, KV, D);
  Linear(F(h2_), Operand(F(o_), o16_, qd), w.wo, d, qd);
  dev_->Add(F(h2_), h_in, n, d);
  dev_->RmsNorm(F(bn_), F(h2_), w.ffn_norm, n, d, c.rms_norm_eps);
  const Mat bn = Operand(F(bn_), bn16_, d);
  Linear(F(g_), bn, w.wg, I, d);
  Linear(F(u_), bn, w.wu, I, d);
  dev_->SwiGLU(F(s_), F(g_), F(u_), n, I);
  // The backward needs the down projection's input (bf16: rounded), not its output: a recompute
  // skips it.
  const Mat s = Operand(F(s_), s16_, I);
  if (h_out == nullptr) return;
  Linear(h_out, s, w.wd, d, I);
  dev_->Add(h_out, F(h2_), n, d);
}

void TrainExecutor::LayerBackward(const LayerWeights& w, const LayerGrads& g, const float* h_in) {
  const LlamaConfig& c = config_;
  const int64_t n = n_, d = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim();
  const int64_t I = c.intermediate_size, H = c.num_attention_heads, KV = c.num_key_value_heads;
  const int64_t D = c.head_dim;
  const int32_t* pos = host_ ? positions_.data() : d_positions_.as<int32_t>();
  float* dh = F(dh_);  // d(output) on entry; becomes d(h2), then d(input)
  // The products' inputs as the forward (or its recompute) left them: f32, or their bf16 copies.
  auto in = [&](DeviceBuffer& f32, DeviceBuffer& h) {
    return bf16_ ? Mat{nullptr, h.as<uint16_t>()} : Mat{F(f32), nullptr};
  };
  // FFN: out = h2 + down(silu(gate(bn)) * up(bn)), bn = rmsnorm(h2).
  LinearBackward(F(ds_), g.wd, dh, in(s_, s16_), w.wd, d, I);
  dev_->SwiGLUBackward(F(g_), F(u_), F(ds_), F(g_), F(u_), n, I);  // dgate, dup in place
  LinearBackward(F(dx_), g.wg, F(g_), in(bn_, bn16_), w.wg, I, d);
  LinearBackward(F(dx_), g.wu, F(u_), in(bn_, bn16_), w.wu, I, d, /*accumulate_dx=*/true);
  dev_->RmsNormBackward(dh, g.ffn_norm, F(dx_), F(h2_), w.ffn_norm, n, d, c.rms_norm_eps,
                        /*accumulate_dx=*/true);
  // Attention: h2 = h + o_proj(attn(rope(q(a)), rope(k(a)), v(a))), a = rmsnorm(h).
  LinearBackward(F(do_), g.wo, dh, in(o_, o16_), w.wo, d, qd);
  dev_->AttentionBackward(F(dq_), F(dk_), F(dv_), F(do_), F(q_), F(k_), F(v_), F(o_), F(lse_),
                          opts_.batch, opts_.seq, H, KV, D);
  dev_->Rope(F(dq_), n, H, D, pos, c.rope_theta, true);
  dev_->Rope(F(dk_), n, KV, D, pos, c.rope_theta, true);
  LinearBackward(F(dx_), g.wq, F(dq_), in(a_, a16_), w.wq, qd, d);
  LinearBackward(F(dx_), g.wk, F(dk_), in(a_, a16_), w.wk, kvd, d, true);
  LinearBackward(F(dx_), g.wv, F(dv_), in(a_, a16_), w.wv, kvd, d, true);
  dev_->RmsNormBackward(dh, g.attn_norm, F(dx_), h_in, w.attn_norm, n, d, c.rms_norm_eps,
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

  // Forward: embedding (gathered on the host), layers (keeping anchors), final norm.
  const int32_t* targets = targets_.data();
  const float* fnorm = store_->weight(*final_norm_);
  if (host_) {
    kernels::EmbeddingForward(F(anchors_[0]), store_->weight(*embed_), ids_.data(), n, d);
  } else {
    auto* rows = static_cast<float*>(host_ret_.p);
    kernels::EmbeddingForward(rows, store_->weight(*embed_), ids_.data(), n, d);
    dev_->CopyIn(anchors_[0].data(), rows, FloatBytes(n * d));
    dev_->CopyIn(d_targets_.data(), targets_.data(), n * sizeof(int32_t));
    dev_->CopyIn(fnorm_.data(), fnorm, FloatBytes(d));
    targets = d_targets_.as<int32_t>();
    fnorm = F(fnorm_);
  }
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
  dev_->RmsNorm(F(xf_), F(h_final_), fnorm, n, d, c.rms_norm_eps);
  float* dxf = F(dx_);
  float* dhead = nullptr;
  if (backward) {
    if (host_) {
      dhead = store_->grad(*lm_head_);
    } else {
      dev_->Zero(dhead_.data(), dhead_.size());
      dhead = F(dhead_);
    }
  }
  double loss;
  const float* head_f32 = store_->weight(*lm_head_);
  if (bf16_) {
    // The head's bf16 working copy, from this step's master weights (converted on the host for a
    // discrete device: half the bytes to upload).
    if (host_) {
      dev_->ConvertToBF16(head_.as<uint16_t>(), head_f32, static_cast<size_t>(V * d));
    } else {
      auto* h16 = static_cast<uint16_t*>(host_ret_.p);
      kernels::ConvertToBF16(h16, head_f32, static_cast<size_t>(V * d), pool);
      dev_->CopyIn(head_.data(), h16, HalfBytes(V * d));
    }
    const Mat xf = Operand(F(xf_), xf16_, d);
    loss = dev_->CrossEntropyLmHeadBF16(backward ? dxf : nullptr, dhead, xf.h,
                                        head_.as<uint16_t>(), targets, n, d, V,
                                        opts_.ce_chunk_tokens, grad_scale);
  } else {
    if (!host_) {
      dev_->CopyIn(head_.data(), head_f32, FloatBytes(V * d));
      head_f32 = F(head_);
    }
    loss = dev_->CrossEntropyLmHead(backward ? dxf : nullptr, dhead, F(xf_), head_f32, targets,
                                    n, d, V, opts_.ce_chunk_tokens, grad_scale);
  }
  if (!backward) {
    StageFinish();
    STRATA_RETURN_IF_ERROR(dev_->Check());
    return loss;
  }
  if (!host_) AddBack(store_->grad(*lm_head_), dhead_.data(), static_cast<size_t>(V * d));
  float* dfnorm = host_ ? store_->grad(*final_norm_) : F(dfnorm_);
  if (!host_) dev_->Zero(dfnorm_.data(), dfnorm_.size());
  dev_->RmsNormBackward(F(dh_), dfnorm, dxf, F(h_final_), fnorm, n, d, c.rms_norm_eps,
                        /*accumulate_dx=*/false);
  if (!host_) AddBack(store_->grad(*final_norm_), dfnorm_.data(), static_cast<size_t>(d));

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
      LayerBackward(w, BackwardGrads(l), input(l));
      StageRelease(step++);
      ReturnGrads(l);
    }
  }
  WaitDrains();
  if (host_) {
    kernels::EmbeddingBackward(store_->grad(*embed_), F(dh_), ids_.data(), n, d);
  } else {
    auto* dh_host = static_cast<float*>(host_ret_.p);
    dev_->CopyOut(dh_host, dh_.data(), FloatBytes(n * d));
    kernels::EmbeddingBackward(store_->grad(*embed_), dh_host, ids_.data(), n, d);
  }
  StageFinish();
  STRATA_RETURN_IF_ERROR(dev_->Check());
  return loss;
}

}  // namespace strata::runtime
