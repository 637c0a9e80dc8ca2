// `strata shard`'s writer and reader: every rank's slices, put back together, give the original
// tensors; the folder appears only when complete; damaged files are caught.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "base/dtype.h"
#include "kernels/ops.h"
#include "kernels/quant.h"
#include "parallel/tp_plan.h"
#include "runtime/hf_model.h"
#include "runtime/shard_file.h"

namespace strata::runtime {
namespace {

namespace fs = std::filesystem;

class ShardTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char tmpl[] = "/tmp/strata-shard-test-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    for (const char* variant : {"untied", "tied"}) {
      const std::string cmd = std::string(STRATA_PYTHON) + " " + STRATA_SOURCE_DIR +
                              "/tests/reference/make_tiny_llama.py --out " + dir_ + "/" + variant +
                              (std::string(variant) == "tied" ? " --tied" : "") + " > /dev/null";
      ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    }
  }
  static void TearDownTestSuite() { fs::remove_all(dir_); }

  static std::vector<proto::RankSlice> Slices(const HfModel& m, int ranks,
                                              std::vector<double> ratios = {}) {
    const LlamaConfig& c = m.config();
    StatusOr<parallel::TpPlan> plan = parallel::MakeTpPlan(
        {c.num_attention_heads, c.num_key_value_heads, c.intermediate_size, 32, c.vocab_size},
        ranks, ratios);
    EXPECT_TRUE(plan.ok()) << plan.status().ToString();
    std::vector<proto::RankSlice> out = parallel::ToProtoSlices(*plan);
    return out;
  }

  static inline std::string dir_;
};

std::vector<float> Original(const HfModel& m, const std::string& name, int64_t n) {
  std::vector<float> v(static_cast<size_t>(n));
  EXPECT_TRUE(m.ReadF32(name, v.data(), v.size()).ok()) << name;
  return v;
}

// What the stored bytes should decode to, computed from the original values.
std::vector<float> AsStored(std::vector<float> v, const std::string& dtype, int64_t cols) {
  if (dtype == "bf16") {
    for (float& x : v) x = BF16ToF32(F32ToBF16(x));
  } else if (dtype == "q8_0") {
    const int64_t rows = static_cast<int64_t>(v.size()) / cols;
    std::vector<uint8_t> q(kernels::WeightBytes(kernels::WeightType::kQ8_0, rows, cols));
    kernels::QuantizeRowsQ8_0(v.data(), q.data(), rows, cols);
    kernels::DequantizeRowsQ8_0(q.data(), v.data(), rows, cols);
  }
  return v;
}

std::vector<float> Decode(const ShardFile& f, const proto::TensorEntry& e) {
  StatusOr<std::vector<uint8_t>> bytes = f.ReadTensor(e);
  EXPECT_TRUE(bytes.ok()) << bytes.status().ToString();
  int64_t n = 1;
  for (int64_t d : e.shape()) n *= d;
  std::vector<float> out(static_cast<size_t>(n));
  if (e.dtype() == "f32") {
    std::memcpy(out.data(), bytes->data(), out.size() * 4);
  } else if (e.dtype() == "bf16") {
    ConvertBuffer(bytes->data(), DType::kBF16, out.data(), DType::kF32, out.size());
  } else {
    kernels::DequantizeRowsQ8_0(bytes->data(), out.data(), e.shape(0), e.shape(1));
  }
  return out;
}

const proto::TensorEntry* FindIn(const proto::ShardManifest& m, const std::string& name) {
  for (const auto& e : m.resident()) {
    if (e.name() == name) return &e;
  }
  for (const auto& b : m.blocks()) {
    for (const auto& e : b.tensors()) {
      if (e.name() == name) return &e;
    }
  }
  return nullptr;
}

