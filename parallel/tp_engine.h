// Tensor-parallel Llama inference on one rank of a group: this rank's attention heads and FFN
// columns, streamed from its shard file through a sliding window, joined by two allreduces per
// layer (star by default).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "comm/communicator.h"
#include "kernels/ops.h"
#include "memory/weight_window.h"
#include "runtime/llama_config.h"
#include "runtime/shard_file.h"

namespace strata::parallel {

struct EngineOptions {
  // Blocks (half layers) in flight; 0 keeps the whole shard resident (mmap).
  int window = 2;
  // How blocks are brought in (see memory/weight_window.h); kAuto picks by page-cache residency.
  memory::WindowMode window_mode = memory::WindowMode::kAuto;
  bool direct_io = false;
  // The algorithm of the two per-layer allreduces.
  comm::Algorithm allreduce = comm::Algorithm::kStar;
  // KV cache length in tokens (the context: prompt + generated); 0 = min(max_position_embeddings,
  // 2048). More than max_position_embeddings is refused.
  int64_t max_seq = 0;
  // Compute threads; null: ThreadPool::Default(). Must outlive the engine.
  ThreadPool* pool = nullptr;
};

class TpEngine {
 public:
  // Opens `shard_dir`/rank-<comm.rank()>.shard and checks that every rank opened a shard of the
  // same model split for comm.size() ranks.
  static StatusOr<std::unique_ptr<TpEngine>> Open(const std::string& shard_dir,
                                                  comm::Communicator& comm,
                                                  const EngineOptions& options);

  // Runs n tokens at positions [pos, pos + n) (their KV entries are written; earlier positions
  // must have been run before). Every rank calls it; `tokens` matter on rank 0 only. On rank 0,
  // `logits` receives [n, vocab] when all_logits, else the last token's [vocab].
  Status Forward(const int32_t* tokens, int64_t n, int64_t pos, bool all_logits,
                 std::vector<float>* logits);

  const runtime::LlamaConfig& config() const { return config_; }
  int64_t max_seq() const { return max_seq_; }
  int64_t weight_wait_ns() const { return window_->stats().wait_ns; }
  // memory::WeightWindow::huge_mapped_fraction: -1 unless resident (window 0).
  double weights_huge_mapped_fraction() const { return window_->huge_mapped_fraction(); }
  int64_t allreduce_ns() const { return allreduce_ns_; }
  memory::WindowMode window_mode() const { return window_->mode(); }
  uint64_t resident_bytes() const;
  // Weight bytes this rank reads to decode one token: every block of its shard, plus its rows of
  // the LM head (the embedding contributes one row). Divided by the streaming read bandwidth
  // it gives the rank's decode floor.
  uint64_t decode_weight_bytes() const;
  // What this rank's memory must hold: W blocks of the largest size (all blocks when resident),
  // the resident tensors (norms, LM head rows; embeddings on rank 0) and the KV cache. The
  // issue's RSS bound is 1.2 x this + 64 MiB.
  uint64_t memory_budget_bytes() const;

 private:
  TpEngine(comm::Communicator& comm, const EngineOptions& options) : comm_(comm), opts_(options) {}
  Status Load(const std::string& shard_dir);
  // Pointers to one block's tensors, in the order the shard writer stores them.
  struct BlockTensors {
    const uint8_t* w[4] = {};
  };
  StatusOr<BlockTensors> AcquireBlock(int index);
  Status AllreduceInto(float* residual, float* partial, int64_t count);
  Status Embed(const int32_t* tokens, int64_t n, float* x);
  // Final norm and this rank's LM head rows for positions [first, first + rows) of x; rank 0
  // gathers every rank's columns into `logits` [rows, vocab].
  Status Head(const float* x, int64_t rows, std::vector<float>* logits);

  comm::Communicator& comm_;
  EngineOptions opts_;
  runtime::LlamaConfig config_;
  kernels::WeightType wtype_ = kernels::WeightType::kF32;
  std::unique_ptr<runtime::ShardFile> shard_;
  std::unique_ptr<memory::WeightWindow> window_;
  int64_t heads_ = 0, kv_heads_ = 0, ffn_ = 0, max_seq_ = 0;
  // Resident: per-layer norms (every rank); embeddings (rank 0); final norm and LM head rows
  // [vocab_begin_, vocab_end_) on every rank that has rows (rank 0 alone, with all of them, in
  // shards written before the head was split).
  std::vector<std::vector<float>> input_norm_, post_norm_;
  std::vector<float> final_norm_;
  std::vector<uint8_t> embed_, lm_head_;
  int64_t vocab_begin_ = 0, vocab_end_ = 0;
  std::vector<std::pair<int64_t, int64_t>> head_rows_;  // every rank's [begin, end), from Open
  // A rank's logits before they are gathered; rank 0's receive buffer for another rank's. Both
  // only grow: a decode step allocates nothing.
  std::vector<float> head_part_, head_recv_;
  std::vector<AlignedBuffer> k_cache_, v_cache_;  // per layer [max_seq, kv_heads_, head_dim]
  struct Scratch {
    std::vector<float> x, h, part, q, att, k, v, gate, up;
    std::vector<float> qkv, gate_up;  // decode: fused outputs when the weights are adjacent
    std::vector<int32_t> positions;
  };
  Scratch scratch_;
  ThreadPool* pool_ = nullptr;
  int64_t allreduce_ns_ = 0;
};

}  // namespace strata::parallel
