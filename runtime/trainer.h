// The streaming training executor of one rank: a Llama's forward and hand-written backward over a
// micro-batch, layer by layer, with weights taken from the host parameter store
// (memory/param_store.h) and gradients accumulated back into it.
//
// Memory grows with parameters, not with depth x activations:
// - forward keeps only layer-boundary activations, an "anchor" every `anchor_every` layers;
// - backward walks the segments between anchors in reverse: it recomputes the segment's layer
//   inputs from its anchor, then for each layer (last first) recomputes the layer's internals
//   into one shared workspace and runs the layer's backward (kernels/train.h);
// - the LM head's cross-entropy runs in chunks of tokens, so [tokens, vocab] logits never exist.
//
// Weights reach compute through two staging slots: while layer i computes, a stager thread fills
// the other slot with the next layer in the walk order (forward 0..L-1, then per segment the
// recompute and the reverse walk).
//
// Compute runs on a Device (runtime/device.h; ExecutorOptions::device, the CPU by default).
// - The CPU shares host memory, so for f32 staging is zero-copy by default and gradients
//   accumulate straight into the store; StageMode::kCopy makes real double-buffered copies.
// - A discrete device (CUDA, or the CPU made discrete for tests) gets everything through copies:
//   the stager uploads each layer into a device slot on the device's transfer queue (bf16:
//   converted on the host first, halving the bytes moved) and waits, before refilling a slot, on
//   a fence compute recorded when it released it; each layer's weight gradients are computed
//   into one of two device gradient slots (zeroed per layer), which a drainer thread copies back
//   and adds into the store while the next layers compute; the
//   embedding runs on the host (its rows are gathered there and uploaded, its gradient scattered
//   there from the downloaded d(input)); the final norm and the LM head are uploaded each step
//   and their gradients come back the same way. On the CPU made discrete every result is bit-
//   identical to the shared-memory path (tests/device_test.cc).
//
// Precision::kBF16 (mixed precision, `strata train --precision bf16`): the master weights, the
// gradients accumulated into the store and AdamW stay f32. The stager converts each layer's
// matrices into bf16 working copies in the two slots (norm gains stay f32), so in bf16 staging is
// always a real double-buffered copy; each activation entering a matrix product is rounded to bf16
// once into a workspace buffer, and the products run in bf16 with f32 accumulation into f32
// outputs (kernels::MatmulForwardBF16). Norms, RoPE, SwiGLU, residual adds, the loss's softmax
// and every gradient between the products stay f32.
// - The LM head runs in bf16 too (a bf16 copy of the head made each step, the final hidden state
//   and each chunk's dlogits rounded): it is the largest product, and it is what autocast does.
// - Attention (QK^T, softmax, PV and their backward) stays f32: its products are small here
//   (head_dim 32..128, 64-row blocks, about a tenth of the FLOPs at seq 256), rounding q, k, v
//   and P for each block would cost about what bf16 saves, and the softmax statistics the
//   backward rebuilds from (lse) stay exact.
// Deterministic like f32: conversions are elementwise, the bf16 products single-threaded per
// call over fixed slices.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "base/aligned_buffer.h"
#include "base/status.h"
#include "base/thread_pool.h"
#include "memory/param_store.h"
#include "runtime/device.h"
#include "runtime/llama_config.h"

namespace strata::runtime {

class HfModel;

// The parameter layout of a Llama: Hugging Face tensor names and shapes (LlamaTensorLayout), the
// norms without weight decay, finalized for `ranks` data-parallel ranks.
StatusOr<memory::ParamLayout> LlamaParamLayout(const LlamaConfig& config, int ranks);
// Hugging Face's LlamaPreTrainedModel init: every matrix and the embedding ~ N(0, 0.02^2), norms 1.
// Deterministic for a seed (its own generator, independent of any other random state).
void InitLlamaParams(memory::ParamStore& store, uint64_t seed, float stddev = 0.02f);
// Copies every tensor of `model` into the store (converting to f32); the model's config must be
// the one the layout was made from.
Status LoadLlamaParams(memory::ParamStore& store, const HfModel& model);
// config.json text for `config` (what ParseLlamaConfig reads back).
std::string LlamaConfigJson(const LlamaConfig& config);
// Writes a Hugging Face folder (config.json, model.safetensors in f32, and tokenizer.model copied
// from `tokenizer_path` when non-empty) to a temporary sibling of `dir`, fsyncs it, then renames
// it over `dir`, so a crash never leaves a half-written model.
Status SaveHfFolder(const memory::ParamStore& store, const LlamaConfig& config,
                    const std::string& dir, const std::string& tokenizer_path);

enum class StageMode { kAuto, kZeroCopy, kCopy };

// Precision of the matrix products and of the weights' working copies (see the top of the file).
enum class Precision { kF32, kBF16 };
// "f32" / "bf16" (InvalidArgument otherwise) and back.
StatusOr<Precision> ParsePrecision(std::string_view name);
const char* PrecisionName(Precision p);

struct ExecutorOptions {
  int64_t batch = 1;          // sequences per ForwardBackward call (micro-batch)
  int64_t seq = 64;           // tokens per sequence (inputs; targets are shifted by one)
  int anchor_every = 1;       // keep a layer-boundary activation every K layers
  int64_t ce_chunk_tokens = 128;  // rows of logits alive at once in the loss
  StageMode stage = StageMode::kAuto;  // kZeroCopy is refused with kBF16 (working copies differ)
  Precision precision = Precision::kF32;  // kBF16 fails in Create where oneDNN cannot run it
  ThreadPool* pool = nullptr;  // null: the caller's thread only (also for host-side work)
  // Where compute runs; null: the CPU over `pool`. Not owned; must outlive the executor.
  Device* device = nullptr;
};

// Memory the executor holds besides the parameter store, for `strata train --memory-report`. On
// the CPU all of it is host memory; on a discrete device the first four are device memory and
// `host_staging` is the page-locked host memory its copies go through.
struct ExecutorMemory {
  size_t anchors = 0;      // layer-boundary activations kept from forward to backward
  size_t workspace = 0;    // one layer's internals, its backward temporaries, the head's
                           // (bf16: plus the bf16 copies of the products' inputs)
  size_t staging = 0;      // the two weight staging slots (0 when zero-copy; bf16: plus the
                           // LM head's bf16 working copy)
  size_t loss_scratch = 0; // one chunk of logits (kernels/train.h CrossEntropyLmHead; bf16:
                           // plus the chunk's bf16 dlogits)
  size_t host_staging = 0; // discrete devices only
  size_t total() const { return anchors + workspace + staging + loss_scratch + host_staging; }
};

class TrainExecutor {
 public:
  static StatusOr<std::unique_ptr<TrainExecutor>> Create(const LlamaConfig& config,
                                                         memory::ParamStore* store,
                                                         const ExecutorOptions& options);
  ~TrainExecutor();