TEST_F(ShardTest, SlicesReassembleToTheOriginalForEveryDtypeAndSplit) {
  auto model = HfModel::Open(dir_ + "/untied");
  ASSERT_TRUE(model.ok()) << model.status().ToString();
  const LlamaConfig& c = (*model)->config();
  const int64_t hidden = c.hidden_size, hd = c.head_dim, inter = c.intermediate_size;
  struct Split {
    int ranks;
    std::vector<double> ratios;
  };
  for (const std::string dtype : {"f32", "bf16", "q8_0"}) {
    for (const Split& split : {Split{1, {}}, Split{2, {}}, Split{2, {3, 1}}}) {
      const std::string out = dir_ + "/out-" + dtype + "-" + std::to_string(split.ranks) +
                              (split.ratios.empty() ? "" : "-uneven");
      ShardWriteOptions opts;
      opts.weight_dtype = dtype;
      int64_t last_done = 0, last_total = 0;
      opts.progress = [&](int64_t d, int64_t t) { last_done = d; last_total = t; };
      const auto slices = Slices(**model, split.ranks, split.ratios);
      Status st = WriteShardFolder(**model, slices, {}, out, opts);
      ASSERT_TRUE(st.ok()) << dtype << ": " << st.ToString();
      EXPECT_EQ(last_done, last_total);
      EXPECT_TRUE(fs::exists(out + "/config.json"));
      EXPECT_TRUE(fs::exists(out + "/tokenizer.model"));

      std::vector<std::unique_ptr<ShardFile>> files;
      for (int r = 0; r < split.ranks; ++r) {
        auto f = ShardFile::Open(ShardPath(out, r));
        ASSERT_TRUE(f.ok()) << f.status().ToString();
        ASSERT_TRUE((*f)->VerifyChecksums().ok());
        EXPECT_EQ((*f)->manifest().model_fingerprint(), (*model)->fingerprint());
        EXPECT_EQ((*f)->manifest().blocks_size(), 2 * c.num_hidden_layers);
        for (const auto& b : (*f)->manifest().blocks()) EXPECT_EQ(b.offset() % kShardAlign, 0u);
        files.push_back(std::move(*f));
      }
      // Rank 0 alone holds the embeddings; every rank holds the final norm and its slice's rows
      // of the LM head, which concatenate to the original head.
      if (split.ranks > 1) {
        EXPECT_EQ(FindIn(files[1]->manifest(), "model.embed_tokens.weight"), nullptr);
      }
      std::vector<float> head;
      for (int r = 0; r < split.ranks; ++r) {
        const auto& m = files[static_cast<size_t>(r)]->manifest();
        ASSERT_NE(FindIn(m, "model.norm.weight"), nullptr) << "rank " << r;
        const auto* e = FindIn(m, "lm_head.weight");
        ASSERT_NE(e, nullptr) << "rank " << r;
        EXPECT_EQ(e->shape(0), m.slice().vocab_end() - m.slice().vocab_begin());
        EXPECT_EQ(m.slice().vocab_begin(), static_cast<int64_t>(head.size()) / hidden);
        const auto rows = Decode(*files[static_cast<size_t>(r)], *e);
        head.insert(head.end(), rows.begin(), rows.end());
      }
      if (split.ratios.size() == 2) {  // 3:1 gives rank 0 three quarters of the vocabulary
        EXPECT_EQ(files[0]->manifest().slice().vocab_end(), (3 * c.vocab_size + 2) / 4);
      }
      EXPECT_EQ(head, AsStored(Original(**model, "lm_head.weight", c.vocab_size * hidden), dtype,
                               hidden));
      const auto emb = Decode(*files[0], *FindIn(files[0]->manifest(), "model.embed_tokens.weight"));
      EXPECT_EQ(emb, AsStored(Original(**model, "model.embed_tokens.weight",
                                       c.vocab_size * hidden), dtype, hidden));

      for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
        const std::string p = "model.layers." + std::to_string(l) + ".";
        // Row-split matrices: concatenating the ranks' rows gives the original.
        struct RowSplit {
          const char* name;
          int64_t rows;
        };
        for (const RowSplit& rs : {RowSplit{"self_attn.q_proj.weight", c.num_attention_heads * hd},
                                   RowSplit{"self_attn.k_proj.weight", c.num_key_value_heads * hd},
                                   RowSplit{"mlp.gate_proj.weight", inter},
                                   RowSplit{"mlp.up_proj.weight", inter}}) {
          std::vector<float> joined;
          for (const auto& f : files) {
            const auto* e = FindIn(f->manifest(), p + rs.name);
            ASSERT_NE(e, nullptr) << rs.name;
            const auto part = Decode(*f, *e);
            joined.insert(joined.end(), part.begin(), part.end());
          }
          EXPECT_EQ(joined, AsStored(Original(**model, p + rs.name, rs.rows * hidden), dtype,
                                     hidden))
              << dtype << " " << rs.name << " ranks " << split.ranks;
        }
        // Column-split matrices: rank r's [hidden, cols_r] pieces side by side.
        struct ColSplit {
          const char* name;
          int64_t cols;
        };
        for (const ColSplit& cs : {ColSplit{"self_attn.o_proj.weight", c.num_attention_heads * hd},
                                   ColSplit{"mlp.down_proj.weight", inter}}) {
          const std::vector<float> orig = Original(**model, p + cs.name, hidden * cs.cols);
          int64_t col0 = 0;
          for (const auto& f : files) {
            const auto* e = FindIn(f->manifest(), p + cs.name);
            ASSERT_NE(e, nullptr);
            const int64_t w = e->shape(1);
            std::vector<float> want(static_cast<size_t>(hidden * w));
            for (int64_t r = 0; r < hidden; ++r) {
              for (int64_t k = 0; k < w; ++k) want[r * w + k] = orig[r * cs.cols + col0 + k];
            }
            EXPECT_EQ(Decode(*f, *e), AsStored(want, dtype, w)) << dtype << " " << cs.name;
            col0 += w;
          }
          EXPECT_EQ(col0, cs.cols);
        }
        // Norms stay f32 and resident on every rank.
        for (const auto& f : files) {
          const auto* e = FindIn(f->manifest(), p + "input_layernorm.weight");
          ASSERT_NE(e, nullptr);
          EXPECT_EQ(e->dtype(), "f32");
          EXPECT_EQ(Decode(*f, *e), Original(**model, p + "input_layernorm.weight", hidden));
        }
      }
    }
  }
}

