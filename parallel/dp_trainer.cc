#include "parallel/dp_trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>

#include <fmt/format.h>

#include "base/clock.h"
#include "base/dtype.h"

namespace strata::parallel {
namespace {

// Training collectives wait for the slowest rank's whole forward and backward; the communicator's
// default (meant for inference steps) would call a slow rank dead.
constexpr std::chrono::milliseconds kTrainCommTimeout{30 * 60 * 1000};

comm::CollectiveOptions Ring() {
  comm::CollectiveOptions o;
  o.algorithm = comm::Algorithm::kRing;
  o.timeout = kTrainCommTimeout;
  return o;
}

double Seconds(uint64_t ns) { return static_cast<double>(ns) / 1e9; }

}  // namespace

float ScheduledLr(const DpTrainOptions& o, int64_t step) {
  if (o.warmup > 0 && step <= o.warmup) {
    return o.lr * static_cast<float>(step) / static_cast<float>(o.warmup);
  }
  const int64_t decay_steps = std::max<int64_t>(1, o.steps - o.warmup);
  const double progress =
      std::clamp(static_cast<double>(step - o.warmup) / static_cast<double>(decay_steps), 0.0, 1.0);
  const double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  const double min_lr = static_cast<double>(o.lr) * o.min_lr_ratio;
  return static_cast<float>(min_lr + (static_cast<double>(o.lr) - min_lr) * cosine);
}

StatusOr<std::unique_ptr<DpTrainer>> DpTrainer::Create(const runtime::LlamaConfig& config,
                                                       memory::ParamStore* store,
                                                       comm::Communicator* comm,
                                                       const DpTrainOptions& options,
                                                       ThreadPool* pool) {
  std::unique_ptr<DpTrainer> t(new DpTrainer());
  t->config_ = config;
  t->store_ = store;
  t->comm_ = comm;
  t->opts_ = options;
  t->rank_ = comm ? comm->rank() : 0;
  t->size_ = comm ? comm->size() : 1;
  if (store->layout().ranks() != t->size_ || store->rank() != t->rank_) {
    return Status::InvalidArgument(fmt::format(
        "parameter store made for rank {} of {}, trainer is rank {} of {}", store->rank(),
        store->layout().ranks(), t->rank_, t->size_));
  }
  if (options.batch < t->size_ || options.batch % t->size_ != 0) {
    return Status::InvalidArgument(fmt::format(
        "the global batch of {} sequences does not split evenly over {} ranks", options.batch,
        t->size_));
  }
  t->local_batch_ = options.batch / t->size_;
  t->micro_ = options.micro_batch > 0 ? std::min(options.micro_batch, t->local_batch_)
                                      : t->local_batch_;
  if (t->local_batch_ % t->micro_ != 0) {
    return Status::InvalidArgument(fmt::format(
        "the micro-batch of {} does not divide this rank's {} sequences", t->micro_,
        t->local_batch_));
  }
  runtime::ExecutorOptions eo;
  eo.batch = t->micro_;
  eo.seq = options.seq;
  eo.anchor_every = options.anchor_every;
  eo.ce_chunk_tokens = options.ce_chunk_tokens;
  eo.stage = options.stage;
  eo.precision = options.precision;
  eo.pool = pool;
  eo.device = options.device;
  STRATA_ASSIGN_OR_RETURN(t->exec_, runtime::TrainExecutor::Create(config, store, eo));
  t->tokens_.resize(static_cast<size_t>(t->micro_ * (options.seq + 1)));
  // One rank reduces nothing and gathers nothing: it updates its gradients in place.
  if (t->size_ > 1) t->slice_.resize(store->slice_size());
  // Which runs of this rank's slice decay: matrices and the embedding, not norms or padding.
  // Runs, not a flag per float: a byte per parameter would be 6% on top of the 16 the store
  // holds.
  const size_t b = store->slice_begin(), e = b + store->slice_size();
  std::vector<std::pair<size_t, size_t>> decays;
  for (const memory::ParamEntry& p : store->layout().entries()) {
    if (!p.decay) continue;
    const size_t lo = std::max(b, p.offset), hi = std::min(e, p.offset + p.numel);
    if (lo < hi) decays.emplace_back(lo - b, hi - b);
  }
  std::sort(decays.begin(), decays.end());
  size_t at = 0;
  for (const auto& [lo, hi] : decays) {
    if (lo > at) t->runs_.push_back({at, lo, false});
    if (!t->runs_.empty() && t->runs_.back().decay && t->runs_.back().end == lo) {
      t->runs_.back().end = hi;  // adjacent decaying tensors share one call
    } else {
      t->runs_.push_back({lo, hi, true});
    }
    at = hi;
  }
  if (at < store->slice_size()) t->runs_.push_back({at, store->slice_size(), false});

  // Optimizer overlap: each layer's tensors are one contiguous arena range (the layout adds them
  // layer by layer); everything else is the complement. Anything unexpected turns overlap off.
  if (options.overlap_optimizer && options.clip <= 0) {
    std::map<long, Range> layers;
    const std::string prefix = "model.layers.";
    for (const memory::ParamEntry& p : store->layout().entries()) {
      if (p.name.rfind(prefix, 0) != 0) continue;
      const long l = std::strtol(p.name.c_str() + prefix.size(), nullptr, 10);
      auto [it, fresh] = layers.emplace(l, Range{p.offset, p.offset + p.numel});
      if (!fresh) {
        it->second.begin = std::min(it->second.begin, p.offset);
        it->second.end = std::max(it->second.end, p.offset + p.numel);
      }
    }
    bool ok = static_cast<int64_t>(layers.size()) == config.num_hidden_layers;
    size_t prev_end = 0;
    for (const auto& [l, r] : layers) {
      ok = ok && r.begin >= prev_end;
      prev_end = r.end;
      t->layer_ranges_.push_back(r);
    }
    for (const memory::ParamEntry& p : store->layout().entries()) {
      if (p.name.rfind(prefix, 0) == 0) continue;
      for (const Range& r : t->layer_ranges_) {
        ok = ok && (p.offset + p.numel <= r.begin || p.offset >= r.end);
      }
    }
    if (ok) {
      size_t pos = 0;
      for (const Range& r : t->layer_ranges_) {
        if (r.begin > pos) t->other_ranges_.push_back({pos, r.begin});
        pos = r.end;
      }
      if (pos < store->layout().total()) t->other_ranges_.push_back({pos, store->layout().total()});
      t->overlap_ = true;
      t->opt_thread_ = std::thread([p = t.get()] { p->OptimizerLoop(); });
    } else {
      t->layer_ranges_.clear();
    }
  }
  return t;
}

DpTrainer::~DpTrainer() {
  if (opt_thread_.joinable()) {
    {
      std::lock_guard<std::mutex> lock(opt_mu_);
      opt_stop_ = true;
    }
    opt_cv_.notify_all();
    opt_thread_.join();
  }
}

kernels::AdamWParams DpTrainer::UpdateParams(int64_t step, float grad_scale) const {
  kernels::AdamWParams p;
  p.lr = ScheduledLr(opts_, step);
  p.beta1 = opts_.beta1;
  p.beta2 = opts_.beta2;
  p.eps = opts_.eps;
  p.step = step;
  p.grad_scale = grad_scale;
  return p;
}

void DpTrainer::UpdateSlice(size_t begin, size_t end, const float* g,
                            kernels::AdamWParams p) const {
  const size_t b0 = store_->slice_begin();
  float* w = store_->weights() + b0;
  float* m = store_->moment1();
  float* v = store_->moment2();
  // Runs of equal decay flags share one call.
  for (const DecayRun& r : runs_) {
    const size_t lo = std::max(begin, r.begin), hi = std::min(end, r.end);
    if (lo >= hi) continue;
    p.weight_decay = r.decay ? opts_.weight_decay : 0.0f;
    kernels::AdamWUpdate(w + lo, m + lo, v + lo, g + lo, hi - lo, p);
  }
}

void DpTrainer::RangeReady(const Range& r) {
  if (!overlap_error_.ok()) return;
  if (size_ > 1) {
    const uint64_t t0 = NowNs();
    float* g = store_->grads() + r.begin;
    overlap_error_ = comm_->Allreduce(g, g, r.end - r.begin, DType::kF32, Ring());
    reduce_ns_ += NowNs() - t0;
    if (!overlap_error_.ok()) return;
  }
  if (!fenced_) {
    fenced_ = true;
    if (before_update_) {
      overlap_error_ = before_update_();
      if (!overlap_error_.ok()) return;
    }
  }
  const size_t b0 = store_->slice_begin(), e0 = b0 + store_->slice_size();
  const size_t lo = std::max(r.begin, b0), hi = std::min(r.end, e0);
  if (lo >= hi) return;
  {
    std::lock_guard<std::mutex> lock(opt_mu_);
    opt_queue_.push_back({lo - b0, hi - b0});
    ++opt_busy_;
  }
  opt_cv_.notify_all();
}

void DpTrainer::OptimizerLoop() {
  for (;;) {
    Range r;
    kernels::AdamWParams p;
    {
      std::unique_lock<std::mutex> lock(opt_mu_);
      opt_cv_.wait(lock, [&] { return opt_stop_ || !opt_queue_.empty(); });
      if (opt_stop_) return;
      r = opt_queue_.front();
      opt_queue_.pop_front();
      p = opt_params_;
    }
    // The gradients were reduced in place in the store.
    UpdateSlice(r.begin, r.end, store_->grads() + store_->slice_begin(), p);
    {
      std::lock_guard<std::mutex> lock(opt_mu_);
      --opt_busy_;
    }
    opt_cv_.notify_all();
  }
}

StatusOr<StepStats> DpTrainer::StepOverlapped(const runtime::TokenCorpus& corpus, int64_t step) {
  StepStats st;
  st.step = step;
  const uint64_t t0 = NowNs();
  {
    std::lock_guard<std::mutex> lock(opt_mu_);
    opt_params_ = UpdateParams(step, 1.0f);  // no clipping on this path
  }
  st.lr = opt_params_.lr;
  overlap_error_ = Status::OK();
  fenced_ = false;
  reduce_ns_ = 0;
  StatusOr<double> local_loss = ComputeGradients(
      corpus, step, [this](int l) { RangeReady(layer_ranges_[static_cast<size_t>(l)]); });
  if (!local_loss.ok() && overlap_error_.ok()) overlap_error_ = local_loss.status();
  if (overlap_error_.ok()) {
    for (const Range& r : other_ranges_) RangeReady(r);
  }
  const uint64_t t1 = NowNs();
  {
    // Whatever was queued finishes before anything returns: the thread must not write the store
    // while the caller reads it.
    std::unique_lock<std::mutex> lock(opt_mu_);
    opt_cv_.wait(lock, [&] { return opt_busy_ == 0; });
  }
  const uint64_t t2 = NowNs();
  STRATA_RETURN_IF_ERROR(overlap_error_);
  // The gradients were all-reduced in place: this rank's slice of them is the reduced one.
  STRATA_RETURN_IF_ERROR(
      SetLossAndNorm(*local_loss, store_->grads() + store_->slice_begin(), step, &st));
  const uint64_t t3 = NowNs();
  STRATA_RETURN_IF_ERROR(GatherWeights());
  const uint64_t t4 = NowNs();
  st.compute_seconds = Seconds(t1 - t0 - reduce_ns_);
  st.comm_seconds = Seconds(reduce_ns_) + Seconds(t4 - t3);
  st.optimizer_seconds = Seconds(t2 - t1);  // what the overlap did not hide
  st.seconds = Seconds(t4 - t0);
  return st;
}

StatusOr<double> DpTrainer::SumAcrossRanks(double x) {
  if (size_ == 1) return x;
  std::vector<double> all(static_cast<size_t>(size_));
  STRATA_RETURN_IF_ERROR(comm_->Allgather(&x, all.data(), sizeof(double), Ring()));
  double sum = 0;
  for (double v : all) sum += v;  // rank order: the same bits on every rank, every run
  return sum;
}

StatusOr<double> DpTrainer::ComputeGradients(const runtime::TokenCorpus& corpus, int64_t step) {
  return ComputeGradients(corpus, step, nullptr);
}

StatusOr<double> DpTrainer::ComputeGradients(const runtime::TokenCorpus& corpus, int64_t step,
                                             std::function<void(int)> on_final_layer_grads) {
  std::memset(store_->grads(), 0, store_->layout().total() * sizeof(float));
  // Every target token of the global batch counts once in the mean.
  const float scale = 1.0f / static_cast<float>(opts_.batch * opts_.seq);
  const int64_t last = (rank_ + 1) * local_batch_ - micro_;
  double loss = 0;
  for (int64_t first = rank_ * local_batch_; first < (rank_ + 1) * local_batch_; first += micro_) {
    STRATA_RETURN_IF_ERROR(
        corpus.Batch(opts_.seed, step, first, micro_, opts_.seq, tokens_.data()));
    // Only the last micro-batch completes a layer's gradients.
    if (first == last) exec_->set_on_layer_grads(on_final_layer_grads);
    StatusOr<double> l = exec_->ForwardBackward(tokens_.data(), scale);
    exec_->set_on_layer_grads(nullptr);
    STRATA_RETURN_IF_ERROR(l.status());
    loss += *l;
  }
  return loss;
}

Status DpTrainer::SetLossAndNorm(double local_loss, const float* g, int64_t step,
                                 StepStats* st) {
  STRATA_ASSIGN_OR_RETURN(double loss_sum, SumAcrossRanks(local_loss));
  STRATA_ASSIGN_OR_RETURN(double sq,
                          SumAcrossRanks(kernels::SumSquares(g, store_->slice_size())));
  st->loss = loss_sum / static_cast<double>(opts_.batch * opts_.seq);
  st->grad_norm = std::sqrt(sq);
  if (!std::isfinite(st->loss) || !std::isfinite(st->grad_norm)) {
    return Status::Aborted(fmt::format(
        "step {}: loss {} / gradient norm {} is not finite (learning rate too high?){}", step,
        st->loss, st->grad_norm,
        overlap_ ? "; the overlapped update already applied it, so resume from the previous "
                   "snapshot"
                 : ""));
  }
  return Status::OK();
}

StatusOr<StepStats> DpTrainer::Step(const runtime::TokenCorpus& corpus, int64_t step) {
  if (overlap_) return StepOverlapped(corpus, step);
  StepStats st;
  st.step = step;
  const uint64_t t0 = NowNs();
  STRATA_ASSIGN_OR_RETURN(double local_loss, ComputeGradients(corpus, step));
  const uint64_t t1 = NowNs();

  const size_t begin = store_->slice_begin(), n = store_->slice_size();
  float* g;
  if (size_ > 1) {
    STRATA_RETURN_IF_ERROR(
        comm_->ReduceScatter(store_->grads(), slice_.data(), n, DType::kF32, Ring()));
    g = slice_.data();
  } else {
    g = store_->grads() + begin;
  }
  STRATA_RETURN_IF_ERROR(SetLossAndNorm(local_loss, g, step, &st));
  const uint64_t t2 = NowNs();

  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  float grad_scale = 1.0f;
  if (opts_.clip > 0) {
    const double coef = opts_.clip / (st.grad_norm + 1e-6);
    if (coef < 1.0) grad_scale = static_cast<float>(coef);
  }
  const kernels::AdamWParams p = UpdateParams(step, grad_scale);
  st.lr = p.lr;
  if (before_update_) STRATA_RETURN_IF_ERROR(before_update_());
  UpdateSlice(0, n, g, p);
  const uint64_t t3 = NowNs();
  STRATA_RETURN_IF_ERROR(GatherWeights());
  const uint64_t t4 = NowNs();
  st.compute_seconds = Seconds(t1 - t0);
  st.comm_seconds = Seconds(t2 - t1) + Seconds(t4 - t3);
  st.optimizer_seconds = Seconds(t3 - t2);
  st.seconds = Seconds(t4 - t0);
  return st;
}

Status DpTrainer::GatherWeights() {
  if (size_ == 1) return Status::OK();
  const size_t n = store_->slice_size();
  std::memcpy(slice_.data(), store_->weights() + store_->slice_begin(), n * sizeof(float));
  return comm_->Allgather(slice_.data(), store_->weights(), n * sizeof(float), Ring());
}

}  // namespace strata::parallel