  // tokens: [batch, seq + 1] ids; inputs are tokens[:, :seq], targets tokens[:, 1:] (a target
  // < 0 is ignored). Runs forward and backward; gradients of grad_scale * (sum of token losses)
  // are ADDED to the store's gradients. Returns the sum of the token losses.
  // InvalidArgument for an id outside the vocabulary.
  StatusOr<double> ForwardBackward(const int32_t* tokens, float grad_scale);
  // Forward and loss only (no gradients): the sum of the token losses.
  StatusOr<double> Loss(const int32_t* tokens);

  // What Create will allocate for `config` and `options` (on options.device), computed without
  // allocating, so a launcher can refuse a run that does not fit before any work starts.
  static ExecutorMemory Estimate(const LlamaConfig& config, const ExecutorOptions& options);
  ExecutorMemory memory() const;
  bool zero_copy() const { return zero_copy_; }
  const Device& device() const { return *dev_; }
  Precision precision() const { return opts_.precision; }
  // Milliseconds compute waited for a staged layer, summed since creation.
  double stage_wait_ms() const { return stage_wait_ns_ / 1e6; }
  // Called on the calling thread during ForwardBackward, as soon as layer `layer`'s weight
  // gradients are complete in the store (its backward ran and, on a discrete device, they were
  // added back), last layer first. Nothing later in the call reads that layer's weights or
  // writes its gradients, so the caller may update them right away (DpTrainer overlaps AdamW
  // with the rest of the backward this way). Empty: no call.
  void set_on_layer_grads(std::function<void(int layer)> fn) { on_layer_grads_ = std::move(fn); }

 private:
  // A matrix operand in the executor's precision: f32 (f) or bf16 (h), the other null.
  struct Mat {
    const float* f;
    const uint16_t* h;
  };
  struct LayerWeights {
    const float* attn_norm;
    Mat wq, wk, wv, wo;
    const float* ffn_norm;
    Mat wg, wu, wd;
  };
  struct LayerGrads {
    float* attn_norm;
    float* wq;
    float* wk;
    float* wv;
    float* wo;
    float* ffn_norm;
    float* wg;
    float* wu;
    float* wd;
  };

  TrainExecutor() = default;
  Status CheckTokens(const int32_t* tokens);
  // Forward of layer `l` from h_in to h_out (distinct buffers), internals left in the workspace.
  // h_out null: only the internals the backward needs (the last matrix product is skipped).
  void LayerForward(const LayerWeights& w, const float* h_in, float* h_out);
  // Backward of the layer whose internals are in the workspace (computed from h_in): dh_ holds
  // the gradient of the layer's output on entry and of its input on return.
  void LayerBackward(const LayerWeights& w, const LayerGrads& g, const float* h_in);
  // x [n, K] as a product operand: itself in f32; in bf16 rounded into `buf` (n * K halves).
  Mat Operand(const float* x, DeviceBuffer& buf, int64_t K);
  // y[n, N] = x · W^T and its backward (kernels/train.h MatmulForward/MatmulBackward) in the
  // executor's precision; bf16 rounds dy into dy16_ itself.
  void Linear(float* y, Mat x, Mat W, int64_t N, int64_t K);
  void LinearBackward(float* dx, float* dW, const float* dy, Mat x, Mat W, int64_t N, int64_t K,
                      bool accumulate_dx = false);
  // Byte offsets of the 9 layer tensors in a staging slot and the slot's size.
  static size_t SlotLayout(const LlamaConfig& c, Precision p, size_t offsets[9]);
  StatusOr<double> Run(const int32_t* tokens, float grad_scale, bool backward);