TEST_F(ShardTest, TiedEmbeddingsBecomeAnExplicitLmHead) {
  auto model = HfModel::Open(dir_ + "/tied");
  ASSERT_TRUE(model.ok());
  const std::string out = dir_ + "/tied-out";
  ASSERT_TRUE(WriteShardFolder(**model, Slices(**model, 1), {}, out, {}).ok());
  auto f = ShardFile::Open(ShardPath(out, 0));
  ASSERT_TRUE(f.ok());
  EXPECT_EQ(Decode(**f, *FindIn((*f)->manifest(), "lm_head.weight")),
            Decode(**f, *FindIn((*f)->manifest(), "model.embed_tokens.weight")));
}

// The writer drops its own pages from the page cache once the file is durable: left there they
// are small folios that a 2 MiB-hinted mapping could never map whole (shard_file.cc Finish).
TEST_F(ShardTest, WrittenFilesAreNotLeftInThePageCache) {
  struct statfs sfs {};
  ASSERT_EQ(::statfs(dir_.c_str(), &sfs), 0);
  if (sfs.f_type == TMPFS_MAGIC) GTEST_SKIP() << dir_ << " is tmpfs: its pages are the file";
  auto model = HfModel::Open(dir_ + "/untied");
  ASSERT_TRUE(model.ok());
  const std::string out = dir_ + "/uncached";
  ASSERT_TRUE(WriteShardFolder(**model, Slices(**model, 1), {}, out, {}).ok());
  const std::string path = ShardPath(out, 0);
  const int fd = ::open(path.c_str(), O_RDONLY);
  ASSERT_GE(fd, 0);
  const auto size = static_cast<size_t>(fs::file_size(path));
  void* map = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ASSERT_NE(map, MAP_FAILED);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> vec((size + page - 1) / page);
  ASSERT_EQ(::mincore(map, size, vec.data()), 0);
  size_t cached = 0;
  for (unsigned char v : vec) cached += v & 1;
  ::munmap(map, size);
  ::close(fd);
  // Most of the file is holes (blocks start on 2 MiB); without the drop its ~140 data pages stay.
  EXPECT_LE(cached, 2u) << cached << " of " << vec.size() << " pages still cached";
}

