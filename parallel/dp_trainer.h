// Data-parallel training: every rank runs the whole model (runtime/trainer.h) on its share of the
// global batch; gradients are reduce-scattered so each rank gets the sum for the slice of the
// parameter store it owns, each rank runs AdamW on that slice only (its moments exist only there),
// and the updated slices are all-gathered back into every rank's weights.
//
// Optimizer overlap (`overlap_optimizer`, on by default where it applies): without gradient
// clipping, AdamW of each layer's part of this rank's slice starts as soon as that layer's
// gradients are final (the executor's last micro-batch reports each layer), on a thread of its
// own, while the backward goes on with the layers below; with 2+ ranks each layer's gradients are
// first all-reduced on the calling thread (MPI is funneled through it). The embedding, final norm
// and LM head follow the backward. The update is the same elementwise AdamW on the same reduced
// gradients, so losses and weights are bitwise those of the non-overlapped step. With clipping
// (clip > 0) the update needs the global gradient norm, which exists only once the whole backward
// has run, so the step reduces, clips and updates after it, as torch's clip_grad_norm_ + step do.
//
// Reproducibility: the global batch is a pure function of (seed, step) (runtime/train_data.h),
// split in rank order; collectives reduce in a fixed order (ring reduce-scatter), the loss and the
// gradient norm are gathered and summed in rank order. Two runs with the same seed, data and rank
// count give bitwise-identical losses and weights; runs on different rank counts agree to
// floating-point reassociation.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "base/status.h"
#include "base/thread_pool.h"
#include "comm/communicator.h"
#include "kernels/train.h"
#include "memory/param_store.h"
#include "runtime/llama_config.h"
#include "runtime/train_data.h"
#include "runtime/trainer.h"

namespace strata::parallel {

struct DpTrainOptions {
  int64_t batch = 8;         // sequences per step across all ranks (the global batch)
  int64_t micro_batch = 0;   // sequences per forward/backward on a rank; 0: the rank's whole share
  int64_t seq = 64;
  int64_t steps = 100;       // total, for the learning-rate schedule
  float lr = 1e-3f;          // peak
  float min_lr_ratio = 0.1f; // cosine decays to lr * this at the last step
  int64_t warmup = 10;       // steps of linear warmup from 0
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // on matrices and the embedding, not on norm gains
  float clip = 1.0f;          // global gradient-norm clip; 0 disables
  uint64_t seed = 1;          // data order
  int anchor_every = 1;
  int64_t ce_chunk_tokens = 128;
  runtime::StageMode stage = runtime::StageMode::kAuto;
  runtime::Precision precision = runtime::Precision::kF32;  // of the executor's products
  runtime::Device* device = nullptr;  // where the executor computes; null: the CPU (not owned)
  bool overlap_optimizer = true;  // AdamW per layer during the backward, when clip == 0
};

struct StepStats {
  int64_t step = 0;
  double loss = 0;        // mean over the global batch's target tokens
  double grad_norm = 0;   // before clipping
  float lr = 0;
  double seconds = 0;
  double compute_seconds = 0;  // forward + backward on this rank
  double comm_seconds = 0;     // reduce-scatter, all-gather, scalar gathers
  double optimizer_seconds = 0;
};

// The learning rate of `step` (1-based): linear warmup, then cosine to lr * min_lr_ratio.
float ScheduledLr(const DpTrainOptions& o, int64_t step);

class DpTrainer {
 public:
  // `comm` may be null for one rank. The store must have been created with a layout finalized
  // for comm's size and this rank. InvalidArgument when the batch does not split evenly.
  static StatusOr<std::unique_ptr<DpTrainer>> Create(const runtime::LlamaConfig& config,
                                                     memory::ParamStore* store,
                                                     comm::Communicator* comm,
                                                     const DpTrainOptions& options,
                                                     ThreadPool* pool);
  // One optimizer step (1-based `step`) on the global batch of that step.
  StatusOr<StepStats> Step(const runtime::TokenCorpus& corpus, int64_t step);
  // Forward + backward of step `step`'s batch only: the store's gradients then hold the summed,
  // unreduced-across-ranks gradient of the mean loss (for --dump-grads on one rank, and tests).
  StatusOr<double> ComputeGradients(const runtime::TokenCorpus& corpus, int64_t step);

