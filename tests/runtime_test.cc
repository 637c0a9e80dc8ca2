// runtime/: safetensors parsing and writing, Llama config.json parsing, Hugging Face model
// folders (single file, sharded, bf16, tied embeddings) and the SentencePiece tokenizer.
//
// The model folders are written by tests/reference/make_tiny_llama.py, which also records, with
// numpy and python-sentencepiece, what the tensors hold and which ids each test string encodes
// to — so the expected values never come from the code under test.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "runtime/hf_model.h"
#include "runtime/llama_config.h"
#include "runtime/safetensors.h"
#include "runtime/tokenizer.h"

#ifndef STRATA_SOURCE_DIR
#error "STRATA_SOURCE_DIR must name the source tree (tests/CMakeLists.txt defines it)"
#endif
#ifndef STRATA_PYTHON
#define STRATA_PYTHON "/usr/bin/python3"
#endif

namespace strata::runtime {
namespace {

namespace fs = std::filesystem;
using ::testing::AllOf;
using ::testing::HasSubstr;
using Json = nlohmann::json;

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

// A safetensors file with exactly this header text and data bytes; no padding, no checks.
void WriteRaw(const std::string& path, const std::string& header, const std::string& data,
              uint64_t claimed_header_len = UINT64_MAX) {
  uint64_t len = claimed_header_len == UINT64_MAX ? header.size() : claimed_header_len;
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  WriteText(path, bytes + header + data);
}

class RuntimeTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/strata_runtime_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    root_ = new std::string(tmpl);
    const std::string script =
        std::string(STRATA_SOURCE_DIR) + "/tests/reference/make_tiny_llama.py";
    auto make = [&](const std::string& name, const std::string& flags) {
      std::string cmd =
          fmt::format("{} {} --out {}/{} {} 2>&1", STRATA_PYTHON, script, *root_, name, flags);
      int rc = std::system(cmd.c_str());
      ASSERT_EQ(rc, 0) << "fixture generator failed: " << cmd;
    };
    make("f32", "");
    const std::string tok = fmt::format("--tokenizer {}/f32/tokenizer.model", *root_);
    make("sharded", "--shards 2 " + tok);
    make("bf16", "--dtype bf16 " + tok);
    make("tied", "--tied " + tok);
  }
  static void TearDownTestSuite() {
    if (root_ != nullptr) {
      std::error_code ec;
      fs::remove_all(*root_, ec);
      delete root_;
      root_ = nullptr;
    }
  }
  void SetUp() override {
    ASSERT_NE(root_, nullptr);
    ASSERT_TRUE(fs::exists(Dir("f32") + "/config.json")) << "fixtures were not generated";
  }

  static std::string Dir(const std::string& name) { return *root_ + "/" + name; }

  // A fresh copy of the f32 folder to break.
  static std::string CopyOfF32(const std::string& name) {
    std::string dst = Dir(name);
    fs::remove_all(dst);
    fs::copy(Dir("f32"), dst, fs::copy_options::recursive);
    return dst;
  }

  static std::vector<float> ReadAll(const HfModel& m, const std::string& name) {
    auto ref = m.Tensor(name);
    EXPECT_TRUE(ref.ok()) << ref.status();
    if (!ref.ok()) return {};
    std::vector<float> v(static_cast<size_t>(ref->info->numel()));
    Status s = m.ReadF32(name, v.data(), v.size());
    EXPECT_TRUE(s.ok()) << s;
    return v;
  }

  // Every tensor of `m` against checksums.json in `dir`.
  static void ExpectMatchesChecksums(const HfModel& m, const std::string& dir) {
    Json sums = Json::parse(ReadText(dir + "/checksums.json"));
    EXPECT_EQ(m.TensorNames().size(), sums.size());
    for (auto it = sums.begin(); it != sums.end(); ++it) {
      SCOPED_TRACE(it.key());
      auto ref = m.Tensor(it.key());
      ASSERT_TRUE(ref.ok()) << ref.status();
      EXPECT_EQ(ref->info->shape, it.value()["shape"].get<std::vector<int64_t>>());
      EXPECT_STREQ(SafetensorsDTypeName(ref->info->dtype),
                   it.value()["dtype"].get<std::string>().c_str());
      std::vector<float> v = ReadAll(m, it.key());
      double sum = 0;
      for (float x : v) sum += x;
      double abs_sum = it.value()["abs_sum"].get<double>();
      EXPECT_NEAR(sum, it.value()["sum"].get<double>(), 1e-12 * abs_sum + 1e-12);
      auto first = it.value()["first"].get<std::vector<double>>();
      ASSERT_GE(v.size(), first.size());
      for (size_t i = 0; i < first.size(); ++i) {
        EXPECT_EQ(static_cast<double>(v[i]), first[i]) << "element " << i;
      }
    }
  }

