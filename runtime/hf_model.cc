#include "runtime/hf_model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "base/logging.h"
#include "runtime/file_util.h"

namespace strata::runtime {
namespace {

bool FileExists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string JoinPath(const std::string& dir, const std::string& name) {
  return (std::filesystem::path(dir) / name).string();
}

class Fnv1a64 {
 public:
  void Add(std::string_view s) {
    for (unsigned char c : s) {
      h_ ^= c;
      h_ *= 0x100000001b3ull;
    }
    // A separator keeps ("ab","c") and ("a","bc") apart.
    h_ ^= 0xff;
    h_ *= 0x100000001b3ull;
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

}  // namespace

std::vector<ExpectedTensor> LlamaTensorLayout(const LlamaConfig& c) {
  const int64_t h = c.hidden_size;
  std::vector<ExpectedTensor> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = fmt::format("model.layers.{}.", i);
    out.push_back({p + "input_layernorm.weight", {h}});
    out.push_back({p + "self_attn.q_proj.weight", {c.q_dim(), h}});
    out.push_back({p + "self_attn.k_proj.weight", {c.kv_dim(), h}});
    out.push_back({p + "self_attn.v_proj.weight", {c.kv_dim(), h}});
    out.push_back({p + "self_attn.o_proj.weight", {h, c.q_dim()}});
    out.push_back({p + "post_attention_layernorm.weight", {h}});
    out.push_back({p + "mlp.gate_proj.weight", {c.intermediate_size, h}});
    out.push_back({p + "mlp.up_proj.weight", {c.intermediate_size, h}});
    out.push_back({p + "mlp.down_proj.weight", {h, c.intermediate_size}});
  }
  out.push_back({"model.norm.weight", {h}});
  if (!c.tie_word_embeddings) out.push_back({"lm_head.weight", {c.vocab_size, h}});
  return out;
}

StatusOr<std::unique_ptr<HfModel>> HfModel::Open(const std::string& dir) {
  std::unique_ptr<HfModel> model(new HfModel());
  model->dir_ = dir;

  const std::string config_path = JoinPath(dir, "config.json");
  auto text = ReadFileToString(config_path);
  if (!text.ok()) {
    return text.status().WithContext(fmt::format("model folder {}: config.json", dir));
  }
  STRATA_ASSIGN_OR_RETURN(model->config_, ParseLlamaConfig(*text, config_path));

  auto add_file = [&](const std::string& name) -> StatusOr<const SafetensorsFile*> {
    STRATA_ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(JoinPath(dir, name)));
    const SafetensorsFile* f = file.get();
    for (const TensorInfo& t : f->tensors()) {
      auto [it, inserted] = model->tensors_.emplace(t.name, TensorRef{f, &t, f->data(t)});
      if (!inserted) {
        return Status::Corruption(fmt::format("model folder {}: tensor '{}' is in both {} and {}",
                                              dir, t.name, it->second.file->path(), f->path()));
      }
    }
    model->files_.push_back(std::move(file));
    return f;
  };

  const std::string index_path = JoinPath(dir, "model.safetensors.index.json");
  const std::string single_path = JoinPath(dir, "model.safetensors");
  if (FileExists(index_path)) {
    STRATA_ASSIGN_OR_RETURN(std::string index_text, ReadFileToString(index_path));
    nlohmann::json index;
    try {
      index = nlohmann::json::parse(index_text);
    } catch (const nlohmann::json::exception& e) {
      return Status::Corruption(fmt::format("{}: not valid JSON: {}", index_path, e.what()));
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
      return Status::Corruption(fmt::format("{}: no \"weight_map\" object", index_path));
    }
    const auto& weight_map = index["weight_map"];
    std::set<std::string> shards;
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      if (!it.value().is_string()) {
        return Status::Corruption(
            fmt::format("{}: weight_map entry for '{}' is not a file name", index_path, it.key()));
      }
      const std::string shard = it.value().get<std::string>();
      // Shards live in the folder itself; a path could point anywhere on the machine.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "..") {
        return Status::Corruption(
            fmt::format("{}: weight_map entry for '{}' names '{}', not a "
                        "file in the model folder",
                        index_path, it.key(), shard));
      }
      shards.insert(shard);
    }
    std::map<std::string, const SafetensorsFile*> by_name;
    for (const std::string& shard : shards) {
      STRATA_ASSIGN_OR_RETURN(by_name[shard], add_file(shard));
    }
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      const SafetensorsFile* f = by_name[it.value().get<std::string>()];
      if (f->Find(it.key()) == nullptr) {
        return Status::Corruption(fmt::format("{}: weight_map puts '{}' in {}, which lacks it",
                                              index_path, it.key(), f->path()));
      }
    }
  } else if (FileExists(single_path)) {
    STRATA_RETURN_IF_ERROR(add_file("model.safetensors"));
  } else {
    return Status::NotFound(fmt::format(
        "model folder {}: neither model.safetensors nor model.safetensors.index.json exists", dir));
  }
  STRATA_RETURN_IF_ERROR(model->ValidateTensors());
  STRATA_LOG(INFO, INFER, "opened model {}: {} layers, hidden {}, {} tensors in {} file(s)", dir,
             model->config_.num_hidden_layers, model->config_.hidden_size, model->tensors_.size(),
             model->files_.size());
  return model;
}

