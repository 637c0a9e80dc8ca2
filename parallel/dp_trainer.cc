#include "parallel/dp_trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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
  return t;
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
  std::memset(store_->grads(), 0, store_->layout().total() * sizeof(float));
  // Every target token of the global batch counts once in the mean.
  const float scale = 1.0f / static_cast<float>(opts_.batch * opts_.seq);
  double loss = 0;
  for (int64_t first = rank_ * local_batch_; first < (rank_ + 1) * local_batch_; first += micro_) {
    STRATA_RETURN_IF_ERROR(
        corpus.Batch(opts_.seed, step, first, micro_, opts_.seq, tokens_.data()));
    STRATA_ASSIGN_OR_RETURN(double l, exec_->ForwardBackward(tokens_.data(), scale));
    loss += l;
  }
  return loss;
}

StatusOr<StepStats> DpTrainer::Step(const runtime::TokenCorpus& corpus, int64_t step) {
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
  STRATA_ASSIGN_OR_RETURN(double loss_sum, SumAcrossRanks(local_loss));
  STRATA_ASSIGN_OR_RETURN(double sq, SumAcrossRanks(kernels::SumSquares(g, n)));
  const uint64_t t2 = NowNs();

  st.loss = loss_sum / static_cast<double>(opts_.batch * opts_.seq);
  st.grad_norm = std::sqrt(sq);
  if (!std::isfinite(st.loss) || !std::isfinite(st.grad_norm)) {
    return Status::Aborted(fmt::format(
        "step {}: loss {} / gradient norm {} is not finite (learning rate too high?)", step,
        st.loss, st.grad_norm));
  }
  kernels::AdamWParams p;
  p.lr = st.lr = ScheduledLr(opts_, step);
  p.beta1 = opts_.beta1;
  p.beta2 = opts_.beta2;
  p.eps = opts_.eps;
  p.step = step;
  // torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is below 1.
  p.grad_scale = 1.0f;
  if (opts_.clip > 0) {
    const double coef = opts_.clip / (st.grad_norm + 1e-6);
    if (coef < 1.0) p.grad_scale = static_cast<float>(coef);
  }
  if (before_update_) STRATA_RETURN_IF_ERROR(before_update_());
  float* w = store_->weights() + begin;
  float* m = store_->moment1();
  float* v = store_->moment2();
  // Runs of equal decay flags share one call.
  for (const DecayRun& r : runs_) {
    p.weight_decay = r.decay ? opts_.weight_decay : 0.0f;
    kernels::AdamWUpdate(w + r.begin, m + r.begin, v + r.begin, g + r.begin, r.end - r.begin, p);
  }
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