  static std::string* root_;
};
std::string* RuntimeTest::root_ = nullptr;

// ---------------------------------------------------------------------------------------------
// Hugging Face folders
// ---------------------------------------------------------------------------------------------

TEST_F(RuntimeTest, OpensFolderAndReadsConfig) {
  auto m = HfModel::Open(Dir("f32"));
  ASSERT_TRUE(m.ok()) << m.status();
  const LlamaConfig& c = (*m)->config();
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, 160);
  EXPECT_EQ(c.num_hidden_layers, 2);
  EXPECT_EQ(c.num_attention_heads, 4);
  EXPECT_EQ(c.num_key_value_heads, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.vocab_size, 400);
  EXPECT_EQ(c.max_position_embeddings, 256);
  EXPECT_FLOAT_EQ(c.rms_norm_eps, 1e-5f);
  EXPECT_FLOAT_EQ(c.rope_theta, 10000.0f);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.torch_dtype, "float32");
  EXPECT_EQ(c.model_type, "llama");
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ((*m)->files().size(), 1u);
  EXPECT_EQ((*m)->tokenizer_path(), Dir("f32") + "/tokenizer.model");
  // 1 embedding + 9 per layer + final norm + lm_head.
  EXPECT_EQ((*m)->TensorNames().size(), 1u + 9u * 2u + 1u + 1u);
  EXPECT_EQ(LlamaTensorLayout(c).size(), 21u);
}

TEST_F(RuntimeTest, TensorsMatchNumpyChecksums) {
  auto m = HfModel::Open(Dir("f32"));
  ASSERT_TRUE(m.ok()) << m.status();
  ExpectMatchesChecksums(**m, Dir("f32"));
}

TEST_F(RuntimeTest, ShardedFolderHoldsTheSameTensors) {
  auto single = HfModel::Open(Dir("f32"));
  auto sharded = HfModel::Open(Dir("sharded"));
  ASSERT_TRUE(single.ok()) << single.status();
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ((*sharded)->files().size(), 2u);
  ASSERT_EQ((*single)->TensorNames(), (*sharded)->TensorNames());
  for (const std::string& name : (*single)->TensorNames()) {
    auto a = (*single)->Tensor(name);
    auto b = (*sharded)->Tensor(name);
    ASSERT_TRUE(a.ok() && b.ok()) << name;
    EXPECT_EQ(a->info->shape, b->info->shape) << name;
    ASSERT_EQ(a->info->bytes, b->info->bytes) << name;
    EXPECT_EQ(std::memcmp(a->data, b->data, a->info->bytes), 0) << name;
  }
  // Where a tensor lives must not change the model's identity.
  EXPECT_EQ((*single)->fingerprint(), (*sharded)->fingerprint());
  ExpectMatchesChecksums(**sharded, Dir("sharded"));
}

TEST_F(RuntimeTest, Bf16FolderConvertsToF32) {
  auto bf = HfModel::Open(Dir("bf16"));
  auto f32 = HfModel::Open(Dir("f32"));
  ASSERT_TRUE(bf.ok()) << bf.status();
  ASSERT_TRUE(f32.ok()) << f32.status();
  EXPECT_EQ((*bf)->config().torch_dtype, "bfloat16");
  ExpectMatchesChecksums(**bf, Dir("bf16"));
  // Same seed: each bf16 value is its f32 twin rounded, so it is within half a bf16 ulp.
  std::vector<float> a = ReadAll(**bf, "model.layers.1.mlp.down_proj.weight");
  std::vector<float> b = ReadAll(**f32, "model.layers.1.mlp.down_proj.weight");
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_LE(std::fabs(a[i] - b[i]), std::ldexp(std::fabs(b[i]), -8)) << i;
  }
  EXPECT_NE((*bf)->fingerprint(), (*f32)->fingerprint());
}