  // Staging: the layers of one step in walk order; Acquire(i) returns entry i's weights.
  void StageStart(std::vector<int> schedule);
  LayerWeights StageAcquire(size_t i);
  void StageRelease(size_t i);
  void StageFinish();
  void StagerLoop();
  LayerWeights StoreWeights(int layer) const;
  LayerGrads StoreGrads(int layer);
  // Where layer `layer`'s backward writes its weight gradients: the store (host memory), or on a
  // discrete device the next of two gradient slots, zeroed once the drainer has emptied it.
  // ReturnGrads hands the slot to the drainer thread, which waits for the layer's kernels, copies
  // the slot back (Device::Download) and adds it into the store while the next layers compute.
  // on_layer_grads_ runs on the calling thread once a layer's gradients are in the store:
  // at once on host memory, else from BackwardGrads and WaitDrains (CallDrained).
  LayerGrads BackwardGrads(int layer);
  void ReturnGrads(int layer);
  void WaitDrains();
  void CallDrained();
  void DrainerLoop();
  // Copies device memory back and adds it into the store's gradients at `dst` (discrete only).
  void AddBack(float* dst, const void* device_src, size_t n);

  LlamaConfig config_;
  memory::ParamStore* store_ = nullptr;
  ExecutorOptions opts_;
  std::unique_ptr<Device> own_device_;  // when options.device is null
  Device* dev_ = nullptr;
  bool host_ = true;  // dev_->host_memory()
  int64_t n_ = 0;  // tokens per call
  std::vector<int32_t> ids_, targets_, positions_;
  DeviceBuffer d_targets_, d_positions_;  // discrete devices' copies

  // Parameter offsets per layer (in the store) and the head's.
  struct LayerOffsets {
    const memory::ParamEntry* e[9];
  };
  std::vector<LayerOffsets> layers_;
  const memory::ParamEntry* embed_ = nullptr;
  const memory::ParamEntry* final_norm_ = nullptr;
  const memory::ParamEntry* lm_head_ = nullptr;  // the embedding when tied

  // Activations and workspace.
  std::vector<DeviceBuffer> anchors_;  // input of layer a * K, for a < ceil(L / K)
  std::vector<DeviceBuffer> segment_;  // inputs of layers inside the segment being recomputed
  DeviceBuffer ping_, pong_, h_final_;
  DeviceBuffer a_, q_, k_, v_, o_, lse_, h2_, bn_, g_, u_, s_;
  DeviceBuffer dh_, ds_, dx_, do_, dq_, dk_, dv_, xf_;
  // bf16 only: rounded product inputs (a, o, bn, s, the final hidden state, one gradient at a
  // time).
  DeviceBuffer a16_, o16_, bn16_, s16_, xf16_, dy16_;
  // The LM head's working copy (bf16; discrete devices also in f32), and on discrete devices the
  // final norm's, plus the gradients of the head, the final norm and one layer.
  DeviceBuffer head_, fnorm_, dhead_, dfnorm_, grad_slot_[2];
  size_t grad_off_[9] = {};
  // Discrete devices: page-locked host memory for the stager's bf16 conversions (one slot) and
  // for everything that comes back or goes up from the compute thread (the largest of a layer's
  // gradients, the head's, the embedding's rows).
  struct HostMem {
    Device* dev = nullptr;
    void* p = nullptr;
    size_t size = 0;
    ~HostMem() {
      if (p != nullptr) dev->ReleaseHost(p);
    }
  };
  HostMem host_stage_, host_ret_, host_grad_;  // host_grad_: the drainer's

  // Staging slots (copy mode) and the stager thread.
  bool zero_copy_ = true;
  bool bf16_ = false;
  DeviceBuffer slot_[2];
  size_t slot_off_[9] = {};
  std::unique_ptr<DeviceFence> fence_[2];  // recorded when the slot's last entry was released
  std::vector<int> schedule_;
  size_t filled_ = 0;    // entries [0, filled_) have been staged
  size_t released_ = 0;  // entries [0, released_) have been released
  bool stop_ = false;
  std::mutex mu_;
  std::condition_variable cv_;
  std::thread stager_;
  uint64_t stage_wait_ns_ = 0;
  std::function<void(int)> on_layer_grads_;

  // The gradient drainer (discrete devices).
  struct DrainJob {
    int layer;
    int slot;
    std::unique_ptr<DeviceFence> fence;  // after the layer's backward; null: already complete
  };
  std::thread drainer_;
  std::mutex drain_mu_;
  std::condition_variable drain_cv_;
  std::deque<DrainJob> drain_queue_;
  bool slot_busy_[2] = {false, false};  // queued or being drained
  std::deque<int> drained_;             // layers in the store whose callback has not run
  bool drain_stop_ = false;
  int next_grad_slot_ = 0;
};

}  // namespace strata::runtime