TEST_F(ShardTest, FailuresLeaveNoPartialFolder) {
  auto model = HfModel::Open(dir_ + "/untied");
  ASSERT_TRUE(model.ok());
  // An existing output is refused and left alone.
  const std::string existing = dir_ + "/existing";
  fs::create_directories(existing);
  std::ofstream(existing + "/keep.txt") << "mine";
  Status st = WriteShardFolder(**model, Slices(**model, 1), {}, existing, {});
  EXPECT_EQ(st.code(), StatusCode::kAlreadyExists);
  EXPECT_TRUE(fs::exists(existing + "/keep.txt"));
  // q8_0 with an FFN split that cuts a 32-column block fails midway: nothing may remain.
  auto slices = Slices(**model, 2);
  slices[0].set_ffn_end(80);
  slices[1].set_ffn_begin(80);
  const std::string out = dir_ + "/bad-q8";
  ShardWriteOptions opts;
  opts.weight_dtype = "q8_0";
  st = WriteShardFolder(**model, slices, {}, out, opts);
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st.ToString();
  EXPECT_NE(st.message().find("multiple of 32"), std::string::npos);
  EXPECT_FALSE(fs::exists(out));
  for (const auto& entry : fs::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().find("bad-q8.tmp"), std::string::npos)
        << "temporary folder left behind: " << entry.path();
  }
}

TEST_F(ShardTest, DamagedFilesAreCaught) {
  auto model = HfModel::Open(dir_ + "/untied");
  ASSERT_TRUE(model.ok());
  const std::string out = dir_ + "/damage";
  ASSERT_TRUE(WriteShardFolder(**model, Slices(**model, 1), {}, out, {}).ok());
  const std::string path = ShardPath(out, 0);
  const auto size = fs::file_size(path);

  const std::string flipped = dir_ + "/flipped.shard";
  fs::copy_file(path, flipped);
  auto f = ShardFile::Open(flipped);
  ASSERT_TRUE(f.ok());
  const auto& e = (*f)->manifest().blocks(0).tensors(0);
  {
    std::fstream io(flipped, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(static_cast<std::streamoff>(e.offset() + 5));
    io.put('\x5a');
  }
  EXPECT_EQ((*f)->VerifyChecksums().code(), StatusCode::kCorruption);

  const std::string truncated = dir_ + "/truncated.shard";
  fs::copy_file(path, truncated);
  fs::resize_file(truncated, size - 100);
  EXPECT_EQ(ShardFile::Open(truncated).status().code(), StatusCode::kDataLoss);

  // A file of an older format (version 1 stored q8_0 as ggml's interleaved blocks) is refused
  // with what to do about it, not misread.
  const std::string old_format = dir_ + "/old.shard";
  fs::copy_file(path, old_format);
  {
    std::fstream io(old_format, std::ios::in | std::ios::out | std::ios::binary);
    io.seekp(8);  // after the 8-byte magic: the little-endian uint32 version
    const uint32_t one = 1;
    io.write(reinterpret_cast<const char*>(&one), sizeof(one));
  }
  const Status old_status = ShardFile::Open(old_format).status();
  EXPECT_EQ(old_status.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(old_status.message().find("format version 1"), std::string::npos) << old_status.ToString();
  EXPECT_NE(old_status.message().find("strata shard"), std::string::npos) << old_status.ToString();

  const std::string not_shard = dir_ + "/not.shard";
  std::ofstream(not_shard) << std::string(8192, 'x');
  EXPECT_EQ(ShardFile::Open(not_shard).status().code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(ShardFile::Open(dir_ + "/missing.shard").status().code(), StatusCode::kNotFound);
}

}  // namespace
}  // namespace strata::runtime
