#include "runtime/llama_config.h"

#include <nlohmann/json.hpp>
#include <optional>

namespace strata::runtime {
namespace {

using Json = nlohmann::json;

class Reader {
 public:
  Reader(const Json& root, const std::string& source) : root_(root), source_(source) {}

  Status Error(std::string_view field, std::string_view what) const {
    return Status::InvalidArgument(fmt::format("{}: field \"{}\" {}", source_, field, what));
  }

  bool Has(const char* field) const {
    auto it = root_.find(field);
    return it != root_.end() && !it->is_null();
  }

  // A positive integer; `fallback` is used when the field is absent (nullopt: required).
  StatusOr<int64_t> PositiveInt(const char* field, std::optional<int64_t> fallback) const {
    if (!Has(field)) {
      if (fallback) return *fallback;
      return Error(field, "is missing");
    }
    const Json& v = root_.at(field);
    if (!v.is_number_integer())
      return Error(field, fmt::format("must be an integer, got {}", v.dump()));
    int64_t x = v.get<int64_t>();
    if (x <= 0) return Error(field, fmt::format("must be positive, got {}", x));
    return x;
  }

  StatusOr<float> PositiveFloat(const char* field, float fallback) const {
    if (!Has(field)) return fallback;
    const Json& v = root_.at(field);
    if (!v.is_number()) return Error(field, fmt::format("must be a number, got {}", v.dump()));
    double x = v.get<double>();
    if (!(x > 0)) return Error(field, fmt::format("must be positive, got {}", v.dump()));
    return static_cast<float>(x);
  }

  StatusOr<bool> Bool(const char* field, bool fallback) const {
    if (!Has(field)) return fallback;
    const Json& v = root_.at(field);
    if (!v.is_boolean())
      return Error(field, fmt::format("must be true or false, got {}", v.dump()));
    return v.get<bool>();
  }

  StatusOr<std::string> String(const char* field) const {
    if (!Has(field)) return std::string();
    const Json& v = root_.at(field);
    if (!v.is_string()) return Error(field, fmt::format("must be a string, got {}", v.dump()));
    return v.get<std::string>();
  }

  // Token ids may be one integer or (newer configs) a list; the first is the canonical one.
  StatusOr<int64_t> TokenId(const char* field) const {
    if (!Has(field)) return int64_t{-1};
    const Json& v = root_.at(field);
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_array() && !v.empty() && v[0].is_number_integer()) return v[0].get<int64_t>();
    return Error(field, fmt::format("must be an integer or a list of integers, got {}", v.dump()));
  }

 private:
  const Json& root_;
  const std::string& source_;
};

}  // namespace

StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text,
                                       const std::string& source_name) {
  Json root;
  try {
    root = Json::parse(json_text);
  } catch (const Json::exception& e) {
    return Status::InvalidArgument(
        fmt::format("{}: config is not valid JSON: {}", source_name, e.what()));
  }
  if (!root.is_object()) {
    return Status::InvalidArgument(
        fmt::format("{}: config is a JSON {}, expected an object", source_name, root.type_name()));
  }
  Reader r(root, source_name);
  LlamaConfig c;

  STRATA_ASSIGN_OR_RETURN(c.model_type, r.String("model_type"));
  if (c.model_type.empty()) {
    // Older exports carry only the architecture list.
    if (r.Has("architectures") && root["architectures"].is_array()) {
      for (const Json& a : root["architectures"]) {
        if (a == "LlamaForCausalLM") c.model_type = "llama";
        if (a == "MistralForCausalLM") c.model_type = "mistral";
      }
    }
    if (c.model_type.empty()) {
      return r.Error("model_type",
                     "is missing and \"architectures\" names neither LlamaForCausalLM nor "
                     "MistralForCausalLM");
    }
  } else if (c.model_type != "llama" && c.model_type != "mistral") {
    return Status::Unimplemented(fmt::format(
        "{}: field \"model_type\" is \"{}\"; only llama and mistral models are supported",
        source_name, c.model_type));
  }

  STRATA_ASSIGN_OR_RETURN(c.hidden_size, r.PositiveInt("hidden_size", std::nullopt));
  STRATA_ASSIGN_OR_RETURN(c.intermediate_size, r.PositiveInt("intermediate_size", std::nullopt));
  STRATA_ASSIGN_OR_RETURN(c.num_hidden_layers, r.PositiveInt("num_hidden_layers", std::nullopt));
  STRATA_ASSIGN_OR_RETURN(c.num_attention_heads,
                          r.PositiveInt("num_attention_heads", std::nullopt));
  STRATA_ASSIGN_OR_RETURN(c.num_key_value_heads,
                          r.PositiveInt("num_key_value_heads", c.num_attention_heads));
  STRATA_ASSIGN_OR_RETURN(c.vocab_size, r.PositiveInt("vocab_size", std::nullopt));
  STRATA_ASSIGN_OR_RETURN(c.max_position_embeddings,
                          r.PositiveInt("max_position_embeddings", int64_t{2048}));
  if (r.Has("head_dim")) {
    STRATA_ASSIGN_OR_RETURN(c.head_dim, r.PositiveInt("head_dim", std::nullopt));
  } else {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return r.Error("hidden_size", fmt::format("({}) is not divisible by num_attention_heads ({})",
                                                c.hidden_size, c.num_attention_heads));
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    return r.Error("head_dim", fmt::format("({}) must be even for rotary embeddings", c.head_dim));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return r.Error("num_key_value_heads",
                   fmt::format("({}) does not divide num_attention_heads ({})",
                               c.num_key_value_heads, c.num_attention_heads));
  }
  STRATA_ASSIGN_OR_RETURN(c.rms_norm_eps, r.PositiveFloat("rms_norm_eps", 1e-6f));
  STRATA_ASSIGN_OR_RETURN(c.rope_theta, r.PositiveFloat("rope_theta", 10000.0f));
  STRATA_ASSIGN_OR_RETURN(c.tie_word_embeddings, r.Bool("tie_word_embeddings", false));
  STRATA_ASSIGN_OR_RETURN(c.torch_dtype, r.String("torch_dtype"));
  STRATA_ASSIGN_OR_RETURN(c.bos_token_id, r.TokenId("bos_token_id"));
  STRATA_ASSIGN_OR_RETURN(c.eos_token_id, r.TokenId("eos_token_id"));
  if (r.Has("sliding_window")) {
    STRATA_ASSIGN_OR_RETURN(c.sliding_window, r.PositiveInt("sliding_window", std::nullopt));
  }

  // What the executors do not implement is refused here rather than computed wrongly later.
  if (r.Has("rope_scaling")) {
    const Json& s = root["rope_scaling"];
    std::string type = "?";
    if (s.is_object()) {
      for (const char* key : {"rope_type", "type"}) {
        if (s.contains(key) && s[key].is_string()) type = s[key].get<std::string>();
      }
    }
    if (type != "default") {
      return Status::Unimplemented(fmt::format(
          "{}: field \"rope_scaling\" ({}) is not supported: strata implements plain RoPE with "
          "rope_theta only",
          source_name, s.dump()));
    }
  }
  for (const char* bias : {"attention_bias", "mlp_bias"}) {
    STRATA_ASSIGN_OR_RETURN(bool has_bias, r.Bool(bias, false));
    if (has_bias) {
      return Status::Unimplemented(fmt::format(
          "{}: field \"{}\" is true; biased projections are not supported", source_name, bias));
    }
  }
  STRATA_ASSIGN_OR_RETURN(std::string act, r.String("hidden_act"));
  if (!act.empty() && act != "silu") {
    return Status::Unimplemented(fmt::format(
        "{}: field \"hidden_act\" is \"{}\"; only silu (SwiGLU) is supported", source_name, act));
  }
  return c;
}

}  // namespace strata::runtime
