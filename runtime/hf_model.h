// A Hugging Face Llama-family model folder: config.json, the weights in model.safetensors or in
// shards listed by model.safetensors.index.json, and (optionally, for loading weights)
// tokenizer.model.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/status.h"
#include "runtime/llama_config.h"
#include "runtime/safetensors.h"

namespace strata::runtime {

// Name and expected shape of every tensor a Llama with `config` needs, in execution order
// (embedding, per layer: attention norm, q, k, v, o, FFN norm, gate, up, down; final norm,
// lm_head unless the embeddings are tied).
struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
};
std::vector<ExpectedTensor> LlamaTensorLayout(const LlamaConfig& config);

class HfModel {
 public:
  // Reads config.json, maps the safetensors file(s), checks the index against the shards and
  // every tensor's shape against the config (ValidateTensors). NotFound names a missing file or
  // tensor; InvalidArgument names a tensor with the wrong shape or a non-float dtype, with the
  // expected and actual shapes.
  static StatusOr<std::unique_ptr<HfModel>> Open(const std::string& dir);

  const LlamaConfig& config() const { return config_; }

  struct TensorRef {
    const SafetensorsFile* file;
    const TensorInfo* info;
    const uint8_t* data;
  };
  // NotFound when no shard holds `name`.
  StatusOr<TensorRef> Tensor(std::string_view name) const;
  // All tensors of all shards, sorted by name.
  std::vector<std::string> TensorNames() const;

  // Copies tensor `name` into dst as f32, converting from F32/F16/BF16. InvalidArgument when
  // count differs from the tensor's element count or the dtype is not a float type.
  Status ReadF32(std::string_view name, float* dst, size_t count) const;

  const std::string& dir() const { return dir_; }
  // dir/tokenizer.model, or empty when the folder has none.
  std::string tokenizer_path() const;
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }

  // FNV-1a 64 over the config and every tensor's name, dtype and shape, as 16 hex digits: equal
  // for the same model in one file or in shards, different when any shape, dtype or config value
  // differs. Used to key caches (KV tier) to a model.
  std::string fingerprint() const;

 private:
  HfModel() = default;
  Status ValidateTensors() const;

  std::string dir_;
  LlamaConfig config_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, TensorRef, std::less<>> tensors_;
};

}  // namespace strata::runtime