TEST_F(RuntimeTest, TiedEmbeddingsNeedNoLmHead) {
  auto m = HfModel::Open(Dir("tied"));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_TRUE((*m)->config().tie_word_embeddings);
  EXPECT_EQ((*m)->Tensor("lm_head.weight").status().code(), StatusCode::kNotFound);
  ExpectMatchesChecksums(**m, Dir("tied"));

  // The untied folder without lm_head is incomplete.
  std::string dir = CopyOfF32("no_lm_head");
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<std::pair<TensorInfo, const void*>> keep;
  for (const TensorInfo& t : (*file)->tensors()) {
    if (t.name != "lm_head.weight") keep.emplace_back(t, (*file)->data(t));
  }
  ASSERT_TRUE(WriteSafetensors(dir + "/model.tmp.safetensors", keep).ok());
  file->reset();
  fs::rename(dir + "/model.tmp.safetensors", dir + "/model.safetensors");
  auto broken = HfModel::Open(dir);
  ASSERT_FALSE(broken.ok());
  EXPECT_EQ(broken.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(broken.status().message(),
              AllOf(HasSubstr("lm_head.weight"), HasSubstr("[400, 64]")));
}

TEST_F(RuntimeTest, ReadF32RejectsWrongCountAndUnknownName) {
  auto m = HfModel::Open(Dir("f32"));
  ASSERT_TRUE(m.ok()) << m.status();
  std::vector<float> buf(64);
  Status s = (*m)->ReadF32("model.norm.weight", buf.data(), 63);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("model.norm.weight"));
  EXPECT_TRUE((*m)->ReadF32("model.norm.weight", buf.data(), 64).ok());
  s = (*m)->ReadF32("model.nope", buf.data(), 64);
  EXPECT_EQ(s.code(), StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("model.nope"));
}

// The format promises no alignment: a header of odd length puts every tensor at an odd address.
TEST_F(RuntimeTest, ReadsMisalignedTensors) {
  for (const char* src : {"f32", "bf16"}) {
    SCOPED_TRACE(src);
    std::string dir = Dir(std::string("odd_") + src);
    fs::remove_all(dir);
    fs::copy(Dir(src), dir, fs::copy_options::recursive);
    auto file = SafetensorsFile::Open(Dir(src) + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    const uint64_t data_at = (*file)->data_section_offset();
    const std::string raw = ReadText(Dir(src) + "/model.safetensors");
    // Rebuild the header unpadded, with one trailing space if needed to make its length odd.
    std::string text = Json::parse(raw.substr(8, data_at - 8)).dump();
    if (text.size() % 2 == 0) text += ' ';
    const std::string data = raw.substr(data_at);
    WriteRaw(dir + "/model.safetensors", text, data);
    auto odd = HfModel::Open(dir);
    ASSERT_TRUE(odd.ok()) << odd.status();
    EXPECT_EQ((*odd)->files()[0]->data_section_offset() % 2, 1u);
    ExpectMatchesChecksums(**odd, Dir(src));
  }
}

// ---------------------------------------------------------------------------------------------
// Broken folders
// ---------------------------------------------------------------------------------------------

TEST_F(RuntimeTest, MissingTensorIsNamed) {
  std::string dir = CopyOfF32("missing_tensor");
  const std::string victim = "model.layers.1.mlp.up_proj.weight";
  {
    auto file = SafetensorsFile::Open(dir + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<std::pair<TensorInfo, const void*>> keep;
    for (const TensorInfo& t : (*file)->tensors()) {
      if (t.name != victim) keep.emplace_back(t, (*file)->data(t));
    }
    ASSERT_EQ(keep.size() + 1, (*file)->tensors().size());
    ASSERT_TRUE(WriteSafetensors(dir + "/rewritten.safetensors", keep).ok());
  }
  fs::rename(dir + "/rewritten.safetensors", dir + "/model.safetensors");
  auto m = HfModel::Open(dir);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), AllOf(HasSubstr(victim), HasSubstr("[160, 64]")));
}

