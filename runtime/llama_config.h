// The Llama-family model configuration (Llama 2, TinyLlama, Mistral) as read from a Hugging Face
// config.json.
#pragma once

#include <cstdint>
#include <string>

#include "base/status.h"

namespace strata::runtime {

struct LlamaConfig {
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;  // grouped-query attention when < num_attention_heads
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 0;
  int64_t head_dim = 0;  // hidden_size / num_attention_heads unless config.json says otherwise
  float rms_norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  bool tie_word_embeddings = false;
  // Mistral's sliding attention window in tokens; 0 when the model attends to everything.
  int64_t sliding_window = 0;
  std::string model_type;   // "llama" or "mistral"
  std::string torch_dtype;  // as written ("bfloat16", "float16", "float32"); empty if absent
  int64_t bos_token_id = -1;
  int64_t eos_token_id = -1;

  int64_t q_dim() const { return num_attention_heads * head_dim; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim; }
};

// Parses config.json text. Requires model_type "llama" or "mistral" (or, without model_type,
// architectures LlamaForCausalLM / MistralForCausalLM). Defaults follow transformers'
// LlamaConfig: num_key_value_heads = num_attention_heads, rope_theta 10000, rms_norm_eps 1e-6,
// max_position_embeddings 2048, tie_word_embeddings false. Rejects with InvalidArgument naming
// the field: missing or non-positive sizes, wrong JSON types, hidden_size % num_attention_heads
// != 0 (when head_dim is not given), num_attention_heads % num_key_value_heads != 0. Rejects
// with Unimplemented what the executors do not implement: rope_scaling, attention or MLP biases,
// an activation other than SiLU. `source_name` (usually the path) prefixes every message.
StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text,
                                       const std::string& source_name);

}  // namespace strata::runtime
