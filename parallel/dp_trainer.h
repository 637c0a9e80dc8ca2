// Data-parallel training: every rank runs the whole model (runtime/trainer.h) on its share of the
// global batch; gradients are reduce-scattered so each rank gets the sum for the slice of the
// parameter store it owns, each rank runs AdamW on that slice only (its moments exist only there),
// and the updated slices are all-gathered back into every rank's weights.
//
// Reproducibility: the global batch is a pure function of (seed, step) (runtime/train_data.h),
// split in rank order; collectives reduce in a fixed order (ring reduce-scatter), the loss and the
// gradient norm are gathered and summed in rank order. Two runs with the same seed, data and rank
// count give bitwise-identical losses and weights; runs on different rank counts agree to
// floating-point reassociation.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
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

 private:
  DpTrainer() = default;
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
};

}  // namespace strata::parallel
