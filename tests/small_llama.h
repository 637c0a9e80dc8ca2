// The small Llama the executor tests run on: GQA (4 heads over 2 KV heads), head_dim 16, a
// 500-token vocabulary; `layers` and tied embeddings vary per test.
#pragma once

#include "runtime/llama_config.h"

namespace strata::runtime {

inline LlamaConfig SmallLlamaConfig(bool tied, int64_t layers) {
  LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.vocab_size = 500;
  c.max_position_embeddings = 128;
  c.tie_word_embeddings = tied;
  c.model_type = "llama";
  return c;
}

}  // namespace strata::runtime