TEST_F(RuntimeTest, WrongKProjShapeIsNamedWithBothShapes) {
  std::string dir = CopyOfF32("bad_k_proj");
  const std::string victim = "model.layers.1.self_attn.k_proj.weight";
  {
    auto file = SafetensorsFile::Open(dir + "/model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<std::pair<TensorInfo, const void*>> out;
    for (TensorInfo t : (*file)->tensors()) {
      const void* data = (*file)->data(t);
      if (t.name == victim) t.shape = {64, 32};  // transposed: same bytes, wrong layout
      out.emplace_back(t, data);
    }
    ASSERT_TRUE(WriteSafetensors(dir + "/rewritten.safetensors", out).ok());
  }
  fs::rename(dir + "/rewritten.safetensors", dir + "/model.safetensors");
  auto m = HfModel::Open(dir);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(),
              AllOf(HasSubstr(victim), HasSubstr("[64, 32]"), HasSubstr("expected [32, 64]")));
}

TEST_F(RuntimeTest, ConfigWithIndivisibleKvHeadsIsRejected) {
  std::string dir = CopyOfF32("bad_kv_heads");
  Json config = Json::parse(ReadText(dir + "/config.json"));
  config["num_key_value_heads"] = 3;
  WriteText(dir + "/config.json", config.dump());
  auto m = HfModel::Open(dir);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(m.status().message(),
              AllOf(HasSubstr("num_key_value_heads"), HasSubstr("config.json")));
}

TEST_F(RuntimeTest, MissingFilesAreNotFound) {
  auto none = HfModel::Open(Dir("does_not_exist"));
  EXPECT_EQ(none.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr("config.json"));

  std::string dir = CopyOfF32("no_weights");
  fs::remove(dir + "/model.safetensors");
  auto m = HfModel::Open(dir);
  EXPECT_EQ(m.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(m.status().message(), HasSubstr("model.safetensors"));

  // An index that names a shard that is not there.
  std::string sdir = Dir("missing_shard");
  fs::remove_all(sdir);
  fs::copy(Dir("sharded"), sdir, fs::copy_options::recursive);
  fs::remove(sdir + "/model-00002-of-00002.safetensors");
  auto s = HfModel::Open(sdir);
  EXPECT_EQ(s.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(s.status().message(), HasSubstr("model-00002-of-00002.safetensors"));

  // An index that puts a tensor in the wrong shard.
  fs::copy(Dir("sharded") + "/model-00002-of-00002.safetensors", sdir);
  Json index = Json::parse(ReadText(sdir + "/model.safetensors.index.json"));
  std::string moved;
  for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
    if (it.value() == "model-00001-of-00002.safetensors") {
      moved = it.key();
      it.value() = "model-00002-of-00002.safetensors";
      break;
    }
  }
  ASSERT_FALSE(moved.empty());
  WriteText(sdir + "/model.safetensors.index.json", index.dump());
  s = HfModel::Open(sdir);
  EXPECT_EQ(s.status().code(), StatusCode::kCorruption);
  EXPECT_THAT(s.status().message(), HasSubstr(moved));
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

Json BaseConfig() {
  return Json{{"model_type", "llama"},           {"hidden_size", 4096},
              {"intermediate_size", 11008},      {"num_hidden_layers", 32},
              {"num_attention_heads", 32},       {"vocab_size", 32000},
              {"max_position_embeddings", 4096}, {"rms_norm_eps", 1e-5}};
}

TEST(LlamaConfigTest, DefaultsFollowTransformers) {
  auto c = ParseLlamaConfig(BaseConfig().dump(), "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 32);  // absent: plain multi-head attention
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_FLOAT_EQ(c->rope_theta, 10000.0f);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_EQ(c->sliding_window, 0);
  EXPECT_EQ(c->q_dim(), 4096);
  EXPECT_EQ(c->kv_dim(), 4096);
}

TEST(LlamaConfigTest, MistralAndTinyLlamaShapes) {
  Json mistral = BaseConfig();
  mistral["model_type"] = "mistral";
  mistral["intermediate_size"] = 14336;
  mistral["num_key_value_heads"] = 8;
  mistral["rope_theta"] = 1000000.0;
  mistral["sliding_window"] = 4096;
  auto c = ParseLlamaConfig(mistral.dump(), "mistral");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->kv_dim(), 1024);
  EXPECT_FLOAT_EQ(c->rope_theta, 1e6f);
  EXPECT_EQ(c->sliding_window, 4096);

  // TinyLlama-1.1B's config, abridged: architectures only, eos as a list is also accepted.
  Json tiny = {{"architectures", {"LlamaForCausalLM"}},
               {"hidden_size", 2048},
               {"intermediate_size", 5632},
               {"num_hidden_layers", 22},
               {"num_attention_heads", 32},
               {"num_key_value_heads", 4},
               {"vocab_size", 32000},
               {"eos_token_id", {2, 3}},
               {"rope_scaling", nullptr},
               {"tie_word_embeddings", false}};
  c = ParseLlamaConfig(tiny.dump(), "tiny");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->model_type, "llama");
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->kv_dim(), 256);
  EXPECT_EQ(c->eos_token_id, 2);

  // An explicit head_dim wins over hidden / heads.
  Json explicit_hd = mistral;
  explicit_hd["head_dim"] = 64;
  c = ParseLlamaConfig(explicit_hd.dump(), "hd");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->q_dim(), 2048);
}