Status HfModel::ValidateTensors() const {
  for (const ExpectedTensor& want : LlamaTensorLayout(config_)) {
    auto it = tensors_.find(want.name);
    if (it == tensors_.end()) {
      return Status::NotFound(
          fmt::format("model folder {}: missing tensor '{}' (expected shape {})", dir_, want.name,
                      ShapeString(want.shape)));
    }
    const TensorInfo& info = *it->second.info;
    if (info.shape != want.shape) {
      return Status::InvalidArgument(fmt::format(
          "model folder {}: tensor '{}' in {} has shape {}, expected {} from config.json", dir_,
          want.name, it->second.file->path(), ShapeString(info.shape), ShapeString(want.shape)));
    }
    if (!IsFloating(info.dtype)) {
      return Status::InvalidArgument(
          fmt::format("model folder {}: tensor '{}' in {} has dtype {}, expected F32, F16 or BF16",
                      dir_, want.name, it->second.file->path(), SafetensorsDTypeName(info.dtype)));
    }
  }
  return Status::OK();
}

StatusOr<HfModel::TensorRef> HfModel::Tensor(std::string_view name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return Status::NotFound(fmt::format("model folder {}: no tensor '{}'", dir_, name));
  }
  return it->second;
}

std::vector<std::string> HfModel::TensorNames() const {
  std::vector<std::string> names;
  names.reserve(tensors_.size());
  for (const auto& [name, ref] : tensors_) names.push_back(name);
  return names;
}

Status HfModel::ReadF32(std::string_view name, float* dst, size_t count) const {
  STRATA_ASSIGN_OR_RETURN(TensorRef ref, Tensor(name));
  const TensorInfo& info = *ref.info;
  if (static_cast<uint64_t>(info.numel()) != count) {
    return Status::InvalidArgument(
        fmt::format("ReadF32 '{}': tensor has {} elements {}, asked for {}", name, info.numel(),
                    ShapeString(info.shape), count));
  }
  if (!IsFloating(info.dtype)) {
    return Status::InvalidArgument(fmt::format("ReadF32 '{}': dtype {} is not a float type", name,
                                               SafetensorsDTypeName(info.dtype)));
  }
  const size_t elem = DTypeSize(info.dtype);
  if (reinterpret_cast<uintptr_t>(ref.data) % elem == 0) {
    ConvertBuffer(ref.data, info.dtype, dst, DType::kF32, count);
    return Status::OK();
  }
  // The format does not promise alignment; go through an aligned bounce buffer rather than
  // read misaligned elements.
  constexpr size_t kChunk = 4096;
  alignas(8) uint8_t bounce[kChunk * 4];
  for (size_t done = 0; done < count; done += kChunk) {
    size_t n = std::min(kChunk, count - done);
    std::memcpy(bounce, ref.data + done * elem, n * elem);
    ConvertBuffer(bounce, info.dtype, dst + done, DType::kF32, n);
  }
  return Status::OK();
}

std::string HfModel::tokenizer_path() const {
  std::string p = JoinPath(dir_, "tokenizer.model");
  return FileExists(p) ? p : std::string();
}

std::string HfModel::fingerprint() const {
  Fnv1a64 h;
  const LlamaConfig& c = config_;
  h.Add(fmt::format("{} h{} i{} l{} a{} kv{} v{} p{} d{} eps{:a} theta{:a} tie{} sw{}",
                    c.model_type, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                    c.num_attention_heads, c.num_key_value_heads, c.vocab_size,
                    c.max_position_embeddings, c.head_dim, c.rms_norm_eps, c.rope_theta,
                    c.tie_word_embeddings, c.sliding_window));
  for (const auto& [name, ref] : tensors_) {  // std::map: sorted, so shard layout does not matter
    h.Add(name);
    h.Add(SafetensorsDTypeName(ref.info->dtype));
    h.Add(ShapeString(ref.info->shape));
  }
  return fmt::format("{:016x}", h.value());
}

}  // namespace strata::runtime