  // Called in Step right before the optimizer writes this rank's slice (weights and moments):
  // the fence of an asynchronous snapshot that is still copying the previous step's state.
  void set_before_update(std::function<Status()> fn) { before_update_ = std::move(fn); }
  // Every rank's weights from every rank's own slice (all-gather): after a resume has restored
  // this rank's slice of weights and moments.
  Status GatherWeights();

  const runtime::TrainExecutor& executor() const { return *exec_; }

  // Host memory of the step's own buffers (reduce-scatter slice, decay runs), for reports.

  size_t buffer_bytes() const {

    return slice_.size() * sizeof(float) + runs_.size() * sizeof(DecayRun);

  }
  int rank() const { return rank_; }
  int size() const { return size_; }
  // Whether Step overlaps AdamW with the backward (see the top of the file).
  bool overlapped() const { return overlap_; }
  ~DpTrainer();

 private:
  struct Range {
    size_t begin, end;  // [begin, end) of the arena (Step's queue: of this rank's slice)
  };
  DpTrainer() = default;
  StatusOr<StepStats> StepOverlapped(const runtime::TokenCorpus& corpus, int64_t step);
  // ComputeGradients, calling `on_final_layer_grads` as each layer's gradients become final.
  StatusOr<double> ComputeGradients(const runtime::TokenCorpus& corpus, int64_t step,
                                    std::function<void(int)> on_final_layer_grads);
  // The step's mean loss and gradient norm from this rank's loss and reduced slice `g`;
  // Aborted when either is not finite.
  Status SetLossAndNorm(double local_loss, const float* g, int64_t step, StepStats* st);
  kernels::AdamWParams UpdateParams(int64_t step, float grad_scale) const;
  // AdamW over [begin, end) of this rank's slice, split where weight decay starts or stops.
  void UpdateSlice(size_t begin, size_t end, const float* g, kernels::AdamWParams p) const;
  // The gradients of arena range `r` are final on this rank: reduce them (2+ ranks), fence the
  // snapshot before the step's first update, queue this rank's part for the optimizer thread.
  void RangeReady(const Range& r);
  void OptimizerLoop();
  // Gathers one double per rank and sums in rank order.
  StatusOr<double> SumAcrossRanks(double x);

  runtime::LlamaConfig config_;
  memory::ParamStore* store_ = nullptr;
  comm::Communicator* comm_ = nullptr;
  DpTrainOptions opts_;
  int rank_ = 0, size_ = 1;
  int64_t local_batch_ = 0, micro_ = 0;
  std::unique_ptr<runtime::TrainExecutor> exec_;
  std::vector<int32_t> tokens_;
  std::vector<float> slice_;   // reduce-scatter output / all-gather input (2+ ranks only)
  struct DecayRun {
    size_t begin, end;  // [begin, end) of this rank's slice
    bool decay;         // weight decay applies
  };
  std::vector<DecayRun> runs_;  // covers the slice in order
  std::function<Status()> before_update_;

  // Optimizer overlap: each layer's arena range, and the rest (embedding, final norm, head).
  bool overlap_ = false;
  std::vector<Range> layer_ranges_, other_ranges_;
  Status overlap_error_;   // the first failure of a step's reductions or fence
  bool fenced_ = false;    // before_update_ ran this step
  uint64_t reduce_ns_ = 0; // this step's all-reduce time
  std::thread opt_thread_;
  std::mutex opt_mu_;
  std::condition_variable opt_cv_;
  std::deque<Range> opt_queue_;
  size_t opt_busy_ = 0;    // ranges queued or being updated
  bool opt_stop_ = false;
  kernels::AdamWParams opt_params_;
};

}  // namespace strata::parallel