void ExpectRejected(const Json& config, StatusCode code, const std::string& culprit) {
  auto c = ParseLlamaConfig(config.dump(), "the/config.json");
  ASSERT_FALSE(c.ok()) << config.dump();
  EXPECT_EQ(c.status().code(), code) << c.status();
  EXPECT_THAT(c.status().message(), AllOf(HasSubstr(culprit), HasSubstr("the/config.json")));
}

TEST(LlamaConfigTest, RejectsWhatItCannotRun) {
  Json j = BaseConfig();
  j["num_key_value_heads"] = 5;
  ExpectRejected(j, StatusCode::kInvalidArgument, "num_key_value_heads");
  j = BaseConfig();
  j["num_attention_heads"] = 30;
  ExpectRejected(j, StatusCode::kInvalidArgument, "hidden_size");
  j = BaseConfig();
  j["intermediate_size"] = 0;
  ExpectRejected(j, StatusCode::kInvalidArgument, "intermediate_size");
  j = BaseConfig();
  j["num_hidden_layers"] = -2;
  ExpectRejected(j, StatusCode::kInvalidArgument, "num_hidden_layers");
  j = BaseConfig();
  j.erase("vocab_size");
  ExpectRejected(j, StatusCode::kInvalidArgument, "vocab_size");
  j = BaseConfig();
  j["hidden_size"] = "4096";
  ExpectRejected(j, StatusCode::kInvalidArgument, "hidden_size");
  j = BaseConfig();
  j["rms_norm_eps"] = -1;
  ExpectRejected(j, StatusCode::kInvalidArgument, "rms_norm_eps");
  j = BaseConfig();
  j["rope_scaling"] = {{"type", "linear"}, {"factor", 2.0}};
  ExpectRejected(j, StatusCode::kUnimplemented, "rope_scaling");
  j = BaseConfig();
  j["attention_bias"] = true;
  ExpectRejected(j, StatusCode::kUnimplemented, "attention_bias");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectRejected(j, StatusCode::kUnimplemented, "hidden_act");
  j = BaseConfig();
  j["model_type"] = "gpt2";
  ExpectRejected(j, StatusCode::kUnimplemented, "gpt2");
  j = BaseConfig();
  j.erase("model_type");
  ExpectRejected(j, StatusCode::kInvalidArgument, "model_type");

  auto c = ParseLlamaConfig("{\"hidden_size\": 4", "trunc.json");
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
  EXPECT_THAT(c.status().message(), HasSubstr("trunc.json"));
  c = ParseLlamaConfig("[1, 2]", "array.json");
  EXPECT_EQ(c.status().code(), StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------------------------

class SafetensorsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/strata_safetensors_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

  // Opens `path`, expects failure with `code` and every string of `culprits` in the message.
  void ExpectError(const std::string& path, StatusCode code,
                   const std::vector<std::string>& culprits) {
    auto f = SafetensorsFile::Open(path);
    ASSERT_FALSE(f.ok()) << path;
    EXPECT_EQ(f.status().code(), code) << f.status();
    EXPECT_THAT(f.status().message(), HasSubstr(path));
    for (const std::string& c : culprits) EXPECT_THAT(f.status().message(), HasSubstr(c));
  }

  std::string dir_;
};

TEST_F(SafetensorsTest, WriteThenReadRoundTrips) {
  std::vector<float> a = {1.5f, -2.25f, 3.0f, 1e-20f, 7.0f, -0.0f};
  std::vector<uint16_t> b = {F32ToBF16(1.0f), F32ToBF16(-3.5f), F32ToBF16(0.1f)};
  std::vector<int64_t> c = {-1, 1ll << 40};
  float scalar = 42.0f;
  auto info = [](const char* name, DType dtype, std::vector<int64_t> shape) {
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.bytes = static_cast<uint64_t>(t.numel()) * DTypeSize(dtype);
    return t;
  };
  std::vector<std::pair<TensorInfo, const void*>> tensors = {
      {info("a", DType::kF32, {2, 3}), a.data()},    {info("b.bf16", DType::kBF16, {3}), b.data()},
      {info("c", DType::kI64, {2}), c.data()},       {info("scalar", DType::kF32, {}), &scalar},
      {info("empty", DType::kF16, {0, 5}), nullptr},
  };
  const std::string path = Path("rt.safetensors");
  ASSERT_TRUE(WriteSafetensors(path, tensors, {{"format", "pt"}, {"step", "7"}}).ok());
  EXPECT_FALSE(fs::exists(path + ".tmp." + std::to_string(getpid())));

  auto f = SafetensorsFile::Open(path);
  ASSERT_TRUE(f.ok()) << f.status();
  ASSERT_EQ((*f)->tensors().size(), 5u);
  EXPECT_EQ((*f)->metadata().at("step"), "7");
  EXPECT_EQ((*f)->path(), path);
  // The header length the file itself states, read by hand.
  std::string raw = ReadText(path);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(raw[i]);
  EXPECT_EQ((*f)->data_section_offset(), 8 + header_len);
  EXPECT_EQ((*f)->data_section_offset() % 8, 0u);
  EXPECT_EQ(raw.size(), (*f)->data_section_offset() + 24 + 6 + 16 + 4);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorInfo* t = (*f)->Find(tensors[i].first.name);
    ASSERT_NE(t, nullptr) << tensors[i].first.name;
    EXPECT_EQ(t->dtype, tensors[i].first.dtype);
    EXPECT_EQ(t->shape, tensors[i].first.shape);
    EXPECT_EQ(t->bytes, tensors[i].first.bytes);
    if (t->bytes > 0) {
      EXPECT_EQ(std::memcmp((*f)->data(*t), tensors[i].second, t->bytes), 0);
    }
    // The data really sits where the header says, counted from the data section.
    EXPECT_EQ(std::memcmp(raw.data() + (*f)->data_section_offset() + t->offset,
                          tensors[i].second == nullptr ? "" : tensors[i].second, t->bytes),
              0);
  }
  EXPECT_EQ((*f)->Find("nope"), nullptr);

  // Bytes that disagree with the shape are refused before anything is written.
  TensorInfo bad = info("bad", DType::kF32, {4});
  bad.bytes = 12;
  Status s = WriteSafetensors(Path("bad.safetensors"), {{bad, a.data()}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_FALSE(fs::exists(Path("bad.safetensors")));
}

TEST_F(SafetensorsTest, MalformedFilesGiveClearErrors) {
  const std::string eight_floats(32, '\x01');

  // Truncated: a valid file cut in the middle of its data.
  {
    std::vector<float> v(16, 1.0f);
    TensorInfo t;
    t.name = "w";
    t.shape = {16};
    t.bytes = 64;
    TensorInfo u = t;
    u.name = "tail.weight";
    ASSERT_TRUE(WriteSafetensors(Path("trunc.safetensors"), {{t, v.data()}, {u, v.data()}}).ok());
    fs::resize_file(Path("trunc.safetensors"), fs::file_size(Path("trunc.safetensors")) - 10);
    ExpectError(Path("trunc.safetensors"), StatusCode::kDataLoss, {"truncated", "tail.weight"});
  }
  // Shorter than the length prefix, and empty.
  WriteText(Path("tiny.safetensors"), "abc");
  ExpectError(Path("tiny.safetensors"), StatusCode::kDataLoss, {"truncated"});
  WriteText(Path("empty.safetensors"), "");
  ExpectError(Path("empty.safetensors"), StatusCode::kDataLoss, {"truncated"});
  // Header length past the end of the file.
  WriteRaw(Path("hdr_eof.safetensors"), "{}", "", 1000);
  ExpectError(Path("hdr_eof.safetensors"), StatusCode::kDataLoss, {"header length 1000"});
  // Absurd header length (e.g. a random file).
  WriteRaw(Path("hdr_huge.safetensors"), "{}", "", 1ull << 60);
  ExpectError(Path("hdr_huge.safetensors"), StatusCode::kCorruption, {"header length"});
  // Header not JSON; JSON but not an object.
  WriteRaw(Path("notjson.safetensors"), "{\"w\": {\"dtype\": \"F32\",", eight_floats);
  ExpectError(Path("notjson.safetensors"), StatusCode::kCorruption, {"JSON"});
  WriteRaw(Path("array.safetensors"), "[1,2,3]", eight_floats);
  ExpectError(Path("array.safetensors"), StatusCode::kCorruption, {"array"});
  // Unknown dtype.
  WriteRaw(Path("dtype.safetensors"),
           R"({"fp8.w":{"dtype":"F8_E4M3X","shape":[32],"data_offsets":[0,32]}})", eight_floats);
  ExpectError(Path("dtype.safetensors"), StatusCode::kInvalidArgument, {"fp8.w", "F8_E4M3X"});
  // Shape does not match the byte range.
  WriteRaw(Path("shape.safetensors"),
           R"({"w.shape":{"dtype":"F32","shape":[3,3],"data_offsets":[0,32]}})", eight_floats);
  ExpectError(Path("shape.safetensors"), StatusCode::kCorruption, {"w.shape", "[3, 3]", "36"});
  // Offsets past the data section.
  WriteRaw(Path("past.safetensors"),
           R"({"w.past":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}})", eight_floats);
  ExpectError(Path("past.safetensors"), StatusCode::kDataLoss, {"w.past"});
  // begin > end; negative offsets; negative dims; missing fields.
  WriteRaw(Path("rev.safetensors"), R"({"w.rev":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})",
           eight_floats);
  ExpectError(Path("rev.safetensors"), StatusCode::kCorruption, {"w.rev"});
  WriteRaw(Path("neg.safetensors"),
           R"({"w.neg":{"dtype":"F32","shape":[-2,-4],"data_offsets":[0,32]}})", eight_floats);
  ExpectError(Path("neg.safetensors"), StatusCode::kCorruption, {"w.neg"});
  WriteRaw(Path("negoff.safetensors"),
           R"({"w.negoff":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}})", eight_floats);
  ExpectError(Path("negoff.safetensors"), StatusCode::kCorruption, {"w.negoff"});
  WriteRaw(Path("nodtype.safetensors"), R"({"w.nod":{"shape":[8],"data_offsets":[0,32]}})",
           eight_floats);
  ExpectError(Path("nodtype.safetensors"), StatusCode::kCorruption, {"w.nod", "dtype"});
  // A shape whose element count overflows 64 bits.
  WriteRaw(Path("overflow.safetensors"),
           R"({"w.big":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,32]}})",
           eight_floats);
  ExpectError(Path("overflow.safetensors"), StatusCode::kCorruption, {"w.big"});
  // Overlapping tensors.
  WriteRaw(Path("overlap.safetensors"),
           R"({"first.w":{"dtype":"F32","shape":[6],"data_offsets":[0,24]},)"
           R"("second.w":{"dtype":"F32","shape":[4],"data_offsets":[16,32]}})",
           eight_floats);
  ExpectError(Path("overlap.safetensors"), StatusCode::kCorruption,
              {"first.w", "second.w", "overlap"});
  // A file that does not exist.
  ExpectError(Path("absent.safetensors"), StatusCode::kNotFound, {});

  // Adjacent (touching) tensors and __metadata__ are fine.
  WriteRaw(
      Path("ok.safetensors"),
      R"({"__metadata__":{"format":"pt"},"x":{"dtype":"I32","shape":[2,2],"data_offsets":[16,32]},)"
      R"("y":{"dtype":"BF16","shape":[8],"data_offsets":[0,16]}})",
      eight_floats);
  auto f = SafetensorsFile::Open(Path("ok.safetensors"));
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ((*f)->tensors().size(), 2u);
  EXPECT_EQ((*f)->tensors()[0].name, "x");  // header order kept
  EXPECT_EQ((*f)->metadata().at("format"), "pt");
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

TEST_F(RuntimeTest, TokenizerMatchesPythonSentencePiece) {
  auto tok = Tokenizer::Load(Dir("f32") + "/tokenizer.model");
  ASSERT_TRUE(tok.ok()) << tok.status();
  Json expected = Json::parse(ReadText(Dir("f32") + "/tokenizer_expected.json"));
  EXPECT_EQ((*tok)->bos_id(), expected["bos_id"].get<int>());
  EXPECT_EQ((*tok)->eos_id(), expected["eos_id"].get<int>());
  EXPECT_EQ((*tok)->vocab_size(), expected["vocab_size"].get<int>());
  EXPECT_EQ((*tok)->vocab_size(), 400);
  ASSERT_GE(expected["cases"].size(), 5u);
  for (const Json& c : expected["cases"]) {
    const std::string text = c["text"].get<std::string>();
    SCOPED_TRACE(text);
    const auto want = c["ids"].get<std::vector<int32_t>>();
    auto ids = (*tok)->Encode(text, /*add_bos=*/false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    EXPECT_EQ(*ids, want);
    auto with_bos = (*tok)->Encode(text, /*add_bos=*/true);
    ASSERT_TRUE(with_bos.ok());
    ASSERT_EQ(with_bos->size(), want.size() + 1);
    EXPECT_EQ((*with_bos)[0], (*tok)->bos_id());

    auto decoded = (*tok)->Decode(*with_bos);  // BOS decodes to nothing
    ASSERT_TRUE(decoded.ok()) << decoded.status();
    EXPECT_EQ(*decoded, c["decoded"].get<std::string>());
    EXPECT_EQ(*decoded, text);  // identity normalization: exact round trip

    // Streaming pieces concatenate to the text, with the dummy-prefix space in front.
    std::string streamed;
    for (int32_t id : *with_bos) streamed += (*tok)->DecodePiece(id);
    EXPECT_EQ(streamed, text.empty() ? "" : " " + text);
  }
  EXPECT_EQ((*tok)->DecodePiece((*tok)->eos_id()), "");
  EXPECT_EQ((*tok)->DecodePiece(-1), "");
  EXPECT_EQ((*tok)->DecodePiece(100000), "");

  auto bad = (*tok)->Decode({5, 400});
  EXPECT_EQ(bad.status().code(), StatusCode::kOutOfRange);
  EXPECT_THAT(bad.status().message(), HasSubstr("400"));
}

TEST_F(RuntimeTest, TokenizerLoadErrors) {
  auto missing = Tokenizer::Load(Dir("f32") + "/no_such.model");
  EXPECT_EQ(missing.status().code(), StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("no_such.model"));
  const std::string garbage = Dir("garbage.model");
  WriteText(garbage, "this is not a protobuf \xff\xff\xff");
  auto bad = Tokenizer::Load(garbage);
  EXPECT_EQ(bad.status().code(), StatusCode::kCorruption);
  EXPECT_THAT(bad.status().message(), HasSubstr("garbage.model"));
}

}  // namespace
}  // namespace strata::runtime
